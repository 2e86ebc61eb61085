"""Triton Python-backend model hosting onnxruntime (the embedded CPU server's ``cpu`` config).

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` several
requests at once; they are concatenated into one onnxruntime call and split
back, so batching pays off. Triton itself rejects requests whose shape or
dtype differ from the config; each request is checked again here against the
contract, and a bad one fails alone while the others in the batch are served.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.integrity import sha256_file

logger = logging.getLogger(__name__)


def _pb_utils():
    import triton_python_backend_utils as pb_utils  # only importable inside the Triton stub

    return pb_utils


class OnnxBatchRunner:
    """The backend's logic without Triton: validate, concatenate, run, split (unit-tested directly)."""

    def __init__(self, onnx_path: Path, *, max_batch_size: int, expected_sha256: str | None, threads: int = 0) -> None:
        from cxr.core.ort_session import make_session

        if expected_sha256:
            actual = sha256_file(onnx_path)
            if actual != expected_sha256:
                raise RuntimeError(f"{onnx_path}: sha256 {actual} does not match config {expected_sha256}; refusing to load")
        self.session = make_session(onnx_path, threads=threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch_size = max_batch_size

    def run(self, batches: list[np.ndarray | None]) -> list[dict[str, np.ndarray] | str]:
        """Every output per request (name -> array), or an error message for a request that violates the contract."""
        results: list[dict[str, np.ndarray] | str] = []
        good: list[np.ndarray] = []
        for i, x in enumerate(batches):
            try:
                if x is None:
                    raise ValueError(f"missing input '{contract.INPUT_NAME}'")
                contract.validate_batch(x, max_batch_size=self.max_batch_size, name=f"request {i} input '{contract.INPUT_NAME}'")
                good.append(x)
                results.append({})  # placeholder
            except ValueError as exc:
                results.append(str(exc))
        if good:
            outs = self.session.run(self.output_names, {contract.INPUT_NAME: np.concatenate(good)})
            outs = [o.astype(np.float32, copy=False) for o in outs]
            start = 0
            for i, r in enumerate(results):
                if isinstance(r, str):
                    continue
                n = len(batches[i])  # type: ignore[arg-type]
                results[i] = {name: o[start : start + n] for name, o in zip(self.output_names, outs)}
                start += n
        return results


class TritonPythonModel:
    """Triton Python-backend entry point."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / params.get("onnx_file", "model.onnx")
        self.runner = OnnxBatchRunner(
            onnx_path,
            max_batch_size=int(config.get("max_batch_size", 0)) or 1,
            expected_sha256=params.get(contract.PARAM_SHA256) or None,
            threads=int(params.get("intra_op_threads", "0") or 0),
        )

    def execute(self, requests: list) -> list:
        pb = _pb_utils()
        inputs = []
        for request in requests:
            tensor = pb.get_input_tensor_by_name(request, contract.INPUT_NAME)
            inputs.append(None if tensor is None else tensor.as_numpy())
        responses = []
        for result in self.runner.run(inputs):
            if isinstance(result, str):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(result)))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in result.items()]))
        return responses

    def finalize(self) -> None:
        self.runner = None  # type: ignore[assignment]

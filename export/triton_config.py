"""Triton model configurations, one per deployment target, generated from the contract.

Targets (selected with ``tritonserver --model-config-name NAME``):

* ``config.pbtxt`` (default): production. GPU models use the ONNX Runtime
  backend on ``KIND_GPU`` with the TensorRT execution accelerator (FP32);
  CPU-only models (INT8) use the ONNX Runtime backend on ``KIND_CPU``.
* ``configs/gpu_fp16.pbtxt``: as the default with TensorRT in FP16.
* ``configs/tensorrt_plan.pbtxt``: a serialized TensorRT engine
  (``model.plan``, built by ``cxr export --format tensorrt`` on a GPU host).
* ``configs/cpu.pbtxt``: the embedded CPU Triton of this project (Python
  backend hosting onnxruntime; the pytriton wheel has no ORT backend).

Every config carries the same inputs and outputs, dynamic batching with a
queue policy that rejects overload fast, warmup, and the decision threshold,
labels and model sha256 as string parameters that clients read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr import contract

TARGETS = ("gpu", "gpu_fp16", "tensorrt_plan", "cpu_ort", "cpu")


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic batching settings.

    Attributes:
        max_batch_size: Largest batch the model accepts.
        max_queue_delay_us: How long the batcher may wait to fill a batch.
        preferred_batch_sizes: Batch sizes the batcher aims for.
        queue_timeout_us: A request queued longer than this is rejected.
        max_queue_size: Requests beyond this are rejected at once (overload).
        instances: Model instances.
    """

    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    queue_timeout_us: int = 10_000_000
    max_queue_size: int = 256
    instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in [1, max_batch_size]")
        if self.max_queue_delay_us < 0 or self.queue_timeout_us < 0 or self.max_queue_size < 0:
            raise ValueError("queue settings must be >= 0")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")


#: Tuned for the embedded CPU server: one instance (onnxruntime already uses
#: every core), a 5 ms window so concurrent requests meet in one batch.
CPU_POLICY = BatchingPolicy(max_batch_size=64, max_queue_delay_us=5000, preferred_batch_sizes=(8, 16, 32), instances=1)
#: Production GPU: two instances overlap copies and compute; a short window.
GPU_POLICY = BatchingPolicy(max_batch_size=64, max_queue_delay_us=1000, preferred_batch_sizes=(16, 32, 64), instances=2)


def _io_block() -> str:
    h, w, c = contract.IMAGE_SHAPE
    return (
        f'input [\n  {{\n    name: "{contract.INPUT_NAME}"\n    data_type: TYPE_{contract.INPUT_TRITON_DTYPE}\n'
        f"    dims: [ {h}, {w}, {c} ]\n  }}\n]\n"
        f'output [\n  {{\n    name: "{contract.OUTPUT_NAME}"\n    data_type: TYPE_{contract.OUTPUT_TRITON_DTYPE}\n'
        f"    dims: [ {', '.join(map(str, contract.OUTPUT_SHAPE))} ]\n  }}\n]\n"
    )


def _batching_block(policy: BatchingPolicy) -> str:
    preferred = ", ".join(map(str, policy.preferred_batch_sizes))
    return (
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {policy.max_queue_delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {policy.queue_timeout_us}\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {policy.max_queue_size}\n"
        "  }\n"
        "}\n"
    )


def _warmup_block(batch_size: int) -> str:
    h, w, c = contract.IMAGE_SHAPE
    return (
        "model_warmup [\n  {\n"
        f'    name: "zeros_batch{batch_size}"\n    batch_size: {batch_size}\n'
        f'    inputs {{\n      key: "{contract.INPUT_NAME}"\n      value {{\n'
        f"        data_type: TYPE_{contract.INPUT_TRITON_DTYPE}\n        dims: [ {h}, {w}, {c} ]\n        zero_data: true\n"
        "      }\n    }\n  }\n]\n"
    )


def _params_block(params: dict[str, str]) -> str:
    return "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in sorted(params.items())
    )


def render(
    name: str, target: str, *, threshold: float, sha256: str, policy: BatchingPolicy | None = None,
    onnx_file: str = "model.onnx",
) -> str:
    """The ``config.pbtxt`` text of one model for one target."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if policy is None:
        policy = GPU_POLICY if target in ("gpu", "gpu_fp16", "tensorrt_plan") else CPU_POLICY
    params = {
        contract.PARAM_THRESHOLD: f"{threshold:.6f}",
        contract.PARAM_LABELS: ",".join(contract.LABELS),
        contract.PARAM_SHA256: sha256,
    }
    head = f'# Generated by `cxr export` (target: {target}); edit export/triton_config.py, not this file.\nname: "{name}"\n'
    if target in ("gpu", "gpu_fp16", "cpu_ort"):
        head += 'backend: "onnxruntime"\n'
        head += f'default_model_filename: "{onnx_file}"\n'
    elif target == "tensorrt_plan":
        head += 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n'
    else:
        head += 'backend: "python"\n'
        params["onnx_file"] = onnx_file
        params["intra_op_threads"] = "0"
    head += f"max_batch_size: {policy.max_batch_size}\n"
    kind = "KIND_GPU" if target in ("gpu", "gpu_fp16", "tensorrt_plan") else "KIND_CPU"
    body = _io_block()
    body += f"instance_group [\n  {{\n    count: {policy.instances}\n    kind: {kind}\n  }}\n]\n"
    body += _batching_block(policy)
    if target in ("gpu", "gpu_fp16"):
        precision = "FP16" if target == "gpu_fp16" else "FP32"
        body += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{precision}" }}\n'
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            '        parameters { key: "trt_engine_cache_path" value: "/tmp/triton_trt_cache" }\n'
            "      }\n    ]\n  }\n}\n"
        )
    body += _warmup_block(min(8, policy.max_batch_size))
    return head + body + _params_block(params)


def write_model_dir(
    model_dir: Path, *, threshold: float, sha256: str, targets: tuple[str, ...], onnx_file: str = "model.onnx",
) -> list[Path]:
    """Write ``config.pbtxt`` (first target), ``configs/<target>.pbtxt`` (all) and ``labels.txt``."""
    model_dir = Path(model_dir)
    name = model_dir.name
    (model_dir / "configs").mkdir(parents=True, exist_ok=True)
    written = []
    for i, target in enumerate(targets):
        text = render(name, target, threshold=threshold, sha256=sha256, onnx_file=onnx_file)
        if i == 0:
            (model_dir / "config.pbtxt").write_text(text)
            written.append(model_dir / "config.pbtxt")
        path = model_dir / "configs" / f"{target}.pbtxt"
        path.write_text(text)
        written.append(path)
    (model_dir / "labels.txt").write_text("\n".join(contract.LABELS) + "\n")  # line i = class i
    written.append(model_dir / "labels.txt")
    return written

"""The one onnxruntime session factory of the project.

Every part that runs an ONNX model in-process (the Triton Python backend, the
embedded client transport, export parity, evaluation, Grad-CAM, the OOD fit)
builds its session here, so that the settings that matter are set once:

* intra-op thread spinning is off: on a 2-core host, spinning worker threads
  stalled the Python backend for about 500 ms every ~0.5 s (measured; see the
  README's performance section);
* all graph optimisations, CPU execution provider.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def make_session(model: str | os.PathLike | bytes, *, threads: int = 0):
    """An ``onnxruntime.InferenceSession`` on the CPU for a model path or serialized bytes.

    Args:
        model: Path to an ``.onnx`` file, or the serialized model.
        threads: Intra-op threads (0: one per core).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(Path(model))
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def served_outputs(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``probability`` and ``ood_score`` (NaN when the model has none) for contract images."""
    from cxr.core import contract

    sess = make_session(path)
    names = [o.name for o in sess.get_outputs()]
    probs, oods = [], []
    for i in range(0, len(x), 128):
        out = dict(zip(names, sess.run(names, {contract.INPUT_NAME: x[i : i + 128]})))
        probs.append(out[contract.OUTPUT_NAME].reshape(-1))
        oods.append(out[contract.OOD_OUTPUT_NAME].reshape(-1) if contract.OOD_OUTPUT_NAME in out else np.full(len(out[contract.OUTPUT_NAME]), np.nan))
    return np.concatenate(probs).astype(np.float64), np.concatenate(oods).astype(np.float64)

"""``cxr export --format tensorrt``: build a TensorRT plan from the exported ONNX on a GPU host.

Uses the ``tensorrt`` Python package when importable, else ``trtexec`` on PATH.
A plan is tied to the GPU model and TensorRT version that built it, so build
it on (a twin of) the serving host, inside the Triton container's TensorRT
version. Without TensorRT this says so plainly and fails.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from cxr.core import contract
from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)

#: Optimisation profile for the dynamic batch dimension: (min, opt, max).
BATCH_PROFILE = (1, 16, 64)


def _shape(batch: int) -> tuple[int, ...]:
    return (batch, *contract.IMAGE_SHAPE)


def build_plan(onnx_path: Path, plan_path: Path, *, fp16: bool = False, workspace_gib: int = 2) -> Path:
    """Build ``plan_path`` from ``onnx_path``.

    Raises:
        CxrError: No ONNX file, or no TensorRT (neither the package nor trtexec) on this host.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.exists():
        raise CxrError(f"{onnx_path} not found: run `cxr export` (ONNX) first")
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is not None:
        return _build_with_package(trt, onnx_path, plan_path, fp16=fp16, workspace_gib=workspace_gib)
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        raise CxrError(
            "no TensorRT on this host (neither the 'tensorrt' Python package nor 'trtexec'); build the plan on a GPU "
            "host, e.g. inside nvcr.io/nvidia/tritonserver (same TensorRT as the server), or serve the ONNX with the "
            "TensorRT execution accelerator (config.pbtxt / configs/gpu_fp16.pbtxt) instead"
        )
    lo, opt, hi = BATCH_PROFILE
    name = contract.INPUT_NAME
    fmt = lambda b: "x".join(map(str, _shape(b)))  # noqa: E731
    cmd = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={plan_path}", f"--minShapes={name}:{fmt(lo)}",
           f"--optShapes={name}:{fmt(opt)}", f"--maxShapes={name}:{fmt(hi)}", f"--memPoolSize=workspace:{workspace_gib * 1024}"]
    if fp16:
        cmd.append("--fp16")
    logger.info("running %s", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CxrError(f"trtexec failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return plan_path


def _build_with_package(trt, onnx_path: Path, plan_path: Path, *, fp16: bool, workspace_gib: int) -> Path:
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CxrError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    lo, opt, hi = BATCH_PROFILE
    profile.set_shape(contract.INPUT_NAME, _shape(lo), _shape(opt), _shape(hi))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise CxrError("TensorRT failed to build the engine")
    plan_path.write_bytes(bytes(engine))
    return plan_path

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

Every config carries the same inputs and outputs (``probability`` and
``ood_score``), dynamic batching with a queue policy that rejects overload
fast, warmup, and the decision threshold, OOD threshold, labels, DICOM
eligibility rules and model sha256 as string parameters that clients read.
Configs are built as ``model_config_pb2.ModelConfig`` messages and written
with ``text_format``; nothing here formats protobuf text by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from cxr.core import contract
from cxr.core.model_dir import ModelDir, ServedParams, render_config

__all__ = ["TARGETS", "GPU_TARGETS", "BatchingPolicy", "ServedParams", "build", "render", "parameters", "write_model_dir"]

TARGETS = ("gpu", "gpu_fp16", "tensorrt_plan", "cpu_ort", "cpu", "cpu_triage")
GPU_TARGETS = ("gpu", "gpu_fp16", "tensorrt_plan")


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic batching settings.

    Attributes:
        max_batch_size: Largest batch the model accepts.
        max_queue_delay_us: How long the batcher may wait to fill a batch.
        preferred_batch_sizes: Batch sizes the batcher aims for.
        queue_timeout_us: A routine request queued longer than this is delayed behind the requests still within
            theirs (never dropped); an urgent one has no timeout.
        max_queue_size: Requests of one priority level beyond this are rejected at once (overload:
            ``UNAVAILABLE``, which clients retry with backoff).
        instances: Model instances.
        priorities: Give every config Triton's priority levels (:data:`cxr.core.contract.PRIORITIES`: urgent
            requests are batched first); ``False`` only for the side-by-side measurement without them.
    """

    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    queue_timeout_us: int = 10_000_000
    max_queue_size: int = 256
    instances: int = 1
    priorities: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in [1, max_batch_size]")
        if self.max_queue_delay_us < 0 or self.queue_timeout_us < 0 or self.max_queue_size < 0:
            raise ValueError("queue settings must be >= 0")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")


#: Tuned for the embedded CPU server: two instances (two Python-backend stubs, each running onnxruntime on every
#: core, spinning off) and no preferred batch sizes, with a 5 ms window. Triton 2.51's dynamic batcher wakes its
#: thread on enqueue only when a payload slot is free *and* the queue has reached the next preferred batch size;
#: otherwise a request can wait out the batcher's 500 ms idle timeout. Two instances keep a slot free, and without
#: preferred sizes the size clause always holds, so every enqueue wakes the batcher. `cxr bench` measures it side by
#: side with LEGACY_CPU_POLICY (stalls_per_1000 and legacy_stalls_per_1000; README, "The 500 ms stalls").
CPU_POLICY = BatchingPolicy(max_batch_size=64, max_queue_delay_us=5000, preferred_batch_sizes=(), instances=2)
#: The CPU policy for a site that puts urgent studies before throughput (``configs/cpu_triage.pbtxt``): on a CPU an
#: urgent request cannot preempt a batch already running, so the largest batch bounds its wait. Measured by
#: ``cxr bench-priority`` (docs/capacity/priority/): urgent p95 under routine saturation within 2x idle at
#: max_batch_size 4, for a quarter less routine throughput than :data:`CPU_POLICY`.
TRIAGE_CPU_POLICY = BatchingPolicy(max_batch_size=4, max_queue_delay_us=5000, preferred_batch_sizes=(), instances=2)
#: The earlier CPU policy, kept for the side-by-side stall measurement in ``cxr bench``.
LEGACY_CPU_POLICY = BatchingPolicy(max_batch_size=64, max_queue_delay_us=5000, preferred_batch_sizes=(8, 16, 32), instances=1)
#: Production GPU: two instances overlap copies and compute; a short window.
GPU_POLICY = BatchingPolicy(max_batch_size=64, max_queue_delay_us=1000, preferred_batch_sizes=(16, 32, 64), instances=2)


def _dtype(triton_dtype: str) -> int:
    return mc.DataType.Value(f"TYPE_{triton_dtype}")


def build(
    name: str, target: str, params: ServedParams, *, policy: BatchingPolicy | None = None,
    onnx_file: str = "model.onnx",
) -> mc.ModelConfig:
    """The ``ModelConfig`` message of one model for one target."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if policy is None:
        policy = GPU_POLICY if target in GPU_TARGETS else TRIAGE_CPU_POLICY if target == "cpu_triage" else CPU_POLICY
    cfg = mc.ModelConfig(name=name, max_batch_size=policy.max_batch_size)
    values = params.as_parameters()
    if target in ("gpu", "gpu_fp16", "cpu_ort"):
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = onnx_file
    elif target == "tensorrt_plan":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    else:
        cfg.backend = "python"
        values["onnx_file"] = onnx_file
        values["intra_op_threads"] = "0"
    cfg.input.add(name=contract.INPUT_NAME, data_type=_dtype(contract.INPUT_TRITON_DTYPE), dims=list(contract.IMAGE_SHAPE))
    cfg.output.add(name=contract.OUTPUT_NAME, data_type=_dtype(contract.OUTPUT_TRITON_DTYPE), dims=list(contract.OUTPUT_SHAPE))
    if params.ood_threshold is not None:
        cfg.output.add(name=contract.OOD_OUTPUT_NAME, data_type=_dtype(contract.OOD_OUTPUT_TRITON_DTYPE), dims=[1])
    kind = mc.ModelInstanceGroup.KIND_GPU if target in GPU_TARGETS else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=policy.instances, kind=kind)
    db = cfg.dynamic_batching
    db.preferred_batch_size.extend(policy.preferred_batch_sizes)
    db.max_queue_delay_microseconds = policy.max_queue_delay_us
    qp = db.default_queue_policy
    qp.timeout_action = mc.ModelQueuePolicy.REJECT
    qp.default_timeout_microseconds = policy.queue_timeout_us
    qp.allow_timeout_override = True
    qp.max_queue_size = policy.max_queue_size
    if policy.priorities:
        # urgent (level 1) is batched before routine (level 2); a request without a priority is routine
        db.priority_levels = contract.PRIORITY_LEVELS
        db.default_priority_level = contract.PRIORITIES[contract.DEFAULT_PRIORITY]
        for name, level in contract.PRIORITIES.items():
            lq = db.priority_queue_policy[level]
            lq.timeout_action = mc.ModelQueuePolicy.DELAY  # late work waits longer; it is never dropped
            lq.default_timeout_microseconds = 0 if name == "urgent" else policy.queue_timeout_us
            lq.allow_timeout_override = True
            lq.max_queue_size = policy.max_queue_size
    if target in ("gpu", "gpu_fp16"):
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = "FP16" if target == "gpu_fp16" else "FP32"
        acc.parameters["max_workspace_size_bytes"] = "1073741824"
        acc.parameters["trt_engine_cache_enable"] = "1"
        acc.parameters["trt_engine_cache_path"] = "/tmp/triton_trt_cache"
    batch = min(8, policy.max_batch_size)
    warm = cfg.model_warmup.add(name=f"zeros_batch{batch}", batch_size=batch)
    warm.inputs[contract.INPUT_NAME].data_type = _dtype(contract.INPUT_TRITON_DTYPE)
    warm.inputs[contract.INPUT_NAME].dims.extend(contract.IMAGE_SHAPE)
    warm.inputs[contract.INPUT_NAME].zero_data = True
    for k, v in sorted(values.items()):
        cfg.parameters[k].string_value = v
    return cfg


def render(name: str, target: str, params: ServedParams, *, policy: BatchingPolicy | None = None,
           onnx_file: str = "model.onnx") -> str:
    """The ``config.pbtxt`` text of one model for one target."""
    return render_config(build(name, target, params, policy=policy, onnx_file=onnx_file), target=target)


def parameters(cfg: mc.ModelConfig) -> dict[str, str]:
    """A config's string parameters."""
    return {k: v.string_value for k, v in cfg.parameters.items()}


def write_model_dir(model_dir: Path, params: ServedParams, *, targets: tuple[str, ...], onnx_file: str = "model.onnx") -> list[Path]:
    """Write ``config.pbtxt`` (first target), ``configs/<target>.pbtxt`` (all) and ``labels.txt``.

    ``labels.txt`` is not written: with a single sigmoid output, Triton's
    classification extension would rank the one value and always answer index
    0 ("Normal"). Labels and threshold travel as parameters instead.
    """
    folder = ModelDir(Path(model_dir))
    (folder.path / "labels.txt").unlink(missing_ok=True)
    written = []
    for i, target in enumerate(targets):
        cfg = build(folder.name, target, params, onnx_file=onnx_file)
        if i == 0:
            written.append(folder.write_config(cfg, target=target))
        written.append(folder.write_config(cfg, target=target, config_name=target))
    return written

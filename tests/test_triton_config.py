"""Every shipped Triton config parses with tritonclient's model_config_pb2 and matches the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cxr.core import contract
from cxr.core.model_dir import ServedParams, config_as_dict, parse_config
from cxr.export import triton_config
from tests.conftest import SHIPPED_REPOSITORY

CONFIGS = sorted(SHIPPED_REPOSITORY.glob("*/config.pbtxt")) + sorted(SHIPPED_REPOSITORY.glob("*/configs/*.pbtxt"))


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _model_dir(path: Path) -> Path:
    return path.parent if path.name == "config.pbtxt" else path.parent.parent


def test_repository_has_models_and_configs() -> None:
    names = {p.parent.name for p in SHIPPED_REPOSITORY.glob("*/model_card.json")}
    assert {"pneumonia", "pneumonia_int8"} <= names
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(SHIPPED_REPOSITORY)))
def test_config_matches_contract(path: Path) -> None:
    cfg = _parse(path)
    assert cfg.name == _model_dir(path).name
    assert cfg.max_batch_size >= (4 if path.stem == "cpu_triage" else 16)  # the triage config keeps batches small
    assert [i.name for i in cfg.input] == [contract.INPUT_NAME]
    assert mc.DataType.Name(cfg.input[0].data_type) == f"TYPE_{contract.INPUT_TRITON_DTYPE}"
    assert list(cfg.input[0].dims) == list(contract.IMAGE_SHAPE)
    assert [o.name for o in cfg.output] == list(contract.OUTPUT_NAMES)
    assert mc.DataType.Name(cfg.output[0].data_type) == f"TYPE_{contract.OUTPUT_TRITON_DTYPE}"
    assert mc.DataType.Name(cfg.output[1].data_type) == f"TYPE_{contract.OOD_OUTPUT_TRITON_DTYPE}"
    assert list(cfg.output[0].dims) == list(contract.OUTPUT_SHAPE) == list(cfg.output[1].dims)
    assert cfg.HasField("dynamic_batching")
    db = cfg.dynamic_batching
    assert 0 < db.max_queue_delay_microseconds <= 20_000
    assert all(1 <= b <= cfg.max_batch_size for b in db.preferred_batch_size)
    qp = db.default_queue_policy
    assert qp.timeout_action == mc.ModelQueuePolicy.REJECT and qp.max_queue_size > 0 and qp.default_timeout_microseconds > 0
    assert len(cfg.model_warmup) >= 1
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    card = json.loads((_model_dir(path) / "model_card.json").read_text())
    assert float(params[contract.PARAM_THRESHOLD]) == pytest.approx(card["calibration"]["threshold"], abs=1e-6)
    assert params[contract.PARAM_LABELS].split(",") == list(contract.LABELS)
    assert params[contract.PARAM_SHA256] == card["sha256"]
    assert float(params[contract.PARAM_OOD_THRESHOLD]) == pytest.approx(card["ood"]["threshold"], rel=1e-7)
    served_rules = json.loads(params[contract.PARAM_ELIGIBILITY])
    assert served_rules == json.loads((_model_dir(path) / "eligibility.json").read_text())
    # No labels.txt: with one sigmoid output, Triton's classification extension would always answer index 0.
    assert not (_model_dir(path) / "labels.txt").exists() and not any(o.label_filename for o in cfg.output)


def test_targets_select_the_right_backends() -> None:
    fp32 = SHIPPED_REPOSITORY / "pneumonia"
    default = _parse(fp32 / "config.pbtxt")
    assert default.backend == "onnxruntime" and default.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    accel = default.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel[0].name == "tensorrt" and accel[0].parameters["precision_mode"] == "FP32"
    fp16 = _parse(fp32 / "configs" / "gpu_fp16.pbtxt")
    assert fp16.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP16"
    plan = _parse(fp32 / "configs" / "tensorrt_plan.pbtxt")
    assert plan.platform == "tensorrt_plan" and plan.default_model_filename == "model.plan"
    cpu = _parse(fp32 / "configs" / "cpu.pbtxt")
    assert cpu.backend == "python" and cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    int8 = _parse(SHIPPED_REPOSITORY / "pneumonia_int8" / "config.pbtxt")
    assert int8.backend == "onnxruntime" and int8.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_shipped_configs_are_what_the_generator_writes() -> None:
    """No hand edits drift from src/cxr/export/triton_config.py."""
    from cxr.export import repository

    for model, targets in (("pneumonia", ("gpu", "gpu_fp16", "tensorrt_plan", "cpu", "cpu_triage")),
                           ("pneumonia_int8", ("cpu_ort", "cpu", "cpu_triage"))):
        d = SHIPPED_REPOSITORY / model
        params = repository.served_params(d)
        for t in targets:
            assert (d / "configs" / f"{t}.pbtxt").read_text() == triton_config.render(model, t, params)
        assert (d / "config.pbtxt").read_text() == triton_config.render(model, targets[0], params)


def test_configs_round_trip_through_model_config_pb2() -> None:
    params = ServedParams(threshold=0.4, sha256="ab" * 32, ood_threshold=12.5,
                                        eligibility='{"schema": "x", "q": "it\'s \\"quoted\\""}')
    cfg = parse_config(triton_config.render("m", "cpu", params))
    got = triton_config.parameters(cfg)
    assert got[contract.PARAM_OOD_THRESHOLD] == "12.5" and json.loads(got[contract.PARAM_ELIGIBILITY])["q"] == 'it\'s "quoted"'
    # one codec both ways: what the builder writes, the client reads back as the same numbers and text
    back = ServedParams.from_parameters(config_as_dict(cfg)["parameters"])
    assert back == params
    odd = ServedParams(threshold=0.029912345678901234, sha256="cd" * 32, ood_threshold=35.07123456789)
    assert ServedParams.from_parameters(odd.as_parameters()) == odd  # no digit lost on the way
    with pytest.raises(ValueError):
        ServedParams(threshold=1.5, sha256="x")


def test_batching_policy_validation() -> None:
    with pytest.raises(ValueError):
        triton_config.BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(ValueError):
        triton_config.render("m", "nope", ServedParams(threshold=0.5, sha256="x"))


def test_cpu_config_keeps_the_dynamic_batcher_awake() -> None:
    """The 500 ms stalls: Triton 2.51's dynamic batcher wakes its thread on enqueue only when a payload slot is free
    and the queue has reached the next preferred batch size; otherwise a request can wait out the batcher's 500 ms
    idle timeout. The CPU configs remove both preconditions (measured by `cxr bench`: stalls_per_1000)."""
    for model in ("pneumonia", "pneumonia_int8"):
        cfg = _parse(SHIPPED_REPOSITORY / model / "configs" / "cpu.pbtxt")
        assert sum(g.count for g in cfg.instance_group) >= 2
        assert list(cfg.dynamic_batching.preferred_batch_size) == []
    assert triton_config.LEGACY_CPU_POLICY.instances == 1  # kept only for the side-by-side bench


def test_every_config_has_priority_levels_with_a_queue_policy_each() -> None:
    """urgent (1) is batched before routine (2); no priority means routine; late routine work is delayed, not
    dropped; a full queue rejects at once (UNAVAILABLE, which clients retry)."""
    for config in sorted(SHIPPED_REPOSITORY.glob("*/config*.pbtxt")) + sorted(SHIPPED_REPOSITORY.glob("*/configs/*.pbtxt")):
        db = parse_config(config.read_text()).dynamic_batching
        assert db.priority_levels == 2 and db.default_priority_level == contract.PRIORITIES["routine"], config
        assert set(db.priority_queue_policy) == {1, 2}, config
        urgent, routine = db.priority_queue_policy[1], db.priority_queue_policy[2]
        assert urgent.default_timeout_microseconds == 0  # an urgent request never times out in the queue
        assert routine.timeout_action == mc.ModelQueuePolicy.DELAY and routine.max_queue_size > 0
    off = triton_config.build("m", "cpu", ServedParams(threshold=0.4, sha256="ab" * 32),
                              policy=triton_config.BatchingPolicy(priorities=False))
    assert off.dynamic_batching.priority_levels == 0
    with pytest.raises(ValueError, match="priority"):
        contract.priority_level("stat")

"""The client's logic with a cheap fake transport: partial failures stay partial, retries, statuses."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.client import PneumoniaClient, RetryPolicy
from cxr.client.transport import ModelInfo, Scores, Transport, classify_error
from cxr.core import contract
from cxr.core.errors import InvalidInputError, RetryableServerError, ServerError


class FakeTransport(Transport):
    """Answers p = mean pixel / 255 and ood = 1; fails every call whose batch holds a 'poisoned' image."""

    def __init__(self, *, fail_with: Exception | None = None, ood_threshold: float | None = 5.0) -> None:
        self.info = ModelInfo("fake", "1", 64, 0.5, contract.LABELS, "", ood_threshold, "")
        self.fail_with = fail_with
        self.calls = 0

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        self.calls += 1
        if self.fail_with is not None and (batch[:, 0, 0, 0] == 7).any():
            raise self.fail_with
        p = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
        return Scores(p.astype(np.float32), np.where(batch[:, 0, 1, 0] == 9, 99.0, 1.0).astype(np.float32))

    def ready(self) -> bool:
        return True


def _img(level: int, *, poison: bool = False, ood: bool = False) -> np.ndarray:
    """A 224x224 image (no resize, so marker pixels reach the fake transport as they are)."""
    rng = np.random.default_rng(level)
    a = np.clip(rng.normal(level, 40, (224, 224)), 0, 255).astype(np.uint8)
    if poison:
        a[0, 0] = 7
    if ood:
        a[0, 1] = 9
    return a


@pytest.mark.parametrize("failure", [RetryableServerError("grpc: UNAVAILABLE: down"), ServerError("grpc: INTERNAL: boom")])
def test_one_failed_chunk_fails_alone(failure: Exception) -> None:
    fake = FakeTransport(fail_with=failure)
    images = [_img(60 + i) for i in range(9)]
    images[4] = _img(64, poison=True)
    with PneumoniaClient(transport=fake, batch_size=3, retry=RetryPolicy(attempts=2, backoff_s=0.0)) as c:
        preds = c.predict(images)
    statuses = [p.status for p in preds]
    assert statuses[3:6] == [contract.Status.ERROR] * 3  # the chunk holding the poisoned image
    assert statuses[:3] + statuses[6:] == [contract.Status.OK] * 6  # every other chunk keeps its answers
    assert all(p.retryable and "inference failed" in (p.reason or "") for p in preds[3:6])
    attempts = 2 if isinstance(failure, RetryableServerError) else 1  # a server error is retried by a rerun, not here
    assert fake.calls == 2 + attempts


def test_input_errors_are_final_and_not_retried() -> None:
    fake = FakeTransport(fail_with=InvalidInputError("grpc: INVALID_ARGUMENT: bad"))
    img = _img(90, poison=True)
    with PneumoniaClient(transport=fake, retry=RetryPolicy(attempts=3, backoff_s=0.0)) as c:
        [pred] = c.predict([img])
    assert pred.status is contract.Status.ERROR and not pred.retryable and fake.calls == 1


def test_ood_score_above_the_served_threshold_is_not_assessable() -> None:
    fake = FakeTransport()
    ood = _img(120, ood=True)
    with PneumoniaClient(transport=fake) as c:
        ok, na = c.predict([_img(200), ood])
    assert ok.status is contract.Status.OK and ok.label == "Pneumonia" and ok.ood_score == 1.0
    assert na.status is contract.Status.NOT_ASSESSABLE and na.label is None and na.probability is None
    assert "(out_of_distribution)" in (na.reason or "") and na.ood_score == 99.0 and na.rule == "out_of_distribution"


def test_model_without_ood_output_answers_without_the_rule() -> None:
    fake = FakeTransport(ood_threshold=None)
    with PneumoniaClient(transport=fake) as c:
        [p] = c.predict([_img(30)])
    assert p.status is contract.Status.OK and p.label == "Normal"


class _Status(Exception):
    def __init__(self, status: str) -> None:
        super().__init__("some message that must not matter")
        self._status = status

    def status(self) -> str:
        return self._status


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_Status("StatusCode.UNAVAILABLE"), RetryableServerError),
        (_Status("StatusCode.DEADLINE_EXCEEDED"), RetryableServerError),
        (_Status("StatusCode.RESOURCE_EXHAUSTED"), RetryableServerError),
        (_Status("StatusCode.INVALID_ARGUMENT"), InvalidInputError),
        (_Status("StatusCode.INTERNAL"), ServerError),
        (_Status("StatusCode.NOT_FOUND"), ServerError),
        (_Status("503"), RetryableServerError),
        (_Status("429"), RetryableServerError),
        (_Status("400"), InvalidInputError),
        (_Status("500"), ServerError),
        (ConnectionRefusedError("refused"), RetryableServerError),
        (TimeoutError("timed out"), RetryableServerError),
        (RuntimeError("unavailable deadline timeout"), ServerError),  # words in a message decide nothing
    ],
)
def test_errors_are_classified_by_status_code(exc: Exception, kind: type) -> None:
    got = classify_error(exc, "where")
    assert type(got) is kind and str(got).startswith("where: ")


class _Replica(FakeTransport):
    def __init__(self, name: str, log: list) -> None:  # type: ignore[type-arg]
        super().__init__()
        self.info = ModelInfo("fake", "1", 64, 0.5, contract.LABELS, "sha", 5.0, "")
        self.name, self.log, self.down = name, log, False

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        if self.down:
            raise RetryableServerError(f"{self.name}: UNAVAILABLE")
        self.log.append(self.name)
        return super().infer(batch, timeout_s=timeout_s)

    def ready(self) -> bool:
        return not self.down


def test_fleet_spreads_load_fails_over_and_probes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from cxr.client import fleet

    log: list[str] = []
    replicas = {u: _Replica(u, log) for u in ("a:1", "b:1", "c:1")}
    f = fleet.FleetTransport(list(replicas), lambda u: replicas[u])
    x = np.zeros((2, *contract.IMAGE_SHAPE), np.uint8)
    for _ in range(6):
        f.infer(x, timeout_s=1)
    assert sorted(set(log)) == ["a:1", "b:1", "c:1"]  # least-loaded, least recently used: all three serve
    replicas["b:1"].down = True
    log.clear()
    for _ in range(6):
        f.infer(x, timeout_s=1)  # the request that hit b is retried elsewhere: no error reaches the caller
    assert "b:1" not in log and len(log) == 6
    assert not f.replicas[1].healthy
    replicas["b:1"].down = False
    monkeypatch.setattr(fleet.time, "monotonic", lambda: 1e12)  # the cooldown has passed
    log.clear()
    for _ in range(6):
        f.infer(x, timeout_s=1)
    assert "b:1" in log and f.replicas[1].healthy  # probed back in


def test_fleet_refuses_replicas_serving_different_models() -> None:
    from cxr.client import fleet

    a, b = FakeTransport(), FakeTransport()
    a.info = ModelInfo("fake", "1", 64, 0.5, contract.LABELS, "sha-1", 5.0, "")
    b.info = ModelInfo("fake", "1", 64, 0.5, contract.LABELS, "sha-2", 5.0, "")
    with pytest.raises(ServerError, match="same model"):
        fleet.FleetTransport(["a:1", "b:1"], {"a:1": a, "b:1": b}.__getitem__)
    all_down = {"a:1": _Replica("a", []), "b:1": _Replica("b", [])}
    for r in all_down.values():
        r.down = True
    f = fleet.FleetTransport(list(all_down), all_down.__getitem__)
    with pytest.raises(RetryableServerError, match="no healthy replica"):
        f.infer(np.zeros((1, *contract.IMAGE_SHAPE), np.uint8), timeout_s=1)


def test_ray_preprocessing_refuses_what_the_client_refuses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The Ray tasks and the client share one `prepare`, under the same (here: a site's stricter) rules."""
    import json

    from cxr.client.ray_batch import PENDING, _preprocess, _refusal_of
    from cxr.core.eligibility import Eligibility, default_text
    from tests.test_dicom import _ramp, make_dicom

    rules = json.loads(default_text())
    rules["conditions"]["Modality"]["allowed"] = ["CR"]  # this site accepts CR only
    strict = Eligibility.from_json(json.dumps(rules))
    dx = tmp_path / "dx.dcm"
    dx.write_bytes(make_dicom(_ramp()))  # a DX instance: eligible by default
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    paths = np.array([str(dx), str(text)])
    default = _preprocess({"path": paths, "sha256": np.array(["a", "b"])})
    site = _preprocess({"path": paths, "sha256": np.array(["a", "b"])}, eligibility=strict)
    assert list(default["status"]) == [PENDING, contract.Status.ERROR.value]
    assert list(site["status"]) == [contract.Status.NOT_ASSESSABLE.value, contract.Status.ERROR.value]
    refusal = _refusal_of(site["refusal"][0])
    assert refusal == contract.Refusal("dicom_modality", "DX", "CR", refusal.detail) and "Modality" in site["reason"][0]

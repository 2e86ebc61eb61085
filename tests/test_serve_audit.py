"""`cxr serve --audit-log`: the start, the served models and every change of them are on the trail."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from cxr.core.audit_trail import AuditLog, verify
from cxr.serving.service import ServedModelsAudit
from tests.conftest import SHIPPED_REPOSITORY


class _FakeServer:
    def __init__(self) -> None:
        self.config = SimpleNamespace(http_url="127.0.0.1:8000", grpc_url="127.0.0.1:8001", admin_key_file=None)
        self.states = {"pneumonia": ("1", "READY")}
        self.up = True

    def model_states(self) -> dict[str, tuple[str, str]]:
        return dict(self.states)

    def running(self) -> bool:
        return self.up


def test_the_served_models_and_their_changes_are_audited(tmp_path: Path) -> None:
    now = [0.0]
    server, trail = _FakeServer(), tmp_path / "audit.jsonl"
    with AuditLog(trail, component="cxr serve") as log:
        watch = ServedModelsAudit(server, log, "me", SHIPPED_REPOSITORY, every_s=5.0,  # type: ignore[arg-type]
                                  clock=lambda: now[0])
        watch.start()
        server.states = {"pneumonia": ("1", "UNAVAILABLE"), "other": ("2", "READY")}
        assert watch.alive()  # too soon: the index is not read again
        now[0] = 5.0
        assert watch.alive()
        server.states = {}  # a failed read of the index is not every model unloaded
        now[0] = 10.0
        server.up = False
        assert not watch.alive()
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [r["event"] for r in records] == ["started", "model_changed", "admin_api", "model_changed", "admin_api",
                                             "model_changed"]
    shipped = json.loads((SHIPPED_REPOSITORY / "pneumonia" / "model_card.json").read_text())["sha256"]
    assert records[1]["model_sha256"] == shipped and records[1]["detail"]["state"] == "READY"
    assert {r["detail"]["model"] for r in records[2:]} == {"other", "pneumonia"}
    assert verify(trail).ok

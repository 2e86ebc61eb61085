"""The audit trail: a hash chain that `cxr audit-log verify` checks, one chain across processes, no PHI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.core.audit_trail import (
    GENESIS,
    AuditChainError,
    AuditLog,
    AuditRecord,
    Verification,
    read,
    record_hash,
    verify,
)
from tests.conftest import cxr, wait_until

SHA = "ab" * 32


def _trail(path: Path, n: int = 6) -> list[str]:
    with AuditLog(path, component="test") as log:
        log.event("started", actor="process:test:1")
        for i in range(n - 1):
            log.event("screened", actor="ae:ORTHANC", study_uid="1.2.3", instance_uid=f"1.2.3.{i}", model_sha256=SHA,
                      status="ok", probability=0.125 * i)
    return path.read_text().splitlines()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return cxr("audit-log", *args, timeout=120)


def test_records_chain_and_carry_what_was_asked(tmp_path: Path) -> None:
    lines = _trail(tmp_path / "a.jsonl")
    recs = [json.loads(x) for x in lines]
    assert [r["seq"] for r in recs] == list(range(1, 7)) and recs[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:]))
    assert recs[3]["detail"] == {"probability": 0.25, "status": "ok"} and recs[3]["actor"] == "ae:ORTHANC"
    v = verify(tmp_path / "a.jsonl")
    assert v.ok and v.records == 6 and v.last_hash == recs[-1]["hash"]
    with AuditLog(tmp_path / "a.jsonl", component="test") as log:  # reopened: the chain continues
        log.event("stopped", actor="process:test:1")
    assert verify(tmp_path / "a.jsonl").records == 7 and read(tmp_path / "a.jsonl")[-1]["prev"] == recs[-1]["hash"]


@pytest.mark.parametrize("damage", ["edit", "edit_last", "delete", "delete_first", "insert", "swap"])
def test_verify_fails_on_an_edited_deleted_inserted_or_reordered_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "a.jsonl"
    lines = _trail(path)
    if damage == "edit":  # the answer of line 3 changed after the fact
        rec = json.loads(lines[2])
        rec["detail"]["status"] = "not_assessable"
        lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    elif damage == "edit_last":
        lines[-1] = lines[-1].replace('"ae:ORTHANC"', '"ae:OTHER"')
    elif damage == "delete":
        del lines[3]
    elif damage == "delete_first":
        del lines[0]
    elif damage == "insert":
        lines.insert(2, lines[1])
    else:
        lines[2], lines[3] = lines[3], lines[2]
    path.write_text("\n".join(lines) + "\n")
    v = verify(path)
    assert not v.ok and v.broken_at is not None
    r = _cli("verify", str(path))
    assert r.returncode == 3 and f"line {v.broken_at}" in r.stderr and r.stderr.count("\n") == 1


def test_verify_cli_on_a_good_trail_and_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _trail(path)
    r = _cli("verify", str(path))
    last = json.loads(lines[-1])["hash"]
    assert r.returncode == 0 and "6 records" in r.stdout and last in r.stdout
    # a removed tail is only visible against the last hash filed elsewhere
    path.write_text("\n".join(lines[:-2]) + "\n")
    assert _cli("verify", str(path)).returncode == 0
    r = _cli("verify", str(path), "--last-hash", last)
    assert r.returncode == 3 and "tail" in r.stderr
    assert _cli("verify", str(tmp_path / "missing.jsonl")).returncode == 2


def test_a_torn_last_line_is_cut_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _trail(path, 3)
    with path.open("a") as f:
        f.write('{"seq":4,"event":"scre')  # a crash mid-write
    with AuditLog(path, component="test") as log:
        log.event("stopped", actor="process:test:1")
    v = verify(path)
    assert v.ok and v.records == 4


def test_two_processes_append_to_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    code = ("import sys; from cxr.core.audit_trail import AuditLog\n"
            "log = AuditLog(sys.argv[1], component=sys.argv[2])\n"
            "[log.event('screened', actor='process:'+sys.argv[2], instance_uid=f'1.2.{i}') for i in range(40)]\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    v = verify(path)
    assert v.ok and v.records == 120
    assert {r["component"] for r in read(path)} == {"a", "b", "c"}


def test_records_refuse_unknown_events_and_patient_data() -> None:
    with pytest.raises(ValueError, match="unknown audit event"):
        AuditRecord("looked_at", "user:x")
    with pytest.raises(ValueError, match="patient data"):
        AuditRecord("screened", "user:x", detail={"PatientName": "Doe^Jane"})
    with pytest.raises(ValueError, match="actor"):
        AuditRecord("screened", "")


def test_export_as_fhir_audit_events(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = _trail(path, 3)
    r = _cli("export", str(path), "--fhir-out", str(tmp_path / "ae.json"))
    assert r.returncode == 0, r.stderr
    bundle = json.loads((tmp_path / "ae.json").read_text())
    events = [e["resource"] for e in bundle["entry"]]
    assert [e["resourceType"] for e in events] == ["AuditEvent"] * 3
    assert events[0]["subtype"][0]["code"] == "started" and events[1]["agent"][0]["who"]["display"] == "ae:ORTHANC"
    ids = [ent["what"]["identifier"]["value"] for ent in events[2]["entity"]]
    assert "urn:oid:1.2.3" in ids and SHA in ids and json.loads(lines[2])["hash"] in ids
    path.write_text("\n".join(lines[1:]) + "\n")  # a broken chain is not exported
    r = _cli("export", str(path), "--fhir-out", str(tmp_path / "ae2.json"))
    assert r.returncode == 3 and not (tmp_path / "ae2.json").exists()


def test_the_page_records_the_signed_in_user_and_the_file_hash_never_its_name(tmp_path: Path) -> None:
    """The screening page's Submit handler with an audit trail (embedded model, no browser needed)."""
    import shutil

    from cxr.client import PneumoniaClient
    from cxr.client.batch import file_sha256
    from cxr.ui import make_classifier
    from tests.conftest import REPO

    upload = tmp_path / "Doe_Jane_chest.jpeg"  # an upload's name can carry PHI
    shutil.copy(REPO / "examples" / "NORMAL" / "IM-0117-0001.jpeg", upload)
    sha = file_sha256(upload)
    with PneumoniaClient(protocol="embedded") as client, AuditLog(tmp_path / "a.jsonl", component="cxr ui") as log:
        classify = make_classifier(client, None, tmp_path, audit=log)
        html, _, rows, _ = classify([str(upload)], "alice")
    assert rows[0][1] == "ok" and rows[0][2] in ("Normal", "Pneumonia") and "cxr-answer" in html
    recs = read(tmp_path / "a.jsonl")
    assert [r["event"] for r in recs] == ["received", "screened"]
    assert {r["actor"] for r in recs} == {"user:alice"} and {r["instance_uid"] for r in recs} == {f"sha256:{sha}"}
    assert "Doe" not in (tmp_path / "a.jsonl").read_text()


@pytest.mark.slow
def test_serve_records_its_models_and_a_change_through_the_repository_api(tmp_path: Path) -> None:
    """`cxr serve --audit-log`: start, the served model with its sha256, an unload through the repository API seen
    as admin_api + model_changed, stop; the chain holds."""
    import signal
    import urllib.request

    from cxr.core.model_dir import ModelDir
    from tests.conftest import SHIPPED_REPOSITORY, start_cxr_serve

    trail = tmp_path / "serve.jsonl"
    proc, h = start_cxr_serve("--audit-log", str(trail))
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{h}/v2/repository/models/pneumonia/unload", data=b"{}",
                                     method="POST")
        urllib.request.urlopen(req, timeout=60).read()
        # the serve loop looks at the repository index every 5 s
        wait_until(lambda: any(r["event"] == "admin_api" for r in read(trail)), 60, "the admin_api record")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert verify(trail).ok
    recs = read(trail)
    events = [r["event"] for r in recs]
    assert events[0] == "started" and events[-1] == "stopped" and "admin_api" in events
    changes = [r for r in recs if r["event"] == "model_changed"]
    sha = ModelDir(SHIPPED_REPOSITORY / "pneumonia").card().sha256
    assert changes[0]["detail"]["state"] == "READY" and changes[0]["model_sha256"] == sha
    assert changes[-1]["detail"]["state"] == "UNAVAILABLE"


def test_every_event_exports_with_its_own_dicom_code(tmp_path: Path) -> None:
    from cxr.core.audit_trail import EVENTS, AuditLog, read
    from cxr.doors.fhir import AUDIT_TYPES, audit_events

    assert set(AUDIT_TYPES) == set(EVENTS)  # a new event cannot break the export
    path = tmp_path / "a.jsonl"
    with AuditLog(path, component="test") as log:
        log.event("model_changed", actor="process:h:1", model_sha256=SHA)
        log.event("dropped", actor="ae:ORTHANC", study_uid="1.2.3", instance_uid="1.2.3.4", why="sop_class")
        log.event("refused", actor="ae:STRANGER", outcome="failure", why="calling_ae")
        log.event("stopped", actor="process:h:1")
    types = [(e["resource"]["type"]["code"], e["resource"]["type"]["display"]) for e in audit_events(read(path))["entry"]]
    assert types == [("110131", "Software Configuration"), ("110107", "Import"), ("110126", "Node Authentication"),
                     ("110121", "Application Stop")]


# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


def _chain(path: Path, n: int = 4) -> list[dict]:
    with AuditLog(path, component="test") as log:
        return [log.event("screened", actor="ae:MODALITY", instance_uid=f"1.2.{i}", status="ok") for i in range(n)]


def _line(rec: dict) -> str:
    rec = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = record_hash(rec)
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


# guards cxr.core.audit_trail: verify: the line and the reason of each kind of break
def test_verify_says_exactly_where_and_why_the_chain_breaks(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    recs = _chain(path)
    good = path.read_text().splitlines()
    h = [r["hash"] for r in recs]

    def check(lines: list[str], expected: Verification, **kw: str) -> None:
        path.write_text("\n".join(lines) + "\n")
        assert verify(path, **kw) == expected

    check(good, Verification(True, 4, h[3]))
    check([*good[:2], "{not json", *good[2:]], Verification(False, 2, h[1], 3, "line 3 is not a JSON record"))
    check([*good[:2], "[1, 2]"], Verification(False, 2, h[1], 3, "line 3 does not carry the hash of line 2 (a line "
                                                                  "before it was edited, inserted or deleted)"))
    check(good[1:], Verification(False, 0, GENESIS, 1, "line 1 does not start the chain (the trail's first lines "
                                                         "were deleted)"))
    check([good[0], good[2]], Verification(False, 1, h[0], 2, "line 2 does not carry the hash of line 1 (a line "
                                                                "before it was edited, inserted or deleted)"))
    edited = good[1].replace("1.2.1", "1.2.9")
    check([good[0], edited], Verification(False, 1, h[0], 2, "line 2 was edited (its content does not match its hash)"))
    check([good[0], _line({**recs[1], "seq": 7})],
          Verification(False, 1, h[0], 2, "line 2 has sequence number 7, expected 2"))
    check([good[0], _line({**recs[1], "event": "coffee"})],
          Verification(False, 1, h[0], 2, "line 2 has an unknown event 'coffee'"))
    check(good[:2], Verification(False, 2, h[1], None, "the last record is not the one filed (the trail's tail was "
                                                         "removed or replaced)"), expect_last_hash=h[3])
    check(good, Verification(True, 4, h[3]), expect_last_hash=h[3])


# guards cxr.core.audit_trail: verify/read: their AuditChainError messages
def test_an_unreadable_trail_and_a_broken_read_say_so_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(AuditChainError, match=rf"^{missing}: cannot read the audit trail \(FileNotFoundError\)$"):
        verify(missing)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(AuditChainError, match=r"cannot read the audit trail \(UnicodeDecodeError\)$"):
        verify(path)
    path = tmp_path / "b.jsonl"
    _chain(path, 2)
    assert [r["instance_uid"] for r in read(path)] == ["1.2.0", "1.2.1"]
    path.write_text(path.read_text().splitlines()[1] + "\n")
    with pytest.raises(AuditChainError, match=rf"^{path}: line 1 does not start the chain"):
        read(path)


# guards cxr.core.audit_trail: AuditRecord: credential redaction and field checks
def test_audit_records_redact_url_credentials_and_refuse_bad_fields(tmp_path: Path) -> None:
    rec = AuditRecord("result_delivered", "cert:https://u:pw@ris.example/x", detail={"to": "https://u:pw@pacs/x"})
    assert rec.actor == "cert:https://***@ris.example/x" and rec.detail == {"to": "https://***@pacs/x"}
    plain = AuditRecord("received", "ae:A", detail={"n": 1, "path": "/data/x"})
    assert plain.actor == "ae:A" and plain.detail == {"n": 1, "path": "/data/x"}
    with pytest.raises(ValueError, match=r"^unknown audit event 'x' \(one of received, screened, "):
        AuditRecord("x", "ae:A")
    with pytest.raises(ValueError, match=r"^outcome must be one of \('success', 'failure'\), got 'maybe'$"):
        AuditRecord("received", "ae:A", outcome="maybe")
    with pytest.raises(ValueError, match="^an audit record needs its actor$"):
        AuditRecord("received", "")
    with pytest.raises(ValueError, match=r"^audit detail must not carry patient data \(PatientID, name\)$"):
        AuditRecord("received", "ae:A", detail={"name": "x", "PatientID": "1"})
    with AuditLog(tmp_path / "a.jsonl", component="cxr listen") as log:
        out = log.event("received", actor="ae:A")
    assert out["component"] == "cxr listen"
    assert (out["outcome"], out["study_uid"], out["instance_uid"], out["model_sha256"], out["detail"]) == (
        "success", "", "", "", {})


"""Exactly once across crashes: ``cxr listen`` killed at every step of finishing an instance (after the answer is
recorded, after the CSV row, after the audit record, after the outbox write, after the done marker, after the
PACS confirmed the SR, after the delivered marker), restarted and sent everything again, leaves one SR per
instance at the PACS, one CSV row and one `screened` and one `result_delivered` audit record per key."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from cxr.serving.server import free_ports
from tests.conftest import REPO, SHIPPED_REPOSITORY, StubPacs, wait_until
from tests.listen_crash import CRASHED, STEPS
from tests.test_pacs import chest_dx, echo, spool_idle

pytestmark = pytest.mark.slow


def _listen(cmd: list[str], log: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: echo(port), 90, "cxr listen to answer C-ECHO", proc=proc, log=log, every_s=0.3)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc


def _send(port: int, films: list[pydicom.Dataset]) -> int:
    """C-STORE the films in one association, as a PACS would; a listener that dies mid-association ends it. How
    many the listener accepted."""
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="ORTHANC")
    ae.requested_contexts = StoragePresentationContexts[:120]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
    if not assoc.is_established:
        return 0
    accepted = 0
    try:
        for ds in films:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            accepted += bool(status) and int(getattr(status, "Status", -1)) == 0
    finally:
        if assoc.is_established:
            assoc.release()
    return accepted


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_each_step_of_finishing_leaves_one_sr_one_row_one_record(step: str, tmp_path: Path) -> None:
    from cxr.core.audit_trail import read

    pacs = StubPacs()
    port = free_ports(1)[0]
    spool, out, audit = tmp_path / "spool", tmp_path / "results.csv", tmp_path / "audit.jsonl"
    ndjson = tmp_path / "fhir.ndjson"
    args = ["--port", str(port), "--spool", str(spool), "--out", str(out), "--url", str(SHIPPED_REPOSITORY),
            "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--audit-log", str(audit), "--allow", "ORTHANC",
            "--fhir-out", str(ndjson)]
    films = [pydicom.dcmread(io.BytesIO(chest_dx(80 + i))) for i in range(2)]
    try:
        crashing = _listen([sys.executable, str(REPO / "tests" / "listen_crash.py"), step, *args],
                           tmp_path / "crash.log", port)
        try:
            _send(port, films)
            assert crashing.wait(timeout=120) == CRASHED, (tmp_path / "crash.log").read_text()[-3000:]
        finally:
            if crashing.poll() is None:
                crashing.kill()
                crashing.wait(timeout=30)
        listener = _listen([sys.executable, "-m", "cxr.cli", "listen", *args], tmp_path / "listen.log", port)
        try:
            _send(port, films)  # the PACS sends everything again
            wait_until(lambda: len(set(pacs.stored)) == len(films) and spool_idle(spool), 180)
        finally:
            listener.terminate()
            listener.wait(timeout=60)
    finally:
        pacs.stop()
    # one SR per instance at the PACS; a copy sent again after a crash before its delivered marker is the same SR
    by_uid: dict[str, set[str]] = {}
    for uid, digest in pacs.got:
        by_uid.setdefault(uid, set()).add(digest)
    assert len(by_uid) == len(films) and all(len(d) == 1 for d in by_uid.values()), by_uid
    if step != "delivery":  # only a crash between the PACS's confirmation and the marker sends a result twice
        assert len(pacs.got) == len(films), pacs.got
    rows = Counter(r["sop_instance_uid"] for r in csv.DictReader(out.open()))
    assert rows == Counter({str(f.SOPInstanceUID): 1 for f in films})
    records = read(audit)  # the chain holds
    screened = Counter(r["instance_uid"] for r in records if r["event"] == "screened")
    assert screened == Counter({str(f.SOPInstanceUID): 1 for f in films})
    delivered = Counter(r["instance_uid"] for r in records if r["event"] == "result_delivered")
    assert delivered == Counter(dict.fromkeys(by_uid, 1))
    assert not list((spool / "screened").iterdir())  # every record finished and cleared
    lines = [json.loads(line) for line in ndjson.read_text().splitlines()]  # one FHIR Bundle line per instance
    reports = [i["value"] for b in lines for e in b["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
               for i in e["resource"]["identifier"] if i.get("system") == "urn:cxr-triton:result"]
    assert len(lines) == len(films) and len(set(reports)) == len(films), reports


@pytest.mark.parametrize("step", [s for s in STEPS if s != "done"])  # a study's films are cleared with its folder
def test_a_crash_while_answering_a_study_leaves_one_study_sr(step: str, tmp_path: Path) -> None:
    """--study-quiet-s: the same crashes while a study of two films is answered; one study SR reaches the PACS,
    one row per film, one `screened` record per film and one for the study."""
    from cxr.core.audit_trail import read

    pacs = StubPacs()
    port = free_ports(1)[0]
    spool, out, audit = tmp_path / "spool", tmp_path / "results.csv", tmp_path / "audit.jsonl"
    args = ["--port", str(port), "--spool", str(spool), "--out", str(out), "--url", str(SHIPPED_REPOSITORY),
            "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--audit-log", str(audit), "--allow", "ORTHANC",
            "--study-quiet-s", "0.5"]
    study = pydicom.uid.generate_uid(entropy_srcs=["crash-study", step])
    films = [pydicom.dcmread(io.BytesIO(chest_dx(90 + i, study=study))) for i in range(2)]
    for i, f in enumerate(films):
        f.InstanceNumber = i + 1
    try:
        crashing = _listen([sys.executable, str(REPO / "tests" / "listen_crash.py"), step, *args],
                           tmp_path / "crash.log", port)
        try:
            _send(port, films)
            assert crashing.wait(timeout=120) == CRASHED, (tmp_path / "crash.log").read_text()[-3000:]
        finally:
            if crashing.poll() is None:
                crashing.kill()
                crashing.wait(timeout=30)
        listener = _listen([sys.executable, "-m", "cxr.cli", "listen", *args], tmp_path / "listen.log", port)
        try:
            _send(port, films)
            wait_until(lambda: len(set(pacs.stored)) == 1 and spool_idle(spool), 180)
        finally:
            listener.terminate()
            listener.wait(timeout=60)
    finally:
        pacs.stop()
    by_uid: dict[str, set[str]] = {}
    for uid, digest in pacs.got:
        by_uid.setdefault(uid, set()).add(digest)
    assert len(by_uid) == 1 and all(len(d) == 1 for d in by_uid.values()), by_uid  # one study SR
    rows = Counter(r["sop_instance_uid"] for r in csv.DictReader(out.open()))
    assert rows == Counter({str(f.SOPInstanceUID): 1 for f in films})
    records = read(audit)
    screened = Counter(r["instance_uid"] or r["study_uid"] for r in records if r["event"] == "screened")
    assert screened == Counter({**{str(f.SOPInstanceUID): 1 for f in films}, study: 1})
    assert Counter(r["instance_uid"] for r in records if r["event"] == "result_delivered") == Counter(
        dict.fromkeys(by_uid, 1))


def test_three_sigkills_during_a_burst_then_everything_sent_again_one_sr_each(tmp_path: Path) -> None:
    """The issue's measurement: a burst of 150 instances (one association each), the listener SIGKILLed three
    times while it screens and delivers, restarted each time, and everything sent again at the end: one SR per
    instance at the PACS (a copy sent again is the same SR), one row and one record of each kind per key."""
    import signal

    from cxr.core.audit_trail import read

    pacs = StubPacs()
    port = free_ports(1)[0]
    spool, out, audit = tmp_path / "spool", tmp_path / "results.csv", tmp_path / "audit.jsonl"
    args = ["--port", str(port), "--spool", str(spool), "--out", str(out), "--url", str(SHIPPED_REPOSITORY),
            "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--audit-log", str(audit), "--allow", "ORTHANC"]
    films = [pydicom.dcmread(io.BytesIO(chest_dx(300 + i))) for i in range(150)]
    done = threading.Event()

    def burst() -> None:
        """Each film until the listener accepts it (a PACS retries), one association each, until told to stop."""
        for f in films:
            while not done.is_set():
                try:
                    if _send(port, [f]):
                        break
                except Exception:  # noqa: BLE001 - the listener was killed mid-association
                    pass
                done.wait(0.2)  # the listener is down: try again shortly

    def rows() -> int:
        return len(out.read_text().splitlines()) - 1 if out.exists() else 0

    sender = threading.Thread(target=burst)
    try:
        for kill in range(3):
            listener = _listen([sys.executable, "-m", "cxr.cli", "listen", *args], tmp_path / f"listen-{kill}.log",
                               port)
            if kill == 0:
                sender.start()
            before = rows()
            try:
                wait_until(lambda before=before: rows() >= min(before + 10, len(films)), 180)
            finally:
                listener.send_signal(signal.SIGKILL)
                listener.wait(timeout=30)
        done.set()
        sender.join(timeout=300)
        listener = _listen([sys.executable, "-m", "cxr.cli", "listen", *args], tmp_path / "listen-last.log", port)
        try:
            for i in range(0, len(films), 10):  # everything sent again
                _send(port, films[i : i + 10])
            wait_until(lambda: len(set(pacs.stored)) == len(films) and spool_idle(spool), 600)
        finally:
            listener.terminate()
            listener.wait(timeout=60)
    finally:
        done.set()
        pacs.stop()
    by_uid: dict[str, set[str]] = {}
    for uid, digest in pacs.got:
        by_uid.setdefault(uid, set()).add(digest)
    assert len(by_uid) == len(films) and all(len(d) == 1 for d in by_uid.values())
    assert len(pacs.got) <= len(films) + 3  # only a kill between the PACS's answer and the marker sends one again
    uids = {str(f.SOPInstanceUID) for f in films}
    assert Counter(r["sop_instance_uid"] for r in csv.DictReader(out.open())) == Counter(dict.fromkeys(uids, 1))
    records = read(audit)
    assert Counter(r["instance_uid"] for r in records if r["event"] == "screened") == Counter(dict.fromkeys(uids, 1))
    assert Counter(r["instance_uid"] for r in records if r["event"] == "result_delivered") == Counter(
        dict.fromkeys(by_uid, 1))

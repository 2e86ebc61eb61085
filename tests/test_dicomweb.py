"""DICOMweb against Orthanc with Debian's DICOMweb plugin: QIDO/WADO in `cxr predict`, STOW-RS out of `cxr listen`,
urgent studies first, and a listener's audit trail and FHIR results. The fast tests at the end need no server."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from cxr.core.audit_trail import read, verify
from cxr.doors import fhir
from cxr.doors.dicom.intake import UrgentRule, study_priority
from cxr.doors.dicom.spool import Spool
from cxr.doors.dicom.sr import read_sr
from cxr.serving.server import free_ports
from tests.conftest import LoopbackHttp, StubHandler, cxr, journal_rows, wait_until
from tests.test_pacs import Orthanc, chest_dx, start_listener


def _rows(path: Path) -> dict[str, dict]:
    with path.open(newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def _predict(*args: str) -> subprocess.CompletedProcess:
    return cxr("predict", "--protocol", "embedded", *args)


@pytest.fixture()
def web_pacs(tmp_path):  # type: ignore[no-untyped-def]
    port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", port, dicomweb=True).start()
    try:
        yield orthanc, port
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_a_qido_wado_pull_answers_as_the_files_do(web_pacs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc, _ = web_pacs
    study_a = pydicom.uid.generate_uid(entropy_srcs=["web-study-a"])
    study_b = pydicom.uid.generate_uid(entropy_srcs=["web-study-b"])
    files = tmp_path / "files"
    files.mkdir()
    blobs = [chest_dx(1, study=study_a), chest_dx(2, study=study_a), chest_dx(5, study=study_b), chest_dx(6, study=study_b, modality="CT")]
    for i, data in enumerate(blobs):
        orthanc.upload(data)
        (files / f"{i}.dcm").write_bytes(data)
    uids = [str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in blobs]

    r = _predict("--dicomweb", orthanc.dicomweb_url, "--format", "csv", "--out", str(tmp_path / "web.csv"),
                 "--audit-log", str(tmp_path / "audit.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    web = _rows(tmp_path / "web.csv")
    assert sorted(web) == sorted(uids)  # one row per instance found, the path is its SOP Instance UID
    r = _predict(str(files), "--format", "csv", "--out", str(tmp_path / "files.csv"))
    assert r.returncode == 0, r.stderr[-3000:]
    local = _rows(tmp_path / "files.csv")
    for i, uid in enumerate(uids):
        a, b = web[uid], local[str(files / f"{i}.dcm")]
        assert (a["status"], a["label"], a["probability"], a["rule"], a["sha256"]) == (
            b["status"], b["label"], b["probability"], b["rule"], b["sha256"])  # the same bytes, the same answer
    assert web[uids[3]]["status"] == "not_assessable" and web[uids[3]]["rule"] == "dicom_modality"
    assert sum(r["status"] == "ok" for r in web.values()) == 3
    recs = read(tmp_path / "audit.jsonl")
    received = [x for x in recs if x["event"] == "received"]
    assert sorted(x["instance_uid"] for x in received) == sorted(uids)
    assert {x["study_uid"] for x in received} == {study_a, study_b}

    # one study by UID; a QIDO query on the modality
    r = _predict("--dicomweb", orthanc.dicomweb_url, "--study", study_a, "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(a["path"] for a in json.loads(r.stdout)) == sorted(uids[:2])
    r = _predict("--dicomweb", orthanc.dicomweb_url, "--query", "ModalitiesInStudy=CT", "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [a["path"] for a in json.loads(r.stdout)] == [uids[3]]  # study b holds the CT: its CT series only
    r = _predict("--dicomweb", orthanc.dicomweb_url, "--query", "ModalitiesInStudy=DX", "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(a["path"] for a in json.loads(r.stdout)) == sorted(uids[:3])  # the DX series, not study b's CT
    r = _predict("--dicomweb", orthanc.dicomweb_url, "--query", "ModalitiesInStudy=MR", "--format", "json")
    assert r.returncode == 0 and "nothing to screen" in r.stderr  # a quiet night is no failure


@pytest.mark.slow
@pytest.mark.timeout(900, method="signal")  # a hang fails in the test: the finally and the fixture stop everything
def test_dicomweb_streams_and_a_sigterm_saves_the_rows_and_leaves_no_file(web_pacs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`cxr predict --dicomweb` reads, screens and journals batch by batch: stopped by SIGTERM part way, the rows
    done are saved and no temporary file is left (patient data included); the rerun finishes with every instance
    once; a third run reads no instance."""
    import os
    import time

    orthanc, _ = web_pacs
    study = pydicom.uid.generate_uid(entropy_srcs=["stream-study"])
    # stopped halfway; 60 instances in the suite (25 s here); the 300 with CXR_TEST_DICOMWEB_INSTANCES=300:
    # 50-137 s for this test here (2 cores shared with a training run, load 5-8), too long for the suite; of 16 runs
    # at 300, one failed (output not kept) before the interrupted run's rows were read back from the journal's file,
    # none of the eight since.
    # The cost that grew faster than the count was QIDO-RS: these films are one study under 300 Patient IDs, which
    # Orthanc answers as 300 studies, and each answer's 300 instances were listed again (300 searches: 54 s before
    # the first row, three runs per test). Now the study is listed once: first row after 2-3 s, all 300 screened
    # in 86-104 s (embedded model, --chunk 4), the WADO-RS reads never the slow part; the reported stall of the
    # reads after 68 instances did not recur (docs/hospital.md, DICOMweb in).
    n = int(os.environ.get("CXR_TEST_DICOMWEB_INSTANCES", "60"))
    for i in range(n):
        orthanc.upload(chest_dx(200 + i, study=study))
    tmp, out, audit = tmp_path / "tmp", tmp_path / "web.csv", tmp_path / "audit.jsonl"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "cxr.cli", "predict", "--protocol", "embedded", "--dicomweb", orthanc.dicomweb_url,
           "--format", "csv", "--out", str(out), "--chunk", "4", "--audit-log", str(audit)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        most, modes = 0, set()
        while time.monotonic() < deadline and proc.poll() is None:
            files = [f for d in tmp.glob("cxr-*") for f in d.rglob("*")]  # the run's own folder
            try:
                modes |= {f.stat().st_mode & 0o777 for f in files}
            except FileNotFoundError:  # removed meanwhile
                pass
            most = max(most, sum(1 for f in files if f.suffix == ".dcm"))
            if most and len({r["path"] for r in journal_rows(out)}) > n // 2:  # half the instances journaled
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert 1 <= most <= 4  # a batch on disk at a time, never the query
        assert modes <= {0o600, 0o700}, sorted(map(oct, modes))  # readable by the owner only
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert not list(tmp.glob("cxr-*")), list(tmp.rglob("*"))  # no temporary file left
    saved = _rows(out)
    assert n // 2 <= len(saved) < n and "rows saved" in err
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(saved)} of {n} instances already final" in r.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == n and len({x["path"] for x in rows}) == n
    received = len([x for x in read(audit) if x["event"] == "received"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"{n} of {n} instances already final" in r.stderr, r.stderr[-3000:]
    assert len([x for x in read(audit) if x["event"] == "received"]) == received  # nothing read the third time
    assert not list(tmp.glob("cxr-*"))
    # no inference server answers (gRPC, nothing listening): one line, exit 75, before any instance is read
    port = free_ports(1)[0]
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", "--dicomweb", orthanc.dicomweb_url, "--url",
                        f"127.0.0.1:{port}", "--format", "csv", "--out", str(tmp_path / "none.csv"), "--audit-log",
                        str(tmp_path / "none.jsonl")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 75, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("cxr predict: error:")]
    assert "Traceback" not in r.stderr and len(errors) == 1 and "rerun later" in errors[0], r.stderr[-3000:]
    assert not [x for x in read(tmp_path / "none.jsonl") if x["event"] == "received"]


class _Fhir:
    """A FHIR endpoint on loopback that keeps the transaction Bundles POSTed to it and answers them; with ``fail_after``
    it answers 500 once it has taken that many (a server failing part way: a partial delivery)."""

    def __init__(self, fail_after: int | None = None) -> None:

        outer = self
        self.taken: list[dict] = []
        self.refused = 0

        class Handler(StubHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                b = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if fail_after is not None and len(outer.taken) >= fail_after:
                    outer.refused += 1
                    code, body = 500, {"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                                                                                      "code": "exception"}]}
                else:
                    outer.taken.append(b)
                    code, body = 200, {"resourceType": "Bundle", "type": "transaction-response",
                                       "entry": [{"response": {"status": "201 Created"}} for _ in b["entry"]]}
                data = json.dumps(body).encode()
                self.reply(code, data, "application/fhir+json")

        self.http = LoopbackHttp(Handler)
        self.url = self.http.url("/fhir")
        self.stop = self.http.stop

    def resources(self, kind: str) -> list[dict]:
        return [e["resource"] for b in self.taken for e in b["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.slow
def test_a_rerun_after_a_partial_fhir_delivery_delivers_every_result_with_its_study(web_pacs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`cxr predict --dicomweb --fhir-url`, the FHIR server failing after its first transaction: exit 75, the results
    left for a rerun. The rerun reads no instance again (all final in the journal), yet delivers every result with
    its study and patient, as the first run would have: the headers come by WADO-RS metadata, without pixels."""
    orthanc, _ = web_pacs
    studies = [pydicom.uid.generate_uid(entropy_srcs=[f"fhir-rerun-{k}"]) for k in range(2)]
    blobs = [chest_dx(300 + i, study=studies[i % 2]) for i in range(4)]
    for data in blobs:
        orthanc.upload(data)
    out, audit = tmp_path / "web.csv", tmp_path / "audit.jsonl"
    cmd = ["--dicomweb", orthanc.dicomweb_url, "--format", "csv", "--out", str(out), "--audit-log", str(audit),
           "--patient-id-system", "https://hospital.example/mrn"]
    failing = _Fhir(fail_after=1)
    try:
        r = _predict(*cmd, "--fhir-url", failing.url)
    finally:
        failing.stop()
    assert r.returncode == 75, r.stderr[-3000:]
    assert len(failing.taken) == 1 and failing.refused >= 1  # one study's transaction taken, then 500s
    assert "4 results not delivered (rerun to deliver them)" in r.stderr, r.stderr[-3000:]
    received = [x for x in read(audit) if x["event"] == "received"]
    assert len(received) == 4
    server = _Fhir()
    try:
        r = _predict(*cmd, "--fhir-url", server.url)
    finally:
        server.stop()
    assert r.returncode == 0 and "FHIR: 4 results posted" in r.stderr, r.stderr[-3000:]
    assert "4 of 4 instances already final" in r.stderr
    assert len([x for x in read(audit) if x["event"] == "received"]) == 4  # no instance read again
    reports = server.resources("DiagnosticReport")
    assert sorted(rep["imagingStudy"][0]["identifier"]["value"] for rep in reports) == sorted(
        f"urn:oid:{s}" for s in studies)  # one report per study, as the first run's was
    (first,) = failing.resources("DiagnosticReport")  # delivered by the first run: the rerun sends it as it was
    assert first["identifier"] in [rep["identifier"] for rep in reports]  # (created on its identifier: not twice)
    observations = server.resources("Observation")
    assert len(observations) == 4 and all(o["subject"]["identifier"]["value"].startswith("PAT") for o in observations)


@pytest.mark.slow
def test_listen_stores_its_sr_by_stow_and_keeps_an_audit_trail(web_pacs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc, port = web_pacs
    extra = ("--stow-url", orthanc.dicomweb_url, "--audit-log", str(tmp_path / "audit.jsonl"),
             "--fhir-out", str(tmp_path / "fhir.json"), "--urgent-if", "InstitutionalDepartmentName=Emergency")
    listener = start_listener(tmp_path, None, port, extra=extra)  # no --send-to: STOW-RS only
    try:
        routine, urgent = chest_dx(11), pydicom.dcmread(io.BytesIO(chest_dx(12)))
        urgent.InstitutionalDepartmentName = "Emergency"
        buf = io.BytesIO()
        urgent.save_as(buf, enforce_file_format=True)
        ids = [orthanc.upload(routine), orthanc.upload(buf.getvalue())]
        orthanc.store_to_listener(ids)
        studies = [str(pydicom.dcmread(io.BytesIO(routine)).StudyInstanceUID), str(urgent.StudyInstanceUID)]
        wait_until(lambda: all(len(orthanc.srs_in_study(s)) == 1 for s in studies), 120, "one SR in every study")
        for s in studies:
            (sr,) = orthanc.srs_in_study(s)
            assert read_sr(sr)["sha256"] and sr.StudyInstanceUID == s
        wait_until(lambda: sum(r["event"] == "result_delivered" for r in read(tmp_path / "audit.jsonl")) == 2, 120,
                   "two result_delivered records")
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    assert listener.returncode == 0
    v = verify(tmp_path / "audit.jsonl")
    assert v.ok, v.why
    recs = read(tmp_path / "audit.jsonl")
    events = [r["event"] for r in recs]
    assert events[:2] == ["started", "model_changed"] and events[-1] == "stopped"
    screened = {r["instance_uid"]: r for r in recs if r["event"] == "screened"}
    assert screened[str(urgent.SOPInstanceUID)]["detail"]["priority"] == "urgent"
    assert {r["actor"] for r in recs if r["event"] == "received"} == {"ae:ORTHANC"}
    delivered = [r for r in recs if r["event"] == "result_delivered"]
    assert all(r["detail"]["destination"].startswith("stow:") for r in delivered)
    assert "Test^Patient" not in (tmp_path / "audit.jsonl").read_text()  # no patient names in the trail
    bundles = [json.loads(line) for line in (tmp_path / "fhir.json").read_text().splitlines()]  # NDJSON
    assert len(bundles) == 2  # one transaction Bundle per instance, appended
    for bundle in bundles:
        fhir.validate(bundle)
    reports = [e["resource"] for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert sorted(r["imagingStudy"][0]["identifier"]["value"] for r in reports) == sorted(f"urn:oid:{s}" for s in studies)


@pytest.mark.slow
def test_stow_outage_keeps_results_until_the_archive_is_back(tmp_path: Path) -> None:
    """STOW-RS to an archive that is down: the SR waits in its outbox (a failure in the trail), and goes once it is up."""
    port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", port, dicomweb=True)  # configured, not started yet
    listener = start_listener(tmp_path, None, port, extra=("--stow-url", orthanc.dicomweb_url, "--audit-log",
                                                           str(tmp_path / "audit.jsonl")))
    try:
        from pynetdicom import AE

        ds = pydicom.dcmread(io.BytesIO(chest_dx(21)))
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
        assert assoc.is_established and assoc.send_c_store(ds).Status == 0
        assoc.release()
        wait_until(lambda: any(r["event"] == "delivery_failed" for r in read(tmp_path / "audit.jsonl")), 120,
                   "a delivery_failed record")
        assert len(list((tmp_path / "spool" / "outbox-stow").glob("*.dcm"))) == 1
        orthanc.start()
        try:
            wait_until(lambda: len(orthanc.srs_in_study(str(ds.StudyInstanceUID))) == 1, 180, "the SR delivered")
        finally:
            orthanc.stop()
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    assert not list((tmp_path / "spool" / "outbox-stow").glob("*.dcm"))
    assert verify(tmp_path / "audit.jsonl").ok


# -- no server needed -------------------------------------------------------------------------------------------------

def test_study_priority_from_the_header_and_site_rules() -> None:
    ds = pydicom.Dataset()
    assert study_priority(ds) == "routine"
    ds.RequestedProcedurePriority = "STAT"
    assert study_priority(ds) == "urgent"
    ds.RequestedProcedurePriority = "ROUTINE"
    item = pydicom.Dataset()
    item.RequestedProcedurePriority = "HIGH"
    ds.RequestAttributesSequence = [item]
    assert study_priority(ds) == "urgent"
    other = pydicom.Dataset()
    other.StationName = "ED-DX-1"
    rule = UrgentRule.parse("StationName=ED-DX-1,ED-DX-2")
    assert study_priority(other, (rule,)) == "urgent" and study_priority(other) == "routine"
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        UrgentRule.parse("Departement=ED")
    with pytest.raises(ValueError, match="KEYWORD=VALUE"):
        UrgentRule.parse("StationName")


def test_the_spool_hands_out_urgent_instances_first(tmp_path: Path) -> None:
    import os

    spool = Spool(tmp_path / "spool", ("dimse", "stow", "fhir"))
    for i in range(5):
        spool.receive(f"1.2.{i}", b"routine")
        os.utime(spool.incoming / f"1.2.{i}.dcm", (1000 + i, 1000 + i))  # arrival order
    spool.receive("1.2.9", b"urgent", urgent=True)  # the last to arrive
    order = [p.stem for p in spool.pending()]
    assert order == ["1.2.9", "1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.2.4"]
    spool.finish("1.2.9", [("stow", "sr.dcm", b"x"), ("fhir", "1.2.9.json", b"{}"), ("dimse", "sr.dcm", b"x")])
    assert not (spool.incoming / "1.2.9.urgent").exists() and spool.is_done("1.2.9")
    assert {p.parent.name for p in spool.root.glob("outbox*/*")} == {"outbox", "outbox-stow", "outbox-fhir"}
    assert not spool.receive("1.2.9", b"again", urgent=True)  # a duplicate stays done


def test_the_outbox_sends_urgent_results_first_and_parks_and_redelivers(tmp_path: Path) -> None:
    import os

    spool = Spool(tmp_path / "spool", ("dimse", "stow"))
    for i, urgent in enumerate((False, False, True)):
        uid = f"1.2.{i}"
        spool.receive(uid, b"film", urgent=urgent)
        os.utime(spool.incoming / f"{uid}.dcm", (1000 + i, 1000 + i))
        spool.finish(uid, [("dimse", f"sr{i}.dcm", b"sr"), ("stow", f"sr{i}.dcm", b"sr")], urgent=urgent)
    assert [p.name for p in spool.queued("dimse")] == ["sr2.dcm", "sr0.dcm", "sr1.dcm"]  # urgent first, then arrival
    assert (spool.outboxes["dimse"] / "sr0.dcm").stat().st_mtime == 1000  # dated with the film's arrival
    spool.sent(spool.outboxes["dimse"] / "sr2.dcm")
    assert not list(spool.outboxes["dimse"].glob("sr2*"))  # the result and its urgency marker
    parked = spool.park("stow", spool.outboxes["stow"] / "sr1.dcm", "HTTP 400")
    assert parked.parent.name == "dead-letter-stow" and json.loads((parked.parent / "sr1.dcm.why").read_text())[
        "reason"] == "HTTP 400"
    assert [p.name for p in spool.queued("stow")] == ["sr2.dcm", "sr0.dcm"]
    assert spool.redeliver() == {"dimse": 0, "stow": 1}
    assert sorted(p.name for p in spool.queued("stow")) == ["sr0.dcm", "sr1.dcm", "sr2.dcm"]
    assert not list(spool.parked("stow").iterdir())


def test_an_instance_set_aside_leaves_the_queue_with_its_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.receive("1.2.3", b"film", urgent=True)
    spool.receive("1.2.4", b"film")
    spool.set_aside("1.2.3", "no valid Study Instance UID")
    assert [p.stem for p in spool.pending()] == ["1.2.4"]
    assert (spool.dead_letter / "1.2.3.dcm").read_bytes() == b"film"
    assert json.loads((spool.dead_letter / "1.2.3.why").read_text())["reason"] == "no valid Study Instance UID"
    assert not spool.is_done("1.2.3")  # a corrected resend is screened


def test_the_screen_filter_drops_by_sop_class_modality_and_body_part() -> None:
    from cxr.doors.dicom.intake import ScreenFilter

    dx, mr = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.4"
    ds = pydicom.Dataset()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    default = ScreenFilter()
    assert default.drop_reason(dx, ds) is None and default.drop_reason(mr) == "sop_class"
    strict = ScreenFilter.of(modalities=("dx",), body_parts=("chest",))
    assert strict.drop_reason(dx, ds) is None
    ds.BodyPartExamined = "KNEE"
    assert strict.drop_reason(dx, ds) == "body_part"
    ds.Modality = "CT"
    assert strict.drop_reason(dx, ds) == "modality"
    del ds.BodyPartExamined
    ds.Modality = "DX"
    assert strict.drop_reason(dx, ds) is None  # no body part: screened, the eligibility rules judge it
    with pytest.raises(ValueError, match="not a UID"):
        ScreenFilter.of(sop_classes=("CR",))


def test_a_5xx_is_retried_with_backoff_and_a_4xx_is_not(tmp_path: Path) -> None:
    """A loopback HTTP server answers 503 twice, then an empty QIDO-RS result; another path answers 404."""

    from cxr.core.errors import RetryableServerError
    from cxr.doors.dicomweb import DicomWeb, DicomWebError

    hits: list[str] = []

    class Flaky(StubHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            code = 404 if self.path.startswith("/gone") else (503 if len(hits) <= 2 else 200)
            body = b"[]" if code == 200 else b""
            self.reply(code, body, "application/dicom+json")

    with LoopbackHttp(Flaky) as server:
        web = DicomWeb(server.url("/dicom-web"), timeout_s=5)
        web.BACKOFF_S = 0.05
        assert web.find(query={"ModalitiesInStudy": "DX"}) == []
        assert len(hits) == 3  # two 503s, then the answer
        hits.clear()
        with pytest.raises(DicomWebError, match="404"):
            DicomWeb(server.url("/gone"), timeout_s=5).find()
        assert len(hits) == 1  # a 4xx is final
    down = DicomWeb(server.url("/dicom-web"), timeout_s=2)
    down.BACKOFF_S = 0.05
    with pytest.raises(RetryableServerError):
        down.find()  # nobody listens: retried, then retryable (the CLI exits 75)


def test_a_study_found_twice_is_listed_once_and_the_connections_are_bounded_and_closed() -> None:
    """Orthanc keys a study by patient and Study Instance UID: one UID under several Patient IDs answers a QIDO-RS
    study search once per patient. Its instances are listed once (listing them once per answer made the search
    quadratic: 300 instances of one study under 300 Patient IDs took 300 searches of 300 answers each, most of a
    minute here before the first read). The readers reuse one kept-alive connection each, and close() closes them."""

    from cxr.doors.dicomweb import SERIES_UID, SOP_UID, STUDY_UID, DicomWeb, InstanceRef

    hits: list[str] = []
    peers: set[tuple[str, int]] = set()

    def item(**tags: str) -> dict:
        return {tag: {"vr": "UI", "Value": [v]} for tag, v in tags.items()}

    class Qido(StubHandler):
        protocol_version = "HTTP/1.1"  # kept alive: the connections a client holds are visible

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path.split("?")[0])
            peers.add(self.client_address)
            if self.path.startswith("/dicom-web/studies?"):
                body = json.dumps([item(**{STUDY_UID: "1.2.3"}) for _ in range(3)]).encode()  # three patients
            else:
                body = json.dumps([item(**{STUDY_UID: "1.2.3", SERIES_UID: "1.2.3.1", SOP_UID: f"1.2.3.1.{i}"})
                                   for i in range(5)]).encode()
            self.reply(200, body, "application/dicom+json")

    with LoopbackHttp(Qido) as server:
        with DicomWeb(server.url("/dicom-web"), timeout_s=5) as web:
            refs = web.find(query={"StudyDate": "20260101-"})
            assert refs == [InstanceRef("1.2.3", "1.2.3.1", f"1.2.3.1.{i}") for i in range(5)]
            assert hits.count("/dicom-web/studies/1.2.3/instances") == 1, hits
            for _ in range(3):
                assert web.find(studies=["1.2.3"])
            assert len(peers) == 1  # one kept-alive connection for the searches
            sessions = list(web._sessions)
        assert sessions and all(not s.adapters["http://"].poolmanager.pools for s in sessions)  # all closed


def test_closing_ends_a_read_in_flight_without_retries_and_writes_nothing(tmp_path: Path) -> None:
    """An interrupted run closes its DicomWeb before it removes its folder: a read in flight against a failing
    archive (503 after 1 s) ends with that request, is not retried, and writes no file, so the run ends within one
    request's time, not after every retry's."""
    import threading
    import time

    from cxr.doors.dicomweb import DicomWeb, InstanceRef

    hits: list[str] = []

    class Slow(StubHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            time.sleep(1.0)
            self.reply(503)

    with LoopbackHttp(Slow) as server:
        web = DicomWeb(server.url("/dicom-web"), timeout_s=5)
        web.BACKOFF_S = 1.0  # four tries would take 1 + 1 + 1 + 2 + 1 + 4 + 1 = 11 s
        got: list[dict] = []
        reader = threading.Thread(target=lambda: got.append(web.download([InstanceRef("1.2", "1.2.3", "1.2.3.4")],
                                                                          tmp_path / "batch")))
        reader.start()
        wait_until(lambda: hits, 10, "the read to reach the server", every_s=0.02)
        t0 = time.monotonic()
        web.close()
        took = time.monotonic() - t0
        reader.join(timeout=30)
        assert got == [{}] and len(hits) == 1, (got, hits)
        assert took < 3, took
        assert not list((tmp_path / "batch").iterdir())

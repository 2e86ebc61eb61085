"""FHIR results: resources that validate (fhir.resources), and a real FHIR server that takes the POST.

The server is Medplum's FHIR router and validator (npm) over its in-memory repository, on a loopback port
(tests/fhir_server; `scripts/test.sh` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr.client.client import Prediction
from cxr.core import contract
from cxr.core.errors import RetryableServerError
from cxr.doors import fhir
from tests.conftest import READY_DEADLINE_S, REPO, LoopbackHttp, StubHandler, read_line

SHA = "ab" * 32
SERVER = REPO / "tests" / "fhir_server"
EXAMPLES = REPO / "examples"


def _ok(p: float, **kw) -> Prediction:  # type: ignore[no-untyped-def]
    return Prediction(source="a.dcm", status=contract.Status.OK, label=contract.label_for(p, 0.03), probability=p, threshold=0.03, model_name="pneumonia", model_version="1",
                      ood_score=12.5, ood_threshold=35.0, model_sha256=SHA, **kw)


def _refused() -> Prediction:
    exc = contract.not_assessable("b.png", "colour_image", "mean chroma 40.1 > 12.0", value=40.1, limit=12.0)
    return Prediction(source="b.png", status=contract.Status.NOT_ASSESSABLE, label=None, probability=None, threshold=0.03, model_name="pneumonia", model_version="1", reason=str(exc),
                      refusal=contract.Refusal.of(exc), model_sha256=SHA)


def _resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_a_bundle_carries_finding_probability_threshold_model_and_study() -> None:
    study = fhir.StudyRef("1.2.3", "1.2.3.4", "PAT001", "", "ACC42")
    err = Prediction(source="c.png", status=contract.Status.ERROR, label=None, probability=None, threshold=0.03, model_name="pneumonia", model_version="1", reason="c.png: unreadable",
                     model_sha256=SHA)
    b = fhir.bundle([(_ok(0.9), study), (_ok(0.01), fhir.StudyRef()), (_refused(), fhir.StudyRef()), (err, study)])
    assert b["type"] == "transaction"
    devices, obs, reps = (_resources(b, k) for k in ("Device", "Observation", "DiagnosticReport"))
    assert len(devices) == 1 and len(obs) == len(reps) == 3  # one model, three answers, the error left out
    assert devices[0]["identifier"][0]["value"] == SHA and devices[0]["version"][0]["value"] == "1"
    pos, neg, na = obs
    assert pos["code"]["coding"][0]["code"] == "233604007"
    assert pos["valueCodeableConcept"]["coding"][0]["code"] == "52101004"  # present
    assert neg["valueCodeableConcept"]["coding"][0]["code"] == "2667000"  # absent
    comp = {c["code"]["coding"][0]["code"]: c for c in pos["component"]}
    assert comp["probability"]["valueQuantity"]["value"] == 0.9 and comp["threshold"]["valueQuantity"]["value"] == 0.03
    assert pos["derivedFrom"][0]["identifier"]["value"] == "urn:oid:1.2.3" and pos["subject"]["identifier"]["value"] == "PAT001"
    assert "valueCodeableConcept" not in na and na["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    ncomp = {c["code"]["coding"][0]["code"]: c for c in na["component"]}
    assert ncomp["refusal-rule"]["valueCodeableConcept"]["coding"][0]["code"] == "colour_image"
    assert ncomp["refusal-value"]["valueQuantity"]["value"] == 40.1 and ncomp["refusal-limit"]["valueQuantity"]["value"] == 12.0
    assert reps[0]["imagingStudy"][0]["identifier"]["value"] == "urn:oid:1.2.3"
    assert reps[0]["conclusionCode"][0]["coding"][0]["code"] == "233604007" and "conclusionCode" not in reps[1]
    assert reps[0]["identifier"][0]["value"] == "ACC42"
    assert all(o["device"]["reference"] == b["entry"][0]["fullUrl"] for o in obs)


def test_validation_catches_a_broken_resource() -> None:
    b = fhir.bundle([(_ok(0.9), fhir.StudyRef())])
    b["entry"][1]["resource"]["valueQuantity"] = "ninety percent"
    with pytest.raises(fhir.FhirError, match="validation"):
        fhir.validate(b)


def test_a_dicom_file_gives_its_study_and_a_jpeg_none() -> None:
    ref = fhir.StudyRef.of_file(EXAMPLES / "dicom" / "chest_dx.dcm")
    assert ref.study_uid and ref.instance_uid and ref.patient_id
    assert fhir.StudyRef.of_file(EXAMPLES / "NORMAL" / "IM-0117-0001.jpeg") == fhir.StudyRef()


def test_predict_writes_a_bundle_and_an_audit_trail(tmp_path: Path) -> None:
    """`cxr predict --fhir-out --audit-log` on the example films (embedded model): one result per answered input."""
    files = [EXAMPLES / "dicom" / "chest_dx.dcm", EXAMPLES / "PNEUMONIA" / "person1003_virus_1685.jpeg",
             EXAMPLES / "not_chest" / "camera.png"]
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", *map(str, files), "--protocol", "embedded",
                        "--format", "json", "--fhir-out", str(tmp_path / "b.json"), "--audit-log",
                        str(tmp_path / "audit.jsonl")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = json.loads(r.stdout)
    b = json.loads((tmp_path / "b.json").read_text())
    fhir.validate(b)
    obs = _resources(b, "Observation")
    assert len(obs) == 3 and len(_resources(b, "Device")) == 1
    dcm = next(a for a in answers if a["path"].endswith("chest_dx.dcm"))
    probs = [c["valueQuantity"]["value"] for o in obs for c in o["component"] if c["code"]["coding"][0]["code"] == "probability"]
    assert dcm["probability"] in probs  # the same number, every digit
    assert any("dataAbsentReason" in o for o in obs)  # the camera picture, refused
    v = subprocess.run([sys.executable, "-m", "cxr.cli", "audit-log", "verify", str(tmp_path / "audit.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs].count("screened") == 3
    assert [r["event"] for r in recs].count("result_delivered") == 3  # the bundle file, per answer
    text = (tmp_path / "audit.jsonl").read_text()
    assert "person1003" not in text and "camera" not in text  # file names never enter the trail
    assert any(r["instance_uid"] == dcm["sop_instance_uid"] for r in recs)


@pytest.fixture()
def fhir_server() -> Iterator[str]:
    node = shutil.which("node")
    assert node, "Node.js is needed for the FHIR server (scripts/test.sh installs it)"
    assert (SERVER / "node_modules" / "@medplum" / "fhir-router").is_dir(), "run: npm ci --prefix tests/fhir_server"
    proc = subprocess.Popen([node, str(SERVER / "server.mjs"), "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        line = read_line(proc, "listening ", deadline_s=READY_DEADLINE_S)  # printed once it listens
        assert line is not None and line.startswith("listening "), f"the FHIR server did not say it listens: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_post_to_a_real_fhir_server(fhir_server: str) -> None:
    study = fhir.StudyRef("1.2.3", "1.2.3.4", "PAT001", "", "ACC42")
    b = fhir.bundle([(_ok(0.9), study), (_refused(), fhir.StudyRef())])
    resp = fhir.post_bundle(fhir_server, b)
    assert resp["type"] == "transaction-response"
    statuses = [(e["resource"]["resourceType"], e["response"]["status"]) for e in resp["entry"]]
    assert statuses.count(("Device", "201")) == 1 and sum(s == "201" for _, s in statuses) == 5  # one per input
    assert all(s == "200" for _, s in statuses if s != "201")  # the Device found again (conditional create)
    with urllib.request.urlopen(f"{fhir_server}/Observation?code=233604007") as r:
        found = json.loads(r.read())
    assert found["total"] == 2
    with urllib.request.urlopen(f"{fhir_server}/DiagnosticReport") as r:
        reports = [e["resource"] for e in json.loads(r.read())["entry"]]
    assert {rep["conclusion"].split(" (")[0] for rep in reports} == {"Pneumonia present", "Not assessable"}
    # the server's own validator refuses what is not FHIR, and the client says so in one line
    bad = json.loads(json.dumps(b))
    bad["entry"][1]["resource"]["valueQuantity"] = "ninety percent"
    with pytest.raises(fhir.FhirError, match="HTTP 400"):
        fhir.post_bundle(fhir_server, bad)


@pytest.mark.slow
def test_predict_posts_its_results(fhir_server: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", str(EXAMPLES / "dicom" / "chest_dx.dcm"),
                        "--protocol", "embedded", "--fhir-url", fhir_server], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "posted" in r.stderr, r.stderr[-2000:]
    with urllib.request.urlopen(f"{fhir_server}/DiagnosticReport") as resp:
        reports = [e["resource"] for e in json.loads(resp.read())["entry"]]
    study = fhir.StudyRef.of_file(EXAMPLES / "dicom" / "chest_dx.dcm").study_uid
    assert [rep["imagingStudy"][0]["identifier"]["value"] for rep in reports] == [f"urn:oid:{study}"]


def test_an_unreachable_fhir_server_is_a_retryable_error() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(RetryableServerError):
        fhir.post_bundle(f"http://127.0.0.1:{port}", fhir.bundle([(_ok(0.9), fhir.StudyRef())]), timeout_s=5)


@pytest.mark.slow
def test_the_same_predict_twice_leaves_the_reports_of_once(fhir_server: str) -> None:
    """Observations and DiagnosticReports are created conditionally on an identifier derived from the study, the
    instance and the model: a rerun finds them and adds nothing."""
    cmd = [sys.executable, "-m", "cxr.cli", "predict", str(EXAMPLES / "dicom" / "chest_dx.dcm"),
           str(EXAMPLES / "NORMAL"), "--protocol", "embedded", "--fhir-url", fhir_server]

    def count(kind: str) -> int:
        with urllib.request.urlopen(f"{fhir_server}/{kind}?_summary=count") as resp:
            return int(json.loads(resp.read())["total"])

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "posted" in r.stderr, r.stderr[-2000:]
    once = {k: count(k) for k in ("DiagnosticReport", "Observation", "Device")}
    assert once["DiagnosticReport"] >= 2 and once["Device"] == 1
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {k: count(k) for k in once} == once
    with urllib.request.urlopen(f"{fhir_server}/DiagnosticReport?identifier={fhir.RESULT_ID}|") as resp:
        found = json.loads(resp.read())
    ids = [i["value"] for e in found.get("entry", []) for i in e["resource"]["identifier"]
           if i.get("system") == fhir.RESULT_ID]
    assert len(ids) == len(set(ids)) == once["DiagnosticReport"]


def test_the_observation_says_which_operating_point_answered_and_each_point_is_its_own_result() -> None:
    study = fhir.StudyRef("1.2.3", "1.2.3.4", "PAT001", "", "ACC42")
    adult, pediatric = _ok(0.5, operating_point="adult"), _ok(0.5, operating_point="pediatric")
    obs = _resources(fhir.bundle([(adult, study)]), "Observation")[0]
    comp = {c["code"]["coding"][0]["code"]: c for c in obs["component"]}
    assert comp["operating-point"]["valueString"] == "adult"
    assert fhir.result_id(adult, study, "report") != fhir.result_id(pediatric, study, "report")
    assert fhir.result_id(adult, study, "report") == fhir.result_id(_ok(0.5, operating_point="adult"), study, "report")


@pytest.mark.slow
def test_an_amended_study_report_is_updated_in_place(fhir_server: str) -> None:
    """A film that comes after its study was answered: the study's DiagnosticReport is updated in place (a
    conditional update on its identifier), status `amended`, its results all the films' Observations; still one
    report for the study; sending the amendment again changes nothing."""
    from cxr.doors.dicom.study import combine

    refs = [fhir.StudyRef("1.2.3", f"1.2.3.{i}", "PAT001", "", "ACC42") for i in (1, 2)]
    first = [(_ok(0.01), refs[0])]
    both = [*first, (_ok(0.9), refs[1])]
    fhir.post_bundle(fhir_server, fhir.study_bundle(first, combine([(r.instance_uid, p) for p, r in first])))
    amended = fhir.study_bundle(both, combine([(r.instance_uid, p) for p, r in both]), amended=True)
    fhir.post_bundle(fhir_server, amended)
    fhir.post_bundle(fhir_server, amended)

    with urllib.request.urlopen(f"{fhir_server}/DiagnosticReport") as r:
        reports = [e["resource"] for e in json.loads(r.read())["entry"]]
    assert len(reports) == 1
    (rep,) = reports
    assert rep["status"] == "amended" and rep["conclusion"].startswith("Pneumonia present")
    assert len(rep["result"]) == 2
    assert [i["value"] for i in rep["identifier"] if i.get("system") == fhir.RESULT_ID] == [
        fhir.study_report_id("1.2.3", _ok(0.1).model_sha256)]
    with urllib.request.urlopen(f"{fhir_server}/Observation?_summary=count") as r:
        assert json.loads(r.read())["total"] == 2


def test_the_subject_is_a_patient_in_the_sites_or_the_headers_system() -> None:
    """`subject` is typed Patient; its identifier's system is the header's IssuerOfPatientID where that names a
    system (an OID, a URI), else the site's --patient-id-system; an issuer that is only a name is kept as the
    assigner."""
    site = "https://hospital.example/mrn"

    def subj(issuer: str, system: str | None) -> dict:
        b = fhir.bundle([(_ok(0.9), fhir.StudyRef("1.2.3", "1.2.3.4", "PAT001", issuer, ""))], patient_id_system=system)
        (rep,) = _resources(b, "DiagnosticReport")
        assert _resources(b, "Observation")[0]["subject"] == rep["subject"]
        return rep["subject"]

    assert subj("", site) == {"type": "Patient", "identifier": {"value": "PAT001", "system": site}}
    assert subj("1.2.840.99", site)["identifier"]["system"] == "urn:oid:1.2.840.99"
    assert subj("urn:oid:2.16.1", None)["identifier"]["system"] == "urn:oid:2.16.1"
    assert subj("HOSP_A", site)["identifier"] == {"value": "PAT001", "system": site, "assigner": {"display": "HOSP_A"}}
    assert subj("", None) == {"type": "Patient", "identifier": {"value": "PAT001"}}
    with pytest.raises(ValueError, match="must be a URI"):
        fhir.FhirDelivery(url="http://127.0.0.1:1", patient_id_system="MRN")


class _Failing:
    """An HTTP server on loopback that answers every request 500 (a FHIR server failing for now); counts them."""

    def __init__(self) -> None:

        outer = self
        self.requests = 0

        class Handler(StubHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}'
                self.reply(500, body, "application/fhir+json")

        self.http = LoopbackHttp(Handler)
        self.url = self.http.url()
        self.stop = self.http.stop


@pytest.mark.slow
def test_a_fhir_server_answering_500_exits_75_and_the_rerun_delivers_everything(fhir_server: str,
                                                                                tmp_path: Path) -> None:
    inputs = [str(EXAMPLES / "dicom" / "chest_dx.dcm"), str(EXAMPLES / "NORMAL")]
    out, audit = tmp_path / "out.csv", tmp_path / "audit.jsonl"
    cmd = [sys.executable, "-m", "cxr.cli", "predict", *inputs, "--protocol", "embedded", "--format", "csv", "--out", str(out),
           "--audit-log", str(audit), "--patient-id-system", "https://hospital.example/mrn"]
    failing = _Failing()
    try:
        r = subprocess.run([*cmd, "--fhir-url", failing.url], capture_output=True, text=True, timeout=300)
    finally:
        failing.stop()
    answered = sum(1 for line in out.read_text().splitlines()[1:] if ",ok," in line or ",not_assessable," in line)
    assert answered >= 2
    assert r.returncode == 75, r.stderr[-2000:]
    assert failing.requests == 4  # retried with backoff, then left for a rerun
    assert f"{answered} results not delivered (rerun to deliver them)" in r.stderr, r.stderr[-2000:]
    assert "without a result" not in r.stderr
    from cxr.core.audit_trail import read

    failed = [x for x in read(audit) if x["event"] == "delivery_failed"]
    assert len(failed) == answered and all(x["detail"]["retry"] is True for x in failed)
    r = subprocess.run([*cmd, "--fhir-url", fhir_server], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"FHIR: {answered} results posted" in r.stderr, r.stderr[-2000:]
    with urllib.request.urlopen(f"{fhir_server}/DiagnosticReport?_summary=count") as resp:
        assert int(json.loads(resp.read())["total"]) == answered  # nothing lost
    with urllib.request.urlopen(f"{fhir_server}/DiagnosticReport?_count=1") as resp:
        rep = json.loads(resp.read())["entry"][0]["resource"]
    if "subject" in rep:
        assert rep["subject"]["type"] == "Patient"


def test_predict_groups_a_studys_films_into_one_report() -> None:
    """With the listener's study rule, the DICOM films of one study make one DiagnosticReport (the study answer,
    an Observation per frontal film), the same identifier the listener gives it; other inputs one report each."""
    from cxr.doors.dicom.study import combine

    films = [(_ok(p), fhir.StudyRef("1.2.3", f"1.2.3.{i}", "PAT001", "", "ACC42")) for i, p in enumerate((0.01, 0.9, 0.02))]
    other = (_ok(0.5), fhir.StudyRef())
    b = fhir.bundle([films[0], other, *films[1:]], study_rule=combine)
    reports = _resources(b, "DiagnosticReport")
    assert len(reports) == 2 and len(_resources(b, "Observation")) == 4 and len(_resources(b, "Device")) == 1
    study = [r for r in reports if r.get("imagingStudy")]
    assert len(study) == 1 and len(study[0]["result"]) == 3 and study[0]["conclusion"].startswith("Pneumonia present")
    assert [i["value"] for i in study[0]["identifier"] if i.get("system") == fhir.RESULT_ID] == [
        fhir.study_report_id("1.2.3", SHA)]
    assert len(fhir.split_transaction(b)) == 2  # each report atomic with its Observations
    assert len(_resources(fhir.bundle([*films, other]), "DiagnosticReport")) == 4  # without the rule: one per film

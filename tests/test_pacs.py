"""`cxr listen` against a real PACS: Debian's Orthanc on loopback ports, pynetdicom's own SCU, crashes and outages."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from cxr.doors.dicom.sr import read_sr
from cxr.serving.server import free_ports
from tests.conftest import SHIPPED_REPOSITORY, StubPacs, cxr, wait_until
from tests.test_dicom import make_dicom

pytestmark = pytest.mark.slow

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def chest_dx(seed: int, *, study: str | None = None, modality: str = "DX") -> bytes:
    """A chest DICOM (DX unless told) whose pixels are one of the real example films (cycled by ``seed``)."""
    import io

    import numpy as np
    from PIL import Image

    from tests.conftest import REPO

    files = sorted((REPO / "examples").glob("NORMAL/*")) + sorted((REPO / "examples").glob("PNEUMONIA/*"))
    img = np.asarray(Image.open(files[seed % len(files)]).convert("L"))
    ds = pydicom.dcmread(io.BytesIO(make_dicom(img.astype(np.uint16) * 16, bits=12)))
    ds.BodyPartExamined, ds.ViewPosition, ds.Modality = "CHEST", "PA", modality
    ds.PatientID, ds.PatientName = f"PAT{seed:03d}", f"Test^Patient{seed}"
    ds.StudyInstanceUID = study or pydicom.uid.generate_uid(entropy_srcs=[f"study-{seed}"])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"series-{seed}"])
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"instance-{seed}"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so
    that a test stopped without its finalizers (pytest-timeout's thread method ends pytest with ``os._exit``, a
    SIGKILL) leaves no server behind."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the finalizers alone stop it
        pass


class Orthanc:
    """Orthanc on loopback ports with a generated configuration; always stopped."""

    def __init__(self, workdir: Path, listener_port: int, *, aet: str = "ORTHANC", dicomweb: bool = False) -> None:
        self.http_port, self.dicom_port = free_ports(2)
        self.aet = aet
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = {
            "Name": "cxr-test-pacs",
            "StorageDirectory": str(self.dir / "db"),
            "IndexDirectory": str(self.dir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"cxr": ["CXR_AI", "127.0.0.1", listener_port]},
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
        }
        if dicomweb:  # Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS under /dicom-web/
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        (self.dir / "orthanc.json").write_text(json.dumps(self.config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        log = open(self.dir / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC, str(self.dir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        wait_until(lambda: self.get("/system"), 60, "Orthanc to answer on its HTTP port", proc=self.proc,
                   log=self.dir / "orthanc.log", ignore=(OSError,), every_s=0.3)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # stuck: never left running
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def _req(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"):  # type: ignore[no-untyped-def]
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method,
                                     headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
        return json.loads(data) if data and r.headers.get_content_type() == "application/json" else data

    def get(self, path: str):  # type: ignore[no-untyped-def]
        return self._req("GET", path)

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def upload(self, data: bytes) -> str:
        return self._req("POST", "/instances", data, "application/dicom")["ID"]

    def store_to_listener(self, orthanc_ids: list[str]) -> dict:
        body = json.dumps({"Resources": orthanc_ids, "Synchronous": True}).encode()
        return self._req("POST", "/modalities/cxr/store", body)

    def srs_in_study(self, study_uid: str) -> list[pydicom.Dataset]:
        found = self._req("POST", "/tools/find", json.dumps({"Level": "Instance", "Query": {
            "StudyInstanceUID": study_uid, "Modality": "SR"}}).encode())
        return [pydicom.dcmread(__import__("io").BytesIO(self.get(f"/instances/{i}/file"))) for i in found]


def start_listener(tmp: Path, orthanc: Orthanc | None, port: int, *, allow: tuple[str, ...] = ("ORTHANC",),
                   extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cxr.cli", "listen", "--port", str(port), "--spool", str(tmp / "spool"),
           "--out", str(tmp / "results.csv"), "--url", str(SHIPPED_REPOSITORY), *extra]
    if orthanc is not None:
        cmd += ["--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]
    for a in allow:
        cmd += ["--allow", a]
    log = open(tmp / f"listen-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: echo(port), 60, "cxr listen to answer C-ECHO", proc=proc, log=Path(log.name),
                   every_s=0.3)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc


def echo(port: int, calling: str = "ORTHANC") -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def spool_idle(spool: Path) -> bool:
    """Nothing left for the listener to do: no instance waiting in ``incoming/`` or in a study folder, no result
    waiting in an outbox. Results only come from there, so once it is idle, what the PACS holds is final (until
    something new arrives)."""
    waiting = list((spool / "incoming").glob("*.dcm"))
    if (spool / "studies").is_dir():
        waiting += [f for f in (spool / "studies").rglob("*") if f.is_file()]
    for outbox in spool.glob("outbox*"):
        waiting += [f for f in outbox.iterdir() if not f.name.startswith(".") and f.suffix != ".urgent"]
    return not waiting


def _predict_embedded(path: Path) -> dict:
    r = cxr("predict", str(path), "--protocol", "embedded", "--format", "json", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


@pytest.fixture()
def pacs(tmp_path):  # type: ignore[no-untyped-def]
    port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", port).start()
    try:
        yield orthanc, port
    finally:
        orthanc.stop()


def test_orthanc_routes_a_study_and_the_sr_lands_in_the_same_study(pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    orthanc, port = pacs
    listener = start_listener(tmp_path, orthanc, port)
    try:
        data = chest_dx(1)
        src = pydicom.dcmread(__import__("io").BytesIO(data))
        oid = orthanc.upload(data)
        orthanc.store_to_listener([oid])
        wait_until(lambda: len(orthanc.srs_in_study(src.StudyInstanceUID)) == 1)
        (sr,) = orthanc.srs_in_study(src.StudyInstanceUID)
        assert sr.PatientID == src.PatientID and sr.Modality == "SR"
        content = read_sr(sr)
        (tmp_path / "src.dcm").write_bytes(data)
        expected = _predict_embedded(tmp_path / "src.dcm")
        assert expected["status"] == "ok"  # a real film: the SR carries a finding
        assert content["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert content["finding"] == ("Present" if expected["label"] == "Pneumonia" else "Absent")
        rows = (tmp_path / "results.csv").read_text().splitlines()
        assert len(rows) == 2 and src.SOPInstanceUID in rows[1] and "Test^Patient" not in rows[1]
        logs = "".join(p.read_text() for p in tmp_path.glob("listen-*.log"))
        assert "Test^Patient" not in logs and "PAT001" not in logs  # no patient data in logs
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)


def test_pynetdicom_scu_echo_store_and_refusals(pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE, StoragePresentationContexts

    orthanc, port = pacs
    listener = start_listener(tmp_path, orthanc, port, allow=("ORTHANC", "MODALITY1"))
    try:
        assert echo(port, "MODALITY1")
        assert not echo(port, "STRANGER")  # a calling AE title outside the allow-list is refused
        ae = AE(ae_title="MODALITY1")
        ae.requested_contexts = StoragePresentationContexts[:120]
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
        assert assoc.is_established
        ds = pydicom.dcmread(__import__("io").BytesIO(chest_dx(2)))
        assert assoc.send_c_store(ds).Status == 0x0000
        mr = pydicom.dcmread(__import__("io").BytesIO(make_dicom(__import__("numpy").ones((64, 64)) * 100)))
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        mr.Modality = "MR"
        assert assoc.send_c_store(mr).Status == 0x0000  # not screened: accepted and dropped
        assoc.release()
        wait_until(lambda: len(orthanc.srs_in_study(ds.StudyInstanceUID)) == 1)
        assert not (tmp_path / "spool" / "incoming" / f"{mr.SOPInstanceUID}.dcm").exists()
        rows = (tmp_path / "results.csv").read_text()
        assert str(mr.SOPInstanceUID) not in rows  # no answer of its own
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)


def test_listener_killed_mid_stream_every_instance_gets_exactly_one_sr(pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    orthanc, port = pacs
    study = pydicom.uid.generate_uid(entropy_srcs=["kill-study"])
    ids = [orthanc.upload(chest_dx(10 + i, study=study)) for i in range(12)]
    listener = start_listener(tmp_path, orthanc, port)
    import threading

    # one instance per association, so the listener screens them as they come (all 12 in one association can
    # arrive before its worker wakes and be screened as one batch: no "mid-stream" left to kill in)
    sender = threading.Thread(target=lambda: [_store_quietly(orthanc, [i]) for i in ids])
    sender.start()
    results = tmp_path / "results.csv"
    wait_until(lambda: results.exists() and len(results.read_text().splitlines()) >= 3)  # 2 instances screened
    listener.send_signal(signal.SIGSTOP)  # frozen where it is: what it screened so far is what the kill leaves
    listener.send_signal(signal.SIGKILL)  # mid-stream
    listener.wait()
    screened_before_kill = len(results.read_text().splitlines()) - 1
    assert screened_before_kill < 12  # the kill came mid-stream: the restart must finish the rest
    sender.join(timeout=120)
    listener = start_listener(tmp_path, orthanc, port)  # finishes the spool
    try:
        orthanc.store_to_listener(ids)  # Orthanc resends everything: duplicates are acknowledged and skipped
        wait_until(lambda: len(orthanc.srs_in_study(study)) == 12, 240)
        wait_until(lambda: spool_idle(tmp_path / "spool"))  # every resend answered, every result out: nothing more
        srs = orthanc.srs_in_study(study)
        assert len(srs) == 12 and len({s.SOPInstanceUID for s in srs}) == 12
        refs = {s.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID for s in srs}
        assert len(refs) == 12
        rows = list(csv.DictReader(results.open()))
        assert len({r["sop_instance_uid"] for r in rows}) == 12  # screened before and after the restart, once each
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)


def _store_quietly(orthanc: Orthanc, ids: list[str]) -> None:
    try:
        orthanc.store_to_listener(ids)
    except OSError:
        pass  # the listener died mid-association: Orthanc reports the failure


def test_pacs_down_when_results_are_due_then_delivered(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", port)  # configured, not started: the PACS is down
    audit = tmp_path / "audit.jsonl"
    listener = start_listener(tmp_path, orthanc, port, allow=(), extra=("--heatmap", "--audit-log", str(audit)))
    try:
        from pynetdicom import AE

        from cxr.core.audit_trail import read

        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
        ds = pydicom.dcmread(__import__("io").BytesIO(chest_dx(30)))
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        wait_until(lambda: list((tmp_path / "spool" / "outbox").glob("*.dcm")))  # screened, queued, not delivered

        def failed_tries() -> int:  # the association to the PACS refused: every due result waits its backoff
            return sum(r["event"] == "delivery_failed" and r["detail"].get("error") == "association" for r in read(audit))

        wait_until(lambda: failed_tries() >= 2, 60)  # tried, failed, tried again after its backoff ...
        assert list((tmp_path / "spool" / "outbox").glob("*.dcm"))  # ... and still queued, not dropped
        assert not any(r["event"] == "result_delivered" for r in read(audit))
        orthanc.start()  # the PACS comes back
        wait_until(lambda: len(orthanc.srs_in_study(ds.StudyInstanceUID)) == 1, 180)
        wait_until(lambda: not list((tmp_path / "spool" / "outbox").glob("*.dcm")), 60)
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
        orthanc.stop()


def test_listen_help_reads_well() -> None:
    r = cxr("listen", "--help", timeout=60)
    assert r.returncode == 0
    for opt in ("--host", "--port", "--ae-title", "--send-to", "--allow", "--spool", "--out", "--protocol", "--url",
                "--model", "--heatmap"):
        assert opt in r.stdout
    assert "C-STORE" in r.stdout and "0x0000" in r.stdout and "dropped" in r.stdout



def _tls_echo(port: int, pki: dict | None) -> bool:  # type: ignore[type-arg]
    import ssl

    from pynetdicom import AE

    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 5
    ctx = ssl.create_default_context(cafile=str(pki["ca"])) if pki else None
    if ctx is not None and pki.get("client_cert"):
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI", tls_args=(ctx, "127.0.0.1") if ctx else None)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_dicom_tls_both_ways_with_orthanc(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Incoming associations need a certificate from the site CA; results go to Orthanc over DICOM TLS."""
    from cxr.core.security import make_dev_pki

    pki = make_dev_pki(tmp_path / "pki")
    other = make_dev_pki(tmp_path / "other", name="other")
    port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", port)
    orthanc.config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki["server_cert"]),
                           "DicomTlsPrivateKey": str(pki["server_key"]), "DicomTlsTrustedCertificates": str(pki["ca"]),
                           "DicomTlsRemoteCertificateRequired": True})
    orthanc.config["DicomModalities"]["cxr"] = {"AET": "CXR_AI", "Host": "127.0.0.1", "Port": port, "UseDicomTls": True}
    (orthanc.dir / "orthanc.json").write_text(json.dumps(orthanc.config))
    orthanc.start()
    cmd = [sys.executable, "-m", "cxr.cli", "listen", "--port", str(port), "--spool", str(tmp_path / "spool"),
           "--url", str(SHIPPED_REPOSITORY), "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
           "--dicom-tls-cert", str(pki["server_cert"]), "--dicom-tls-key", str(pki["server_key"]),
           "--dicom-tls-client-ca", str(pki["ca"]), "--send-tls-ca", str(pki["ca"]),
           "--send-tls-cert", str(pki["client_cert"]), "--send-tls-key", str(pki["client_key"])]
    log = open(tmp_path / "listen-tls.log", "wb")  # noqa: SIM115
    listener = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: listener.poll() is None and _tls_echo(port, pki), 60)
        assert not _tls_echo(port, {"ca": pki["ca"]})  # no client certificate: refused
        assert not _tls_echo(port, {"ca": pki["ca"], "client_cert": other["client_cert"], "client_key": other["client_key"]})
        assert not echo(port)  # plaintext: refused
        data = chest_dx(40)
        src = pydicom.dcmread(__import__("io").BytesIO(data))
        orthanc.store_to_listener([orthanc.upload(data)])  # Orthanc -> listener over TLS (UseDicomTls)
        wait_until(lambda: len(orthanc.srs_in_study(src.StudyInstanceUID)) == 1, 120)  # and back over TLS
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
        orthanc.stop()


def _mr_in_study_of(data: bytes) -> bytes:
    """An MR instance in the same study (and patient) as the DICOM ``data``."""
    import io

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.Modality, ds.BodyPartExamined = "MR", "HEAD"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), "mr"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
        entropy_srcs=[str(ds.SOPInstanceUID), "mr"])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_orthanc_routes_a_whole_study_dx_and_mr_and_the_dx_gets_its_sr(pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The MR is accepted and dropped (C-STORE success), so Orthanc's job succeeds; the DX is screened."""
    from cxr.core.audit_trail import read

    orthanc, port = pacs
    audit = tmp_path / "audit.jsonl"
    listener = start_listener(tmp_path, orthanc, port, extra=("--audit-log", str(audit)))
    try:
        study = pydicom.uid.generate_uid(entropy_srcs=["whole-study"])
        dx = chest_dx(51, study=study)
        mr = _mr_in_study_of(dx)
        orthanc.upload(mr)
        study_id = orthanc.get(f"/instances/{orthanc.upload(dx)}/study")["ID"]
        job = orthanc.store_to_listener([study_id])  # the whole study; raises on HTTP 500 (a failed job)
        assert job.get("InstancesCount", 2) == 2 and job.get("FailedInstancesCount", 0) == 0, job
        wait_until(lambda: len(orthanc.srs_in_study(study)) == 1)
        (sr,) = orthanc.srs_in_study(study)
        ref = (sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
               .ReferencedSOPInstanceUID)
        assert ref == pydicom.dcmread(__import__("io").BytesIO(dx)).SOPInstanceUID  # the DX's SR, none for the MR
        mr_uid = str(pydicom.dcmread(__import__("io").BytesIO(mr)).SOPInstanceUID)
        wait_until(lambda: any(r["event"] == "dropped" and r["instance_uid"] == mr_uid for r in read(audit)))
        (dropped,) = [r for r in read(audit) if r["event"] == "dropped"]
        assert dropped["detail"]["why"] == "sop_class" and dropped["study_uid"] == study
        assert not list((tmp_path / "spool" / "incoming").glob("*"))
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    assert listener.returncode == 0
    (stopped,) = [r for r in read(audit) if r["event"] == "stopped"]
    assert stopped["detail"]["counts"]["dropped"] == 1 and stopped["detail"]["counts"]["screened"] == 1


def _store(port: int, *datasets: pydicom.Dataset, calling: str = "ORTHANC") -> list[int]:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_AI")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_an_instance_that_cannot_be_answered_is_set_aside_and_later_studies_are_delivered(pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    from cxr.core.audit_trail import read

    orthanc, port = pacs
    audit = tmp_path / "audit.jsonl"
    listener = start_listener(tmp_path, orthanc, port, extra=("--audit-log", str(audit)))
    try:
        no_study = pydicom.dcmread(io.BytesIO(chest_dx(60)))
        del no_study.StudyInstanceUID  # no study to file a result in
        corrupt = pydicom.dcmread(io.BytesIO(chest_dx(61)))
        corrupt.PixelData = corrupt.PixelData[: len(corrupt.PixelData) // 3]  # truncated pixels: unreadable
        assert _store(port, no_study, corrupt) == [0, 0]
        later = [pydicom.dcmread(io.BytesIO(chest_dx(62 + i))) for i in range(2)]
        assert _store(port, *later) == [0, 0]
        for ds in later:  # the studies after the bad instances are screened and delivered
            wait_until(lambda ds=ds: len(orthanc.srs_in_study(str(ds.StudyInstanceUID))) == 1)
        dead = tmp_path / "spool" / "dead-letter"
        wait_until(lambda: len(list(dead.glob("*.dcm"))) == 2)
        why = {p.name.removesuffix(".why"): json.loads(p.read_text())["reason"] for p in dead.glob("*.why")}
        assert "Study Instance UID" in why[str(no_study.SOPInstanceUID)]
        assert why[str(corrupt.SOPInstanceUID)].startswith("unreadable")
        # what was wrong, and where the file is now (not incoming/, where it was read)
        assert "pixel data truncated" in why[str(corrupt.SOPInstanceUID)]
        assert str(dead / f"{corrupt.SOPInstanceUID}.dcm") in why[str(corrupt.SOPInstanceUID)]
        assert not list((tmp_path / "spool" / "incoming").glob("*.dcm"))
        aside = [r for r in read(audit) if r["event"] == "screened" and r["detail"].get("status") == "set_aside"]
        assert {r["instance_uid"] for r in aside} == {str(no_study.SOPInstanceUID), str(corrupt.SOPInstanceUID)}
        assert {r["detail"]["why"] for r in aside} == {"no_study_uid", "unreadable"}
        assert all(r["outcome"] == "failure" for r in aside)
        rows = list(csv.DictReader((tmp_path / "results.csv").open()))
        assert {r["sop_instance_uid"]: r["status"] for r in rows}[str(corrupt.SOPInstanceUID)] == "error"
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)


def test_a_result_refused_for_good_is_parked_later_ones_go_and_redeliver_sends_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io

    from cxr.core.audit_trail import read

    pacs = StubPacs(refuse=1)
    port = free_ports(1)[0]
    audit = tmp_path / "audit.jsonl"
    extra = ("--send-to", f"PACS@127.0.0.1:{pacs.port}", "--audit-log", str(audit))
    listener = start_listener(tmp_path, None, port, extra=extra)
    parked = tmp_path / "spool" / "dead-letter-dimse"
    try:
        first = pydicom.dcmread(io.BytesIO(chest_dx(70)))
        assert _store(port, first) == [0]
        wait_until(lambda: len(pacs.refused) == 1 and len(list(parked.glob("*.dcm"))) == 1)
        later = [pydicom.dcmread(io.BytesIO(chest_dx(71 + i))) for i in range(2)]
        assert _store(port, *later) == [0, 0]
        wait_until(lambda: len(pacs.stored) == 2)  # the destination that refused one still gets the later ones
        (why,) = parked.glob("*.why")
        assert "0xA900" in json.loads(why.read_text())["reason"]
        failed = [r for r in read(audit) if r["event"] == "delivery_failed"]
        assert len(failed) == 1 and failed[0]["detail"]["retry"] is False and failed[0]["detail"]["status"] == 0xA900
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    listener = start_listener(tmp_path, None, port, extra=(*extra, "--redeliver"))  # the parked SR goes again
    try:
        # the PACS has it once its C-STORE answers; the outbox is empty once the listener took the answer in
        wait_until(lambda: len(pacs.stored) == 3 and not list((tmp_path / "spool" / "outbox").glob("*")))
        assert not list(parked.glob("*"))
        assert len(set(pacs.stored)) == 3 and pacs.refused[0] in pacs.stored
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
        pacs.stop()


def _film_in(data: bytes, *, view: str, n: int) -> bytes:
    """Another film of the study of ``data``: its own series and instance, this view position and number."""
    import io

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ViewPosition, ds.InstanceNumber = view, n
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
        entropy_srcs=[str(ds.SOPInstanceUID), view, str(n)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_one_result_per_study_pa_lateral_and_mr(pacs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--study-quiet-s: the whole study (PA, lateral, MR) gets one SR and one DiagnosticReport; the lateral and the
    MR have no result of their own; the SR carries the PA's answer inside the study answer."""
    import io

    from cxr.core.audit_trail import read
    from cxr.doors.dicom.sr import read_study_sr

    orthanc, port = pacs
    audit, ndjson = tmp_path / "audit.jsonl", tmp_path / "fhir.ndjson"
    listener = start_listener(tmp_path, orthanc, port, extra=("--study-quiet-s", "2", "--audit-log", str(audit),
                                                              "--fhir-out", str(ndjson)))
    try:
        study = pydicom.uid.generate_uid(entropy_srcs=["pa-lateral-study"])
        pa = chest_dx(90, study=study)
        lateral = _film_in(pa, view="LL", n=2)
        mr = _mr_in_study_of(pa)
        study_id = orthanc.get(f"/instances/{orthanc.upload(pa)}/study")["ID"]
        orthanc.upload(lateral)
        orthanc.upload(mr)
        orthanc.store_to_listener([study_id])
        wait_until(lambda: len(orthanc.srs_in_study(study)) == 1)
        (sr,) = orthanc.srs_in_study(study)
        content = read_study_sr(sr)
        pa_uid = str(pydicom.dcmread(io.BytesIO(pa)).SOPInstanceUID)
        assert content["study"]["instance_uids"] == [pa_uid]
        assert [f["instance_uid"] for f in content["films"]] == [pa_uid]  # the lateral has no answer of its own
        assert content["study"]["finding"] == content["films"][0]["finding"] in ("Present", "Absent")
        wait_until(lambda: any(r["event"] == "result_delivered" for r in read(audit)))
        wait_until(lambda: spool_idle(tmp_path / "spool"))  # nothing left to screen or send: no second SR can come
        assert len(orthanc.srs_in_study(study)) == 1
        assert sum(r["event"] == "result_delivered" for r in read(audit)) == 1
        lines = ndjson.read_text().splitlines()
        assert len(lines) == 1
        reports = [e["resource"] for e in json.loads(lines[0])["entry"]
                   if e["resource"]["resourceType"] == "DiagnosticReport"]
        assert len(reports) == 1 and len(reports[0]["result"]) == 1
        (closed,) = [r for r in read(audit) if r["event"] == "screened" and r["detail"].get("level") == "study"]
        assert closed["detail"]["instances"] == 2 and closed["detail"]["frontal"] == 1  # the MR was dropped
        assert not any((tmp_path / "spool" / "studies").iterdir())
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)


def test_associations_to_another_called_ae_or_from_a_stranger_are_refused_and_audited(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE

    from cxr.core.audit_trail import read

    port = free_ports(1)[0]
    audit = tmp_path / "audit.jsonl"
    listener = start_listener(tmp_path, None, port, allow=("ORTHANC",), extra=("--audit-log", str(audit)))
    try:
        assert not echo(port, "STRANGER")  # calling AE title not allowed
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title="OTHER_AI")  # addressed to another AE title
        assert not assoc.is_established
        wait_until(lambda: sum(r["event"] == "refused" for r in read(audit)) == 2, 30)
        refused = {r["detail"]["why"]: r for r in read(audit) if r["event"] == "refused"}
        assert refused["calling_ae"]["actor"] == "ae:STRANGER" and refused["calling_ae"]["outcome"] == "failure"
        assert refused["called_ae"]["actor"] == "ae:ORTHANC"
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)


def test_pipeline_metrics_count_what_came_what_was_dropped_and_what_left(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io
    import re

    pacs = StubPacs()
    port = free_ports(1)[0]
    listener = start_listener(tmp_path, None, port, extra=("--send-to", f"PACS@127.0.0.1:{pacs.port}",
                                                           "--metrics-port", "0"))
    try:
        dx = chest_dx(95)
        mr = pydicom.dcmread(io.BytesIO(_mr_in_study_of(dx)))
        assert _store(port, pydicom.dcmread(io.BytesIO(dx)), mr) == [0, 0]
        wait_until(lambda: len(pacs.stored) == 1)

        def metrics() -> str:
            log = "".join(p.read_text() for p in tmp_path.glob("listen-*.log"))
            url = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log).group(1)  # type: ignore[union-attr]
            return urllib.request.urlopen(url, timeout=10).read().decode()

        wait_until(lambda: 'cxr_listen_delivered_total{destination="dimse"} 1.0' in metrics(), 30)
        text = metrics()
        for line in ("cxr_listen_received_total 1.0", 'cxr_listen_dropped_total{why="sop_class"} 1.0',
                     "cxr_listen_end_to_end_seconds_count 1.0"):
            assert line in text, line
        wait_until(lambda: 'cxr_listen_outbox_depth{destination="dimse"} 0.0' in metrics(), 30)
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
        pacs.stop()

"""A password in a URL (``http://user:password@host``) reaches no log, audit record, spool file, CSV or printed line."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from cxr.core.audit_trail import read
from cxr.core.security import redact_url, split_url_credentials
from cxr.serving.server import free_ports
from tests.conftest import LoopbackHttp, StubHandler, cxr, wait_until
from tests.test_pacs import Orthanc, _store, chest_dx, start_listener

PASSWORD = "S3cret-Pw-77"


def test_redact_and_split_url_credentials() -> None:
    assert redact_url(f"to http://alice:{PASSWORD}@host:8042/dicom-web/x@y") == "to http://***@host:8042/dicom-web/x@y"
    assert redact_url("AET@HOST:104 and http://host/a@b") == "AET@HOST:104 and http://host/a@b"
    assert split_url_credentials(f"https://al%40ice:{PASSWORD}@h:1/r") == ("https://h:1/r", ("al@ice", PASSWORD))
    assert split_url_credentials("http://h/r") == ("http://h/r", None)


@pytest.mark.slow
def test_a_password_in_a_url_is_in_no_file_written(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    orthanc = Orthanc(tmp_path / "orthanc", port, dicomweb=True).start()  # no authentication: the password is unused
    web = orthanc.dicomweb_url.replace("http://", f"http://alice:{PASSWORD}@")
    fhir_down = f"http://bob:{PASSWORD}@127.0.0.1:{free_ports(1)[0]}/fhir"  # nothing there: failures get logged
    work = tmp_path / "work"
    work.mkdir()
    audit = work / "audit.jsonl"
    listener = start_listener(work, None, port, extra=("--stow-url", web, "--fhir-url", fhir_down, "--audit-log",
                                                       str(audit), "--fhir-out", str(work / "fhir.json")))
    try:
        ds = pydicom.dcmread(io.BytesIO(chest_dx(80)))
        assert _store(port, ds) == [0]
        wait_until(lambda: len(orthanc.srs_in_study(str(ds.StudyInstanceUID))) == 1)  # STOW-RS went through
        wait_until(lambda: sum(r["event"] == "delivery_failed" for r in read(audit)) >= 2)  # FHIR retried, logged
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    delivered = [r for r in read(audit) if r["event"] == "result_delivered"]
    assert delivered and all("***@" in r["detail"]["destination"] for r in delivered)

    orthanc.upload(chest_dx(81))
    r = cxr("predict", "--dicomweb", web, "--protocol", "embedded", "--format", "csv", "--out", str(work / "pull.csv"),
            "--audit-log", str(work / "pull.jsonl"), "--fhir-url", fhir_down, timeout=300)
    (work / "predict.stdout").write_text(r.stdout)
    (work / "predict.stderr").write_text(r.stderr)
    assert "received" in (work / "pull.jsonl").read_text()  # the pull ran and was audited
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", "--dicomweb", web.replace(str(orthanc.http_port),
                        str(free_ports(1)[0])), "--protocol", "embedded"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 75
    (work / "unreachable.stderr").write_text(r.stderr)
    orthanc.stop()

    written = [p for p in work.rglob("*") if p.is_file()]
    assert len(written) > 8  # logs, audit trails, CSVs, the spool's files, printed output
    leaks = [str(p.relative_to(work)) for p in written if PASSWORD.encode() in p.read_bytes()]
    assert not leaks, leaks


@pytest.mark.slow
def test_fhir_results_go_with_a_bearer_token_and_a_client_certificate_and_the_token_is_in_no_file(tmp_path: Path) -> None:
    """A loopback HTTPS endpoint that requires a client certificate from the site CA records what it is sent."""
    import json
    import ssl

    from cxr.core.security import make_dev_pki

    pki = make_dev_pki(tmp_path / "pki")
    token = "tok-" + PASSWORD + "-bearer"
    seen: list[tuple[str, bool]] = []

    class Fhir(StubHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers.get("Authorization", ""), bool(self.connection.getpeercert())))
            out = json.dumps({"resourceType": "Bundle", "type": "transaction-response",
                              "entry": [{"response": {"status": "201"}} for _ in body["entry"]]}).encode()
            self.reply(200, out, "application/fhir+json")

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki["server_cert"]), str(pki["server_key"]))
    ctx.load_verify_locations(cafile=str(pki["ca"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = LoopbackHttp(Fhir, wrap=lambda sock: ctx.wrap_socket(sock, server_side=True))
    work = tmp_path / "work"
    work.mkdir()
    token_file = work / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_ports(1)[0]
    audit = work / "audit.jsonl"
    listener = start_listener(work, None, port, extra=(
        "--fhir-url", server.url("/fhir", scheme="https"), "--web-token-file", str(token_file),
        "--web-tls-ca", str(pki["ca"]), "--web-tls-cert", str(pki["client_cert"]), "--web-tls-key",
        str(pki["client_key"]), "--audit-log", str(audit)))
    try:
        assert _store(port, pydicom.dcmread(io.BytesIO(chest_dx(85)))) == [0]
        wait_until(lambda: any(r["event"] == "result_delivered" for r in read(audit)), 120)
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
        server.stop()
    assert seen and all(s == (f"Bearer {token}", True) for s in seen)  # the token and a client certificate
    leaks = [str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and p != token_file
             and token.encode() in p.read_bytes()]
    assert not leaks, leaks

"""A table of `cxr` misuse: each ends in one line on stderr and a non-zero exit from one place in main(), never a
traceback and never exit 0."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.serving.server import free_ports
from tests.conftest import REPO, SHIPPED_REPOSITORY, cxr

FILM = str(next((REPO / "examples" / "NORMAL").iterdir()))


def _closed_port() -> int:
    return free_ports(1)[0]  # free: nothing answers there


#: (id, argv, expected exit code, a piece of the error line)
CASES = [
    ("predict-no-input", ["predict"], 2, "no input"),
    ("study-without-dicomweb", ["predict", FILM, "--study", "1.2.3"], 2, "--dicomweb"),
    ("query-without-dicomweb", ["predict", "--query", "ModalitiesInStudy=DX"], 2, "no input"),
    ("chunk-0", ["predict", FILM, "--chunk", "0", "--protocol", "embedded"], 2, "chunk"),
    ("retries-0", ["predict", FILM, "--retries", "0", "--protocol", "embedded"], 2, "retries"),
    ("dicomweb-not-a-url", ["predict", "--dicomweb", "not-a-url"], 2, "--dicomweb"),
    ("dicomweb-ftp", ["predict", "--dicomweb", "ftp://127.0.0.1/x"], 2, "--dicomweb"),
    ("dicomweb-and-files", ["predict", FILM, "--dicomweb", "http://127.0.0.1:9/dicom-web"], 2, "not both"),
    ("dicomweb-unreachable", ["predict", "--dicomweb", "http://127.0.0.1:{closed}/dicom-web", "--protocol", "embedded"],
     75, "DICOMweb"),
    ("unknown-query-key", ["predict", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--query", "Modalitys=DX"], 2,
     "Modalitys"),
    ("query-without-equals", ["predict", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--query", "DX"], 2,
     "KEY=VALUE"),
    ("study-and-query", ["predict", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3", "--query",
                         "ModalitiesInStudy=DX"], 2, "one or the other"),
    ("priority-embedded", ["predict", FILM, "--protocol", "embedded", "--priority", "urgent"], 2, "--priority"),
    ("fhir-url-not-a-url", ["predict", FILM, "--protocol", "embedded", "--fhir-url", "fhir.example"], 2, "--fhir-url"),
    ("listen-bad-send-to", ["listen", "--send-to", "PACS-at-host"], 2, "AET@HOST:PORT"),
    ("listen-port-0", ["listen", "--port", "70000"], 2, "port"),
    ("listen-bad-modality", ["listen", "--screen-modality", " "], 2, "--screen-modality"),
    ("listen-bad-sop-class", ["listen", "--screen-sop-class", "CR"], 2, "--screen-sop-class"),
    ("listen-stow-not-a-url", ["listen", "--stow-url", "archive:8042"], 2, "--stow-url"),
    ("listen-busy-port", ["listen", "--port", "{busy}", "--url", str(SHIPPED_REPOSITORY)], 2, "cannot listen"),
    ("audit-missing", ["audit-log", "verify", "{tmp}/missing.jsonl"], 2, "cannot read"),
    ("listen-cert-without-key", ["listen", "--web-tls-cert", FILM], 2, "--web-tls-key"),
    ("listen-token-file-missing", ["listen", "--web-token-file", "{tmp}/no-token"], 2, "bearer token"),
]


@pytest.fixture()
def busy_port():  # type: ignore[no-untyped-def]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.parametrize(("argv", "code", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_is_one_line_and_non_zero(argv: list[str], code: int, says: str, busy_port: int, tmp_path: Path) -> None:
    args = [a.format(closed=_closed_port(), busy=busy_port, tmp=tmp_path) for a in argv]
    if args[0] == "listen":
        args += ["--spool", str(tmp_path / "spool")]
    r = cxr(*args, timeout=300, cwd=tmp_path)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"cxr {args[0]}"), r.stderr[-2000:]
    assert says in errors[0], errors[0]


def test_an_empty_audit_log_does_not_verify(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    r = cxr("audit-log", "verify", str(tmp_path / "empty.jsonl"), timeout=120)
    assert r.returncode == 3 and "empty" in r.stderr and "chain holds" not in r.stdout


def test_a_password_in_a_url_never_reaches_the_error_line() -> None:
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", "--dicomweb", "http://alice:s3cret-pw@127.0.0.1:"
                        f"{_closed_port()}/dicom-web", "--protocol", "embedded"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 75 and "s3cret-pw" not in r.stderr + r.stdout, r.stderr[-2000:]

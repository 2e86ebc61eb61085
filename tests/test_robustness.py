"""Hostile inputs, lossless resumable batch screening, and server faults, against a real tritonserver."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.client import PneumoniaClient, RetryPolicy
from cxr.client.transport import classify_error
from cxr.errors import InvalidInputError, RetryableServerError, ServerError
from tests.conftest import SHIPPED_REPOSITORY, synthetic_xray
from tests.test_contract import _encode, _png_with_claimed_size
from tests.test_dicom import _ramp, make_dicom

pytestmark = pytest.mark.slow


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def hostile_corpus(d: Path) -> tuple[list[Path], list[Path]]:
    """(valid inputs, invalid inputs) written into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    base = synthetic_xray(7, pneumonia=True, size=(320, 300))
    good = [
        _save(base, d / "gray.jpeg"),
        _save(base.convert("RGB").convert("CMYK"), d / "cmyk.jpeg"),
        _save(Image.fromarray(np.asarray(base).astype(np.uint16) * 257), d / "deep16.png"),
        _save(base.convert("RGBA"), d / "rgba.png"),
        _save(base.convert("P"), d / "palette.png"),
    ]
    (d / "valid.dcm").write_bytes(make_dicom(_ramp()))
    good.append(d / "valid.dcm")
    bad = []
    for name, data in [
        ("empty.jpeg", b""),
        ("truncated.jpeg", _encode(base, "JPEG")[:300]),
        ("notes.png", b"plain text pretending to be a png"),
        ("bomb.png", _png_with_claimed_size(60_000, 60_000)),
        ("pixel.png", _encode(Image.new("L", (1, 1)), "PNG")),
        ("thin.png", _encode(Image.new("L", (3000, 4)), "PNG")),
        ("frames.gif", _multi(base, "GIF")),
        ("frames.tiff", _multi(base, "TIFF")),
        ("nopixels.dcm", make_dicom(None)),
    ]:
        (d / name).write_bytes(data)
        bad.append(d / name)
    return good, bad


def _multi(img: Image.Image, fmt: str) -> bytes:
    return _encode(img, fmt, save_all=True, append_images=[img.rotate(5), img.rotate(10)])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_hostile_corpus_fails_per_file_and_the_rest_completes(triton_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good, bad = hostile_corpus(tmp_path / "in")
    out = tmp_path / "results.csv"
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", str(tmp_path / "in"), "--url",
                        triton_server.config.grpc_url, "--format", "csv", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1  # some failed
    rows = {Path(row["path"]).name: row for row in _rows(out)}
    assert set(rows) == {p.name for p in good + bad}
    for p in good:
        assert rows[p.name]["error"] == "" and rows[p.name]["label"] in ("Normal", "Pneumonia"), rows[p.name]
    assert rows["valid.dcm"]["sop_instance_uid"].count(".") > 3
    for p in bad:
        err = rows[p.name]["error"]
        assert err.startswith(str(p)) and "\n" not in err and rows[p.name]["label"] == ""
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err_lines) == len(bad)


def test_tensors_with_nan_or_wrong_dtype_never_reach_the_model(triton_server) -> None:  # type: ignore[no-untyped-def]
    with PneumoniaClient(triton_server.config.grpc_url) as c:
        with pytest.raises(InvalidInputError):
            c.infer_batch(np.full((1, 224, 224, 1), np.nan, np.float32))  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            c.infer_batch(np.zeros((1, 224, 224, 1), np.int16))


def test_sigkill_mid_run_then_rerun_gives_exactly_one_row_per_input(triton_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "many"
    d.mkdir()
    for i in range(150):
        synthetic_xray(1000 + i, pneumonia=i % 3 == 0, size=(400, 380)).save(d / f"img_{i:03d}.jpeg")
    out = tmp_path / "results.csv"
    cmd = [sys.executable, "-m", "cxr.cli", "predict", str(d), "--url", triton_server.config.grpc_url,
           "--format", "csv", "--out", str(out), "--chunk", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_rows(out))
    assert 0 < partial < 150, partial
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: {partial} of 150" in r.stderr
    rows = _rows(out)
    names = [Path(row["path"]).name for row in rows]
    assert sorted(names) == sorted(f"img_{i:03d}.jpeg" for i in range(150))  # none dropped, none duplicated
    assert all(row["label"] in ("Normal", "Pneumonia") and row["error"] == "" for row in rows)


def test_torn_last_line_is_dropped_on_resume(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.client.batch import CSV_COLUMNS, CsvAppender

    out = tmp_path / "r.csv"
    out.write_text(",".join(CSV_COLUMNS) + "\na.jpeg,Normal,0.1,0.5,pneumonia,1,,abc,\nb.jpeg,Pneu")
    app = CsvAppender(out)
    app.close()
    assert app.done == {("a.jpeg", "abc")}
    assert out.read_text().endswith("abc,\n")


def test_server_restart_mid_batch_completes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    h, g, m = free_ports(3)
    cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, http_port=h, grpc_port=g, metrics_port=m, models=("pneumonia",))
    server = TritonServer(cfg).start()
    images = [synthetic_xray(3000 + i, pneumonia=i % 2 == 0, size=(300, 280)) for i in range(8)]
    arrays = [np.asarray(im) for im in images] * 40  # 320 images
    result: dict = {}

    def run() -> None:
        with PneumoniaClient(cfg.grpc_url, batch_size=2, max_in_flight=2, timeout_s=20,
                             retry=RetryPolicy(attempts=30, backoff_s=0.2, max_backoff_s=2.0)) as c:
            result["preds"] = [p for i in range(0, len(arrays), 16) for p in c.predict(arrays[i : i + 16])]

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.5)
    server.kill()  # SIGKILL in the middle of the batch
    killed_at = time.monotonic()
    restarted = None
    while restarted is None and time.monotonic() - killed_at < 60:
        try:
            restarted = TritonServer(cfg).start()  # same ports: clients reconnect
        except ServerError:
            time.sleep(1)  # the gRPC port can stay busy for a few seconds
    assert restarted is not None, "could not restart tritonserver"
    try:
        t.join(timeout=240)
        assert not t.is_alive()
        preds = result["preds"]
        assert len(preds) == 320 and all(p.ok for p in preds), [p.error for p in preds if not p.ok][:3]
    finally:
        restarted.stop()
        server.stop()


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("[StatusCode.UNAVAILABLE] failed to connect to all addresses", RetryableServerError),
        ("Exceeds maximum queue size", RetryableServerError),
        ("Request timeout expired", RetryableServerError),
        ("[StatusCode.INVALID_ARGUMENT] unexpected shape for input 'image'", InvalidInputError),
        ("model 'x' has no version 7", ServerError),
    ],
)
def test_error_classification(message: str, kind: type) -> None:
    err = classify_error(RuntimeError(message), "grpc test")
    assert type(err) is kind and "grpc test" in str(err)


def test_overload_is_rejected_fast_and_retried(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A queue of 1 rejects at once (never hangs); the client's retries then get every image through."""
    import shutil

    from cxr.export import triton_config
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", repo / "pneumonia")
    cfg_path = repo / "pneumonia" / "configs" / "cpu.pbtxt"
    cfg_path.write_text(cfg_path.read_text().replace("max_queue_size: 256", "max_queue_size: 1"))
    assert "max_queue_size: 1\n" in cfg_path.read_text() and triton_config.CPU_POLICY.max_queue_size == 256
    h, g, m = free_ports(3)
    with TritonServer(ServerConfig(model_repository=repo, http_port=h, grpc_port=g, metrics_port=m)) as s:
        x = np.zeros((1, 224, 224, 1), np.uint8)
        with PneumoniaClient(s.config.grpc_url, batch_size=1, max_in_flight=16, retry=RetryPolicy(attempts=1)) as c:
            futures = [c._pool.submit(c.transport.infer, x, timeout_s=10) for _ in range(64)]
            rejected = 0
            t0 = time.monotonic()
            for f in futures:
                try:
                    f.result()
                except RetryableServerError as exc:
                    assert "queue" in str(exc).lower()
                    rejected += 1
            assert rejected > 0 and time.monotonic() - t0 < 30
        with PneumoniaClient(s.config.grpc_url, batch_size=1, max_in_flight=4,
                             retry=RetryPolicy(attempts=60, backoff_s=0.05, max_backoff_s=1.0)) as c:
            assert c.infer_batch(np.zeros((64, 224, 224, 1), np.uint8)).shape == (64,)
    assert os.path.exists(repo)

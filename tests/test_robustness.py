"""Hostile inputs, lossless resumable batch screening, and server faults, against a real tritonserver."""

from __future__ import annotations

import csv
import dataclasses
import io
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.client import PneumoniaClient, RetryPolicy
from cxr.core.errors import InvalidInputError, RetryableServerError, ServerError
from tests.conftest import SHIPPED_REPOSITORY, cxr, freeze_after_journal_rows, journal_rows, synthetic_xray, wait_until
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
    r = cxr("predict", str(tmp_path / "in"), "--url", triton_server.config.grpc_url, "--format", "csv", "--out",
            str(out), timeout=300)
    assert r.returncode == 1  # some failed
    rows = {Path(row["path"]).name: row for row in _rows(out)}
    assert set(rows) == {p.name for p in good + bad}
    for p in good:  # readable: an answer (generated images are, correctly, often not assessable), never an error
        row = rows[p.name]
        assert row["error"] == "" and row["status"] in ("ok", "not_assessable"), row
        assert (row["label"] in ("Normal", "Pneumonia")) == (row["status"] == "ok")
    assert rows["valid.dcm"]["sop_instance_uid"].count(".") > 3
    for p in bad:
        err = rows[p.name]["error"]
        assert rows[p.name]["status"] == "error" and rows[p.name]["reason"] == err
        assert err.startswith(str(p)) and "\n" not in err and rows[p.name]["label"] == ""
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err_lines) == len(bad)


def test_tensors_with_nan_or_wrong_dtype_never_reach_the_model(triton_server) -> None:  # type: ignore[no-untyped-def]
    with PneumoniaClient(triton_server.config.grpc_url) as c:
        with pytest.raises(InvalidInputError):
            c.infer_batch(np.full((1, 224, 224, 1), np.nan, np.float32))  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            c.infer_batch(np.zeros((1, 224, 224, 1), np.int16))


def _images(d: Path, n: int) -> Path:
    d.mkdir()
    for i in range(n):
        synthetic_xray(1000 + i, pneumonia=i % 3 == 0, size=(400, 380)).save(d / f"img_{i:03d}.jpeg")
    return d


def _check_one_final_row_each(out: Path, n: int) -> list[dict]:
    rows = _rows(out)
    names = [Path(row["path"]).name for row in rows]
    assert names == sorted(f"img_{i:03d}.jpeg" for i in range(n))  # none dropped, none duplicated, input order
    assert all(row["status"] in ("ok", "not_assessable") and row["error"] == "" for row in rows)
    return rows


def test_sigkill_mid_run_then_rerun_gives_exactly_one_row_per_input(triton_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _images(tmp_path / "many", 150)
    out = tmp_path / "results.csv"
    cmd = [sys.executable, "-m", "cxr.cli", "predict", str(d), "--url", triton_server.config.grpc_url,
           "--format", "csv", "--out", str(out), "--chunk", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = freeze_after_journal_rows(proc, out, 20)  # stopped with 20 or more of 150 answers in its journal
    proc.send_signal(signal.SIGKILL)  # the kill lands on a stopped process: the journal is what it was
    proc.wait(timeout=60)
    assert partial == len({r["path"] for r in journal_rows(out)})
    assert 20 <= partial < 150, partial
    assert not out.exists()  # the CSV is only ever written whole
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: {partial} of 150 inputs already final" in r.stderr
    _check_one_final_row_each(out, 150)


def test_server_outage_past_the_retries_then_rerun_retries_only_what_failed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The client gives up while the server is down: those rows are transient errors, the exit code is 1, and a
    rerun after the restart retries exactly them, leaving one final row per input and exit code 0."""
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    d = _images(tmp_path / "many", 120)
    bad = d / "zz_notes.png"
    bad.write_text("not an image")  # an input error: final, not retried
    h, g, m = free_ports(3)
    cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, http_port=h, grpc_port=g, metrics_port=m, models=("pneumonia",))
    out = tmp_path / "results.csv"
    cmd = [sys.executable, "-m", "cxr.cli", "predict", str(d), "--url", cfg.grpc_url, "--format", "csv", "--out",
           str(out), "--chunk", "4", "--retries", "2", "--timeout-s", "5"]
    server = TritonServer(cfg).start()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    freeze_after_journal_rows(proc, out, 12)  # mid-run, held there while the server goes down
    try:
        server.kill()  # down, and kept down until the client has given up on every remaining chunk
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    first = {Path(r["path"]).name: r for r in _rows(out)}
    assert len(first) == 121
    transient = {n for n, r in first.items() if r["status"] == "error" and n != bad.name}
    assert transient, "the outage left no failed rows"
    assert all("UNAVAILABLE" in first[n]["reason"] or "DEADLINE" in first[n]["reason"] for n in transient)
    restarted = wait_until(lambda: TritonServer(cfg).start(), 60, "tritonserver to restart on its ports",
                           ignore=(ServerError,), every_s=1)
    assert restarted is not None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        restarted.stop()
    assert f"retrying {len(transient)}" in r.stderr, r.stderr[-2000:]
    assert r.returncode == 1  # the one unreadable file is still an error ...
    rows = {Path(x["path"]).name: x for x in _rows(out)}
    assert len(rows) == 121 and rows[bad.name]["status"] == "error"
    assert all(rows[n]["status"] in ("ok", "not_assessable") for n in rows if n != bad.name)
    bad.unlink()  # ... and once it is gone, every input has a final answer: exit 0
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "120 of 120 inputs answered" in r.stderr, r.stderr[-2000:]
    _check_one_final_row_each(out, 120)


def test_torn_last_journal_line_is_dropped_and_errors_are_retried(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.client.batch import Journal
    from cxr.client.results import JOURNAL_COLUMNS

    j = tmp_path / "r.csv.journal"
    base = {k: "" for k in JOURNAL_COLUMNS} | {"threshold": "0.5", "model_name": "pneumonia", "model_version": "1"}
    rows = [base | {"path": "a.jpeg", "label": "Normal", "probability": "0.1", "sha256": "abc", "status": "ok",
                    "ood_score": "3.0", "retryable": "0"},
            base | {"path": "b.jpeg", "error": "b.jpeg: UNAVAILABLE", "sha256": "def", "status": "error",
                    "reason": "b.jpeg: UNAVAILABLE", "retryable": "1"},
            base | {"path": "c.jpeg", "error": "c.jpeg: not an image", "sha256": "0aa", "status": "error",
                    "reason": "c.jpeg: not an image", "retryable": "0"}]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=JOURNAL_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    j.write_text(buf.getvalue() + "d.jpeg,Pneu")
    journal = Journal(j)
    journal.close()
    assert set(journal.latest) == {"a.jpeg", "b.jpeg", "c.jpeg"} and j.read_text().endswith(",0\n")
    assert journal.is_final("a.jpeg", "abc") and not journal.is_final("a.jpeg", "changed")
    assert not journal.is_final("b.jpeg", "def")  # a transient failure is retried
    assert journal.is_final("c.jpeg", "0aa") and not journal.is_final("c.jpeg", "new-content")  # input error: final
    assert not journal.is_final("d.jpeg", "")


def test_server_restart_mid_batch_completes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    h, g, m = free_ports(3)
    cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, http_port=h, grpc_port=g, metrics_port=m, models=("pneumonia",))
    server = TritonServer(cfg).start()
    images = [synthetic_xray(3000 + i, pneumonia=i % 2 == 0, size=(300, 280)) for i in range(8)]
    arrays = [np.asarray(im) for im in images] * 40  # 320 images
    done: list = []
    progressed = threading.Event()

    def run() -> None:
        with PneumoniaClient(cfg.grpc_url, batch_size=2, max_in_flight=2, timeout_s=20,
                             retry=RetryPolicy(attempts=30, backoff_s=0.2, max_backoff_s=2.0)) as c:
            for i in range(0, len(arrays), 16):
                done.extend(c.predict(arrays[i : i + 16]))
                if len(done) >= 32:
                    progressed.set()

    t = threading.Thread(target=run)
    t.start()
    assert progressed.wait(timeout=120), "the batch never got going"
    server.kill()  # SIGKILL once 32 answers are in: the middle of the batch
    answered_before_kill = len(done)
    # same ports: clients reconnect (the gRPC port can stay busy for a few seconds)
    restarted = wait_until(lambda: TritonServer(cfg).start(), 60, "tritonserver to restart on its ports",
                           ignore=(ServerError,), every_s=1)
    assert restarted is not None, "could not restart tritonserver"
    try:
        t.join(timeout=240)
        assert not t.is_alive()
        assert 32 <= answered_before_kill < 320  # the kill came mid-batch, so the rest went through the restart
        assert len(done) == 320 and all(p.error is None for p in done), [p.error for p in done if p.error][:3]
    finally:
        restarted.stop()
        server.stop()


def test_overload_is_rejected_fast_and_retried(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A queue of 1 rejects at once (never hangs); the client's retries then get every image through."""
    import shutil

    from cxr.core.model_dir import ModelDir
    from cxr.export import repository, triton_config
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", repo / "pneumonia")
    policy = dataclasses.replace(triton_config.CPU_POLICY, max_queue_size=1)
    cfg = triton_config.build("pneumonia", "cpu", repository.served_params(repo / "pneumonia"), policy=policy)
    ModelDir(repo / "pneumonia").write_config(cfg, target="cpu", config_name="cpu")
    assert ModelDir(repo / "pneumonia").read_config("cpu")["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1
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
                except RetryableServerError as exc:  # classified by its gRPC status (UNAVAILABLE), not its text
                    assert "UNAVAILABLE" in str(exc) and "queue" in str(exc).lower()
                    rejected += 1
            assert rejected > 0 and time.monotonic() - t0 < 30
        with PneumoniaClient(s.config.grpc_url, batch_size=1, max_in_flight=4,
                             retry=RetryPolicy(attempts=60, backoff_s=0.05, max_backoff_s=1.0)) as c:
            assert c.infer_batch(np.zeros((64, 224, 224, 1), np.uint8)).shape == (64,)


def test_cxr_serve_killed_takes_its_server_and_stubs_with_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of `cxr serve`: tritonserver and every Python-backend stub exit (they got SIGTERM on their
    parent's death), and the next start removes the dead server's work folder."""
    import psutil

    from cxr.serving.server import WORKDIR_PREFIX, remove_stale_workdirs
    from tests.conftest import start_cxr_serve

    proc, _ = start_cxr_serve()
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(p.name() for p in tree)
        assert names[-1] == "tritonserver" and any(n.startswith("triton_python") for n in names), names
        workdirs = [d for d in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*")
                    if (d / "owner.pid").exists() and (d / "owner.pid").read_text() == str(proc.pid)]
        assert len(workdirs) == 1
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert workdirs[0] in remove_stale_workdirs() and not workdirs[0].exists()
    finally:
        if proc.poll() is None:
            proc.kill()

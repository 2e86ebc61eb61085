"""Shared fixtures: data (real when ../shared is present, generated otherwise) and a real Triton server."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from cxr.client.client import Prediction

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
REAL_TRAIN = SHARED / "chest_xray"
REAL_SITE = SHARED / "chest_xray_site"
REAL_FULLRES = SHARED / "chest_xray_fullres"
SHIPPED_REPOSITORY = REPO / "model_repository"
#: Every shipped model folder: the CPU model and the accurate one, each with its INT8 twin.
SHIPPED_MODELS = ("pneumonia", "pneumonia_accurate", "pneumonia_accurate_int8", "pneumonia_int8")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# cxr's state folder (spools, reports of commands run without --out, the decoded-image cache) for every test and
# every `cxr` the tests start: inside the checkout's ignored out/, never the user's own ~/.local/state/cxr
os.environ.setdefault("CXR_HOME", str(REPO / "out" / "test-home"))


# --- helpers the test files share: import them from here (``from tests.conftest import cxr, wait_until``) --------


def cxr(*args: str, ok: bool = False, timeout: float = 600, cwd: Path | None = None, home: Path | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cxr ARGS`` as a user runs it (``python -m cxr.cli``), its output captured as text. ``ok``: assert that it
    exited 0, the assertion naming the command and showing the tail of its output. ``home``: its state folder
    ($CXR_HOME; default: the tests' own, set below)."""
    env = {**os.environ, "CXR_HOME": str(home)} if home is not None else None
    r = subprocess.run([sys.executable, "-m", "cxr.cli", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=cwd, env=env, input=input)
    if ok:
        assert r.returncode == 0, \
            f"cxr {' '.join(args)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


T = TypeVar("T")


class StubHandler(http.server.BaseHTTPRequestHandler):
    """The request handler of a stand-in server (:class:`LoopbackHttp`): quiet, with one way to answer."""

    def reply(self, code: int, body: bytes = b"", content_type: str | None = None) -> None:
        self.send_response(code)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class LoopbackHttp:
    """A threaded HTTP server on a free loopback port running ``handler`` (a stand-in archive, FHIR server, ...),
    until :meth:`stop` or the end of a ``with`` block. ``wrap``: applied to its listening socket first (TLS)."""

    def __init__(self, handler: type[StubHandler], wrap: Callable[[Any], Any] | None = None) -> None:
        import threading

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        if wrap is not None:
            self.server.socket = wrap(self.server.socket)
        self.port: int = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> LoopbackHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Callable[[], T], deadline_s: float = 120.0, what: str | None = None, *,
               proc: subprocess.Popen[Any] | None = None, log: Path | None = None,
               ignore: tuple[type[BaseException], ...] = (), every_s: float = 0.5) -> T:
    """Synchronise on an event: call ``predicate`` until it returns something true, and return that. The test
    fails (an AssertionError naming ``what``) when ``deadline_s`` passes first, or when ``proc``, the process
    whose work the test waits on, ends first; either message ends with the tail of ``log`` (its output). Exceptions
    of the types in ``ignore`` mean "not yet" (a server that does not answer yet). ``every_s`` is the polling
    interval, never a synchronisation of its own. Without ``what`` the message names the predicate's line."""
    if what is None:
        code = getattr(predicate, "__code__", None)
        what = f"the condition of {Path(code.co_filename).name}:{code.co_firstlineno}" if code else repr(predicate)
    end = time.monotonic() + deadline_s
    while True:
        try:
            got = predicate()
        except ignore:
            got = None  # type: ignore[assignment]
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the process ended first (exit {proc.returncode}){_tail(log)}")
        if time.monotonic() >= end:
            raise AssertionError(f"waiting for {what}: not within {deadline_s:.0f} s{_tail(log)}")
        time.sleep(every_s)


def _tail(log: Path | None) -> str:
    return f"\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""


def prediction(status: str = "ok", **fields: Any) -> Prediction:
    """A :class:`~cxr.client.client.Prediction` with the fields a test does not look at filled in: source ``a``,
    threshold 0.25, model ``pneumonia`` version ``3``; an ``ok`` one ``Normal`` at probability 0.1, the others
    without label or probability (a ``not_assessable`` one needs its ``refusal`` and ``reason``, an ``error`` its
    ``reason``). ``fields`` override any of them."""
    from cxr.client.client import Prediction
    from cxr.core import contract

    base: dict[str, Any] = {"source": "a", "label": None, "probability": None, "threshold": 0.25,
                            "model_name": "pneumonia", "model_version": "3"}
    if contract.Status(status) is contract.Status.OK:
        base.update(label="Normal", probability=0.1)
    return Prediction(status=status, **{**base, **fields})


class StubPacs:
    """The tests' PACS when only its C-STORE answers matter: a pynetdicom Storage SCP (AE title ``PACS``) on a free
    loopback ``port``. It answers the first ``refuse`` C-STOREs with 0xA900 (refused for good) and accepts the rest.
    ``stored``: the SOP Instance UIDs it accepted, in order; ``got``: (SOP Instance UID, sha256 of the dataset) of
    each of them; ``refused``: the UIDs it refused. Always ``stop()`` it (or use it as a context manager)."""

    def __init__(self, refuse: int = 0) -> None:
        import threading

        from pynetdicom import AE, StoragePresentationContexts, evt

        from cxr.serving.server import free_ports

        self.refuse = refuse
        self.stored: list[str] = []
        self.got: list[tuple[str, str]] = []
        self.refused: list[str] = []
        self.port = free_ports(1)[0]
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:  # type: ignore[no-untyped-def]
        import hashlib

        uid = str(event.request.AffectedSOPInstanceUID)
        digest = hashlib.sha256(event.request.DataSet.getvalue()).hexdigest()
        with self._lock:
            if len(self.refused) < self.refuse:
                self.refused.append(uid)
                return 0xA900
            self.stored.append(uid)
            self.got.append((uid, digest))
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()

    def __enter__(self) -> StubPacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cxr_serve(*extra: str):  # type: ignore[no-untyped-def]
    """`cxr serve` of the shipped model on free loopback ports, returned once it printed its readiness line:
    (process, http port). The caller stops it."""
    from cxr.serving.server import free_ports

    h, g, m = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "cxr.cli", "serve", "--http-port", str(h), "--grpc-port", str(g),
                             "--metrics-port", str(m), "--models", "pneumonia", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait_for_line(proc, "Triton ready", deadline_s=READY_DEADLINE_S):
        return proc, h
    proc.kill()
    proc.wait()
    raise AssertionError(f"cxr serve was not ready within {READY_DEADLINE_S:.0f} s")


#: How long a server a test starts may take to say it is ready.
READY_DEADLINE_S = 180.0


def wait_for_line(proc, text: str, *, deadline_s: float) -> bool:  # type: ignore[no-untyped-def]
    """Read ``proc``'s stdout until a line holds ``text`` (True), the process ends or the deadline passes (False)."""
    return read_line(proc, text, deadline_s=deadline_s) is not None


def read_line(proc, text: str, *, deadline_s: float) -> str | None:  # type: ignore[no-untyped-def]
    """Read ``proc``'s stdout until a line holds ``text`` and return that line (without its newline); ``None`` when
    the process ends or the deadline passes first. Reads the pipe's descriptor directly (``select``), so a process
    that prints nothing cannot hold the caller past the deadline."""
    import select

    end = time.monotonic() + deadline_s
    buf = ""
    fd = proc.stdout.fileno()
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], max(0.0, min(1.0, end - time.monotonic())))
        if not ready:
            if proc.poll() is not None:
                return None
            continue
        chunk = os.read(fd, 65536).decode(errors="replace")
        buf += chunk
        *lines, buf = buf.split("\n")
        if not chunk:  # end of output: the last, unterminated line counts too
            lines.append(buf)
        for line in lines:
            if text in line:
                return line.rstrip("\r")
        if not chunk:
            return None
        buf = buf[-len(text) - 65536:]
    return None


#: Set by ``pytest --real-data``: fixtures then use ``../shared``'s films where they exist. By default every fixture
#: is generated or taken from ``examples/``, so a test means the same thing on every machine.
USE_REAL_DATA = False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-data", action="store_true",
                     help="fixtures use ../shared/data's real films where present (default: generated films)")


def pytest_configure(config: pytest.Config) -> None:
    global USE_REAL_DATA
    USE_REAL_DATA = bool(config.getoption("--real-data"))


def have_real_data() -> bool:
    """Whether fixtures use the real films: only with ``--real-data``, and only where they exist."""
    return USE_REAL_DATA and (REAL_TRAIN / "train" / "NORMAL").is_dir() and (REAL_SITE / "NORMAL").is_dir()


def synthetic_xray(seed: int, *, pneumonia: bool, size: tuple[int, int] = (256, 240)) -> Image.Image:
    """A crude chest-X-ray-like grayscale image: dark lungs in a bright body; opacities when 'pneumonia'."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("L", size, 30)
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.08, h * 0.05, w * 0.92, h * 0.98], fill=170)
    for cx in (0.3, 0.7):
        d.ellipse([w * (cx - 0.17), h * 0.15, w * (cx + 0.17), h * 0.85], fill=60 + int(rng.integers(0, 20)))
    if pneumonia:
        for _ in range(3):
            x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.3, 0.8) * h
            r = rng.uniform(0.05, 0.12) * w
            d.ellipse([x - r, y - r, x + r, y + r], fill=140)
    img = img.filter(ImageFilter.GaussianBlur(3))
    noise = rng.normal(0, 6, (h, w))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def make_dataset(root: Path, *, n_per_class: int, split: str | None = "train", seed: int = 0) -> Path:
    """Write a Kaggle-layout folder of synthetic images with Kaggle-style file names."""
    base = root / split if split else root
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (base / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            patient = i // 2  # two images per patient, to exercise grouping
            name = f"IM-{1000 + patient:04d}-{i % 2 + 1:04d}.jpeg" if label == 0 else f"person{patient}_bacteria_{i}.jpeg"
            synthetic_xray(seed * 100_000 + label * 10_000 + i, pneumonia=bool(label)).save(base / cls / name, quality=92)
    return root


def journal_rows(out: Path) -> list[dict]:
    """The complete rows of ``cxr predict``'s journal beside ``out`` (a torn last line left out)."""
    import csv

    j = out.with_name(out.name + ".journal")
    if not j.exists():
        return []
    data = j.read_bytes()
    return list(csv.DictReader(data[: data.rfind(b"\n") + 1].decode().splitlines()))


def freeze_after_journal_rows(proc, out: Path, rows: int, deadline_s: float = 120.0) -> int:  # type: ignore[no-untyped-def]
    """Wait (with a deadline) until ``cxr predict``'s journal holds ``rows`` complete rows, then stop the process
    (SIGSTOP) so that it can write no more: the test acts on a run known to be mid-way, not on a count it races.
    Returns the inputs the journal then holds; the caller kills or continues (SIGCONT) the process."""
    import signal

    wait_until(lambda: len(journal_rows(out)) >= rows, deadline_s, f"{rows} journal rows of cxr predict", proc=proc,
               every_s=0.01)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "cxr predict finished every input before it could be stopped mid-run"
    return len({r["path"] for r in journal_rows(out)})


def xray_copies(d: Path, n: int, *, seed: int = 2000) -> Path:
    """``n`` JPEG inputs in ``d``: the full-resolution originals (cycled) when present, generated films otherwise."""
    import shutil

    d.mkdir()
    if have_real_data():
        files = sorted(REAL_FULLRES.rglob("*.jpeg"))
        for i in range(n):
            shutil.copy(files[i % len(files)], d / f"img_{i:03d}.jpeg")
    else:
        for i in range(n):
            synthetic_xray(seed + i, pneumonia=i % 2 == 0, size=(420, 400)).save(d / f"img_{i:03d}.jpeg")
    return d


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle-layout root with train/: the real data when present, generated otherwise."""
    if have_real_data():
        return REAL_TRAIN
    return make_dataset(tmp_path_factory.mktemp("kaggle"), n_per_class=40)


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labelled site folder: the real sample when present, generated otherwise."""
    if have_real_data():
        return REAL_SITE
    return make_dataset(tmp_path_factory.mktemp("site"), n_per_class=16, split=None, seed=1)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A few realistic inputs: full-resolution originals when present, generated large images otherwise."""
    if have_real_data() and REAL_FULLRES.is_dir():
        files = sorted(REAL_FULLRES.rglob("*.jpeg"))
        return files[:6] + files[-6:]
    d = tmp_path_factory.mktemp("samples")
    out = []
    for i in range(12):
        p = d / f"sample_{i}.jpeg"
        synthetic_xray(500 + i, pneumonia=i % 2 == 1, size=(1200, 1000)).save(p, quality=90)
        out.append(p)
    return out


@pytest.fixture(scope="session")
def triton_server() -> Iterator[object]:
    """The real tritonserver on free loopback ports, serving the shipped repository; always stopped."""
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, http_port=http, grpc_port=grpc, metrics_port=metrics,
                       startup_timeout_s=120)
    server = TritonServer(cfg)
    server.start()
    try:
        yield server
    finally:
        server.stop()

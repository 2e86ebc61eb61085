"""The embedded CPU Triton: the real ``tritonserver`` binary from the ``nvidia-pytriton`` wheel.

The wheel bundles Triton Inference Server 2.51 and its Python backend but no
ONNX Runtime backend, so locally the ``cpu`` model config hosts onnxruntime in
the Python backend. Two pitfalls are handled here: the backend stub must load
*this* interpreter's ``libpython`` (its lib directory goes first in
``LD_LIBRARY_PATH``), and it must see this environment's packages (numpy<2).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr.core.errors import ServerError
from cxr.core.security import TlsServer, is_loopback, read_key, redact, restricted_flags

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` right now."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(host)
        if p not in ports:
            ports.append(p)
    return ports


@dataclass(frozen=True)
class ServerConfig:
    """How to run the embedded Triton.

    Attributes:
        model_repository: The Triton model repository.
        model_config_name: Selects ``configs/<name>.pbtxt`` in each model folder
            (``cpu`` for this server; ``None`` uses ``config.pbtxt``).
        host: Address for HTTP, gRPC and metrics (loopback by default).
        http_port: HTTP/REST port.
        grpc_port: gRPC port.
        metrics_port: Prometheus metrics port.
        models: Load only these models (explicit model control); all when empty.
        startup_timeout_s: Deadline for readiness.
        log_verbose: Triton's ``--log-verbose`` level.
        verify_sha256: Refuse to serve a model whose ONNX sha256 differs from its model card.
        tls: gRPC TLS (mutual when it names a client CA). With TLS on, HTTP and metrics stay on loopback
            (Triton's HTTP has no TLS: put the nginx proxy of :mod:`cxr.serving.proxy` in front).
        admin_key_file: Restrict model-repository, shared-memory, statistics, trace and logging to requests
            carrying header ``admin-key`` with this file's key (gRPC and HTTP).
        config_key_file: Restrict model-config to header ``config-key`` (the clients' key).
        allow_insecure: Allow a non-loopback ``host`` without TLS (refused otherwise).
    """

    model_repository: Path
    model_config_name: str | None = "cpu"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: tuple[str, ...] = ()
    startup_timeout_s: float = 120.0
    log_verbose: int = 0
    verify_sha256: bool = True
    tls: TlsServer | None = None
    admin_key_file: Path | None = None
    config_key_file: Path | None = None
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and self.tls is None and not self.allow_insecure:
            raise ValueError(f"refusing to serve patient images in plaintext on {self.host}: give TLS settings "
                             "(--tls-cert, --tls-key, --tls-client-ca) or --allow-insecure")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"ports must be in 1..65535, got {ports}")
        if len(set(ports)) != 3:
            raise ValueError(f"HTTP, gRPC and metrics ports must differ, got {ports}")
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout_s must be > 0")

    @property
    def local_host(self) -> str:
        """Where HTTP and metrics bind: loopback when TLS is on (they have no TLS), else ``host``."""
        return "127.0.0.1" if self.tls is not None else self.host

    @property
    def http_url(self) -> str:
        return f"{self.local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.local_host}:{self.metrics_port}/metrics"


def _pytriton_dist() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ServerError("the embedded server needs the 'serve' extra: pip install 'cxr-triton[serve]'") from exc
    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").exists():
        raise ServerError(f"no tritonserver binary in {dist}")
    return dist


def prepare_backends(workdir: Path) -> Path:
    """Assemble ``<workdir>/backends/python`` with the stub for this Python; returns the backends dir."""
    dist = _pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the pytriton wheel has no Python backend stub for Python {version}")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / f, target / f)
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return workdir / "backends"


def server_env(workdir: Path) -> dict[str, str]:
    """Environment for ``tritonserver`` and its Python-backend stub (``workdir`` holds the stub's site hook)."""
    import pytriton

    env = os.environ.copy()
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    # The stub embeds libpython but not this venv's site: hand it our import path, and a sitecustomize that runs
    # this venv's .pth files (an editable install maps cxr.core, cxr.serving, ... to their folders through one).
    hook = workdir / "pysite"
    hook.mkdir(exist_ok=True)
    sites = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (hook / "sitecustomize.py").write_text(
        "import site\n" + "".join(f"site.addsitedir({p!r})\n" for p in sites))
    paths = [str(hook)] + [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def verify_repository(repository: Path, models: tuple[str, ...] = ()) -> None:
    """Check each model's ONNX sha256 against its ``model_card.json``.

    Raises:
        ModelIntegrityError: A file differs from its card.
    """
    from cxr.core.errors import ModelIntegrityError
    from cxr.core.model_dir import model_dirs

    for folder in model_dirs(Path(repository), models):
        try:
            folder.verify()
        except ModelIntegrityError as exc:
            raise ModelIntegrityError(f"{exc}; refusing to serve") from None


#: Prefix of the work folders (the backend directory) of running servers, in the system's temporary folder.
WORKDIR_PREFIX = "cxr-triton-"
_OWNER_FILE = "owner.pid"


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the server gets SIGTERM when the process that started it dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``), and shuts down with its Python-backend stubs instead of outliving it."""

    def set_pdeathsig() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # not Linux: the server is stopped by stop() only
            return
        if os.getppid() != parent:  # the parent died before the call took effect
            os._exit(1)

    return set_pdeathsig


def remove_stale_workdirs(tmp: Path | None = None) -> list[Path]:
    """Remove the work folders of servers whose owner process is gone (a ``cxr serve`` that was killed)."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((d / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        try:
            os.kill(owner, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class TritonServer:
    """A running ``tritonserver`` process; use as a context manager.

    The server dies with the process that started it (SIGTERM on its death, even by SIGKILL), and the work
    folder of a server whose owner was killed is removed at the next start.

    Example:
        >>> with TritonServer(ServerConfig(Path("model_repository"))) as server:
        ...     print(server.config.grpc_url)
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log: deque[str] = deque(maxlen=400)
        self._reader: threading.Thread | None = None
        self._admin_key = read_key(config.admin_key_file, "admin key") if config.admin_key_file else None
        self._config_key = read_key(config.config_key_file, "config key") if config.config_key_file else None

    # -- lifecycle -------------------------------------------------------
    def command(self, backends: Path) -> list[str]:
        c = self.config
        cmd = [
            str(_pytriton_dist() / "bin" / "tritonserver"),
            f"--model-repository={Path(c.model_repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-address={c.local_host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.local_host}", f"--metrics-port={c.metrics_port}",
            "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            # p50/p90/p99 request, queue and compute latencies on :8002/metrics (nv_inference_*_summary_us)
            "--metrics-config=summary_latencies=true",
            f"--log-verbose={c.log_verbose}",
            "--exit-timeout-secs=10",
        ]
        if c.tls is not None:
            cmd += c.tls.tritonserver_flags()
        cmd += restricted_flags(self._admin_key, self._config_key)
        if c.model_config_name:
            cmd.append(f"--model-config-name={c.model_config_name}")
        if c.models:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in c.models]
        return cmd

    def start(self) -> TritonServer:
        """Start the process and wait until it is ready (or raise :class:`ServerError`)."""
        if self._proc is not None:
            raise ServerError("server already started")
        repo = Path(self.config.model_repository)
        if not repo.is_dir():
            raise ServerError(f"model repository not found: {repo}")
        if self.config.verify_sha256:
            verify_repository(repo, self.config.models)
        for stale in remove_stale_workdirs():
            logger.info("removed the work folder of a server whose owner is gone: %s", stale)
        self._workdir = tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX)
        (Path(self._workdir.name) / _OWNER_FILE).write_text(str(os.getpid()))
        backends = prepare_backends(Path(self._workdir.name))
        cmd = self.command(backends)
        logger.info("starting %s", " ".join(redact(cmd, [k for k in (self._admin_key, self._config_key) if k])))
        self._proc = subprocess.Popen(
            cmd, env=server_env(Path(self._workdir.name)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            self.wait_ready(self.config.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._log.append(line)
            logger.debug("tritonserver: %s", line)

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines the server printed."""
        return "\n".join(list(self._log)[-n:])

    def is_ready(self) -> bool:
        """``GET /v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.config.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Poll readiness until ``timeout_s``; fail fast if the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self._proc.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                logger.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s",
                            self.config.http_url, self.config.grpc_url, self.config.metrics_url)
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def model_states(self) -> dict[str, tuple[str, str]]:
        """Each model of the repository index: ``name -> (version, state)`` (``READY``, ``UNAVAILABLE`` ...), read
        over loopback HTTP with the admin key when the repository API is restricted; empty when it cannot be read."""
        import json

        headers = {"Content-Type": "application/json"}
        if self._admin_key:
            headers["admin-key"] = self._admin_key
        req = urllib.request.Request(f"http://{self.config.http_url}/v2/repository/index", data=b"{}", method="POST",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                index = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return {m["name"]: (str(m.get("version", "")), str(m.get("state", ""))) for m in index}

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL; always removes the work directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0f s; killing", timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def kill(self) -> None:
        """SIGKILL the server at once (fault-injection tests)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

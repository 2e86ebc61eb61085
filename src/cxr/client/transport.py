"""Transports behind :class:`~cxr.client.PneumoniaClient`: gRPC, HTTP (Triton) and embedded onnxruntime."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError, InvalidInputError, RetryableServerError, ServerError
from cxr.core.model_dir import ModelDir, ServedParams
from cxr.core.security import CONFIG_HEADER, TlsClient, TlsError, diagnose, grpc_header, split_host_port

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http", "embedded")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}

#: gRPC status codes that mean "try again later": the server is down or restarting, overloaded
#: (Triton answers a full queue or a queue timeout with UNAVAILABLE), or the deadline passed.
_GRPC_RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}
_GRPC_INVALID = {"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION"}
#: HTTP statuses that mean the same.
_HTTP_RETRYABLE = {408, 429, 502, 503, 504}
_HTTP_INVALID = {400, 413, 422}


@dataclass(frozen=True)
class ModelInfo:
    """What a client learns from the served model (config parameters and outputs).

    Attributes:
        name: Served model name.
        version: Served version.
        max_batch_size: The model's max_batch_size.
        threshold: Decision threshold on ``probability``.
        labels: ``(negative, positive)`` labels.
        sha256: sha256 of the served model file ('' if not published).
        ood_threshold: Largest ``ood_score`` still assessable; ``None`` when the model has no ``ood_score`` output.
        eligibility: JSON text of the served DICOM eligibility rules ('' if not published).
        operating_points: The served named thresholds (empty: the one ``threshold``).
        default_operating_point: The point an input gets when none is named and its age does not choose.
    """

    name: str
    version: str
    max_batch_size: int
    threshold: float
    labels: tuple[str, ...]
    sha256: str = ""
    ood_threshold: float | None = None
    eligibility: str = ""
    operating_points: tuple[tuple[str, float], ...] = ()
    default_operating_point: str = ""

    @property
    def params(self) -> ServedParams:
        return ServedParams(self.threshold, operating_points=self.operating_points,
                            default_operating_point=self.default_operating_point)

    def threshold_for(self, name: str | None = None) -> tuple[str, float]:
        """``(name, threshold)`` of a served operating point (the default one for ``None``)."""
        return self.params.threshold_for(name)

    @property
    def outputs(self) -> tuple[str, ...]:
        return contract.OUTPUT_NAMES if self.ood_threshold is not None else (contract.OUTPUT_NAME,)


@dataclass(frozen=True)
class Scores:
    """One batch's model outputs: ``probability (N,)`` and ``ood_score (N,)`` (``None`` without an OOD output)."""

    probability: np.ndarray
    ood_score: np.ndarray | None = None


def _params_to_info(name: str, version: str, config: dict) -> ModelInfo:
    """What the client needs from a served config, read with the codec that wrote it (:class:`ServedParams`)."""
    try:
        params = ServedParams.from_parameters(config.get("parameters") or {})
    except ValueError as exc:
        raise ServerError(f"model {name}: {exc}") from None
    outputs = {o.get("name") for o in config.get("output") or []}
    if (contract.OOD_OUTPUT_NAME in outputs) != (params.ood_threshold is not None):
        raise ServerError(f"model {name}: '{contract.OOD_OUTPUT_NAME}' output and '{contract.PARAM_OOD_THRESHOLD}' "
                          "parameter must come together (regenerate the config with `cxr configs`)")
    return ModelInfo(
        name=name,
        version=version,
        max_batch_size=int(config.get("max_batch_size", 1) or 1),
        threshold=params.threshold,
        labels=params.labels,
        sha256=params.sha256,
        ood_threshold=params.ood_threshold,
        eligibility=params.eligibility,
        operating_points=params.operating_points,
        default_operating_point=params.default_operating_point,
    )


def classify_error(exc: BaseException, where: str) -> Exception:
    """Map a transport exception to :class:`RetryableServerError`, :class:`InvalidInputError` or :class:`ServerError`.

    Decided on the gRPC status code or the HTTP status that tritonclient
    reports, and on the exception type for failures below HTTP (refused or
    reset connections, socket timeouts); never on message text.
    """
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    status_fn = getattr(exc, "status", None)
    status = str(status_fn() or "") if callable(status_fn) else ""
    if status.startswith("StatusCode."):
        code = status.removeprefix("StatusCode.")
        if code in _GRPC_RETRYABLE:
            return RetryableServerError(f"{where}: {code}: {text}")
        if code in _GRPC_INVALID:
            return InvalidInputError(f"{where}: {code}: {text}")
        return ServerError(f"{where}: {code}: {text}")
    if status.isdigit():
        http = int(status)
        if http in _HTTP_RETRYABLE:
            return RetryableServerError(f"{where}: HTTP {http}: {text}")
        if http in _HTTP_INVALID:
            return InvalidInputError(f"{where}: HTTP {http}: {text}")
        return ServerError(f"{where}: HTTP {http}: {text}")
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)) or type(exc).__name__ in ("Timeout", "LocalProtocolError"):
        return RetryableServerError(f"{where}: {type(exc).__name__}: {text}")
    return ServerError(f"{where}: {type(exc).__name__}: {text}")


class Transport:
    """Sends contract batches and returns the model's outputs as :class:`Scores`."""

    info: ModelInfo

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:  # pragma: no cover - interface
        raise NotImplementedError

    def ready(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def server_metadata(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class GrpcTransport(Transport):
    """tritonclient.grpc; one channel shared by every thread (gRPC channels are thread-safe)."""

    def __init__(self, url: str, model: str, version: str, *, timeout_s: float, tls: TlsClient | None = None,
                 config_key: str | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        self.url, self.model, self.version = url, model, version
        self.tls = tls
        self._config_headers = {grpc_header(CONFIG_HEADER): config_key} if config_key else None
        self._client = grpcclient.InferenceServerClient(url=url, **(tls.grpc_kwargs() if tls else {}))
        self.info = self._load_info(timeout_s)

    def _load_info(self, timeout_s: float) -> ModelInfo:
        try:
            meta = self._client.get_model_metadata(self.model, self.version, as_json=True, client_timeout=timeout_s)
            cfg = self._client.get_model_config(self.model, self.version, as_json=True, client_timeout=timeout_s,
                                                headers=self._config_headers)["config"]
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own type
            err = classify_error(exc, f"grpc {self.url} model {self.model}")
            if self.tls is not None and isinstance(err, RetryableServerError):
                host, port = split_host_port(self.url)
                why = diagnose(host, port, self.tls)
                if not why.startswith(("cannot connect", "TLS handshake succeeded", "TLS handshake timed out")):
                    raise TlsError(f"grpc {self.url}: {why}") from None
            raise err from None
        versions = meta.get("versions") or [self.version or "1"]
        return _params_to_info(self.model, self.version or str(versions[-1]), cfg)

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        inp = self._mod.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_TRITON_DTYPE)
        inp.set_data_from_numpy(batch)
        outs = [self._mod.InferRequestedOutput(n) for n in self.info.outputs]
        try:
            res = self._client.infer(self.model, [inp], model_version=self.version, outputs=outs, client_timeout=timeout_s,
                                     priority=priority)
        except Exception as exc:  # noqa: BLE001
            raise classify_error(exc, f"grpc {self.url}") from None
        return _scores(res.as_numpy, self.info, len(batch))

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model, self.version))
        except Exception:  # noqa: BLE001
            return False

    def server_metadata(self) -> dict:
        return dict(self._client.get_server_metadata(as_json=True))

    def close(self) -> None:
        self._client.close()


class HttpTransport(Transport):
    """tritonclient.http with binary tensor data; one connection per thread (the client is not thread-safe).

    With ``tls``, it speaks HTTPS (Triton's HTTP has no TLS: this is for the TLS-terminating proxy in front).
    """

    def __init__(self, url: str, model: str, version: str, *, timeout_s: float, tls: TlsClient | None = None,
                 config_key: str | None = None) -> None:
        import tritonclient.http as httpclient

        self._mod = httpclient
        self.url, self.model, self.version = url.removeprefix("https://").removeprefix("http://"), model, version
        self.tls = tls
        self._config_headers = {CONFIG_HEADER: config_key} if config_key else None
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()
        try:
            c = self._client()
            meta = c.get_model_metadata(self.model, self.version)
            cfg = c.get_model_config(self.model, self.version, headers=self._config_headers)
        except Exception as exc:  # noqa: BLE001
            raise classify_error(exc, f"http {self.url} model {self.model}") from None
        versions = meta.get("versions") or [self.version or "1"]
        self.info = _params_to_info(self.model, self.version or str(versions[-1]), cfg)

    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            kw: dict = {}
            if self.tls is not None:
                opts = {"ca_certs": str(self.tls.ca)}
                if self.tls.cert is not None:
                    opts.update(certfile=str(self.tls.cert), keyfile=str(self.tls.key))
                kw = {"ssl": True, "ssl_options": opts, "insecure": False}
            c = self._mod.InferenceServerClient(
                url=self.url, connection_timeout=self._timeout_s, network_timeout=self._timeout_s, **kw
            )
            self._local.client = c
            with self._lock:
                self._all.append(c)
        return c

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        inp = self._mod.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_TRITON_DTYPE)
        inp.set_data_from_numpy(batch, binary_data=True)
        outs = [self._mod.InferRequestedOutput(n, binary_data=True) for n in self.info.outputs]
        try:
            res = self._client().infer(self.model, [inp], model_version=self.version, outputs=outs, priority=priority)
        except Exception as exc:  # noqa: BLE001
            self._local.client = None  # a broken connection is not reused
            raise classify_error(exc, f"http {self.url}") from None
        return _scores(res.as_numpy, self.info, len(batch))

    def ready(self) -> bool:
        try:
            c = self._client()
            return bool(c.is_server_ready() and c.is_model_ready(self.model, self.version))
        except Exception:  # noqa: BLE001
            return False

    def server_metadata(self) -> dict:
        return dict(self._client().get_server_metadata())

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
            self._all.clear()


def read_config(model_dir: Path, config_name: str | None = None) -> dict:
    """A model folder's ``config.pbtxt`` (or ``configs/<name>.pbtxt``) as the dict Triton serves."""
    try:
        return ModelDir(Path(model_dir)).read_config(config_name)
    except CxrError as exc:
        raise ServerError(str(exc)) from None


class EmbeddedTransport(Transport):
    """The served ONNX run in-process with onnxruntime: same API and results, no server."""

    def __init__(self, repository: str | Path, model: str, version: str, *, threads: int = 0) -> None:
        model_dir = Path(repository) / model
        if not model_dir.is_dir():
            from cxr.core.paths import WHERE_MODELS_ARE

            raise ServerError(f"embedded: no model folder {model_dir} ({WHERE_MODELS_ARE})")
        if not version:
            versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
            if not versions:
                raise ServerError(f"embedded: no version folder in {model_dir}")
            version = str(versions[-1])
        cfg = read_config(model_dir)
        self.info = _params_to_info(model, version, cfg)
        onnx_path = model_dir / version / "model.onnx"
        if self.info.sha256:
            from cxr.core.errors import ModelIntegrityError
            from cxr.core.integrity import sha256_file

            if sha256_file(onnx_path) != self.info.sha256:
                raise ModelIntegrityError(f"{onnx_path}: sha256 does not match its config; refusing to load")
        from cxr.core.ort_session import make_session

        self._session = make_session(onnx_path, threads=threads)
        have = {o.name for o in self._session.get_outputs()}
        if set(self.info.outputs) - have:
            raise ServerError(f"embedded: {onnx_path} lacks outputs {sorted(set(self.info.outputs) - have)} named in its config")
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        with self._lock:  # onnxruntime already uses every core; serialise calls
            outs = dict(zip(self.info.outputs, self._session.run(list(self.info.outputs), {contract.INPUT_NAME: batch})))
        return _scores(outs.get, self.info, len(batch))

    def ready(self) -> bool:
        return True


def _check_output(out: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if out is None or out.size != n:
        raise ServerError(f"server answered {None if out is None else out.shape} for '{name}' of a batch of {n} "
                          "(empty tensor: numpy 2 in the Python backend?)")
    out = out.reshape(-1).astype(np.float32, copy=False)
    if name == contract.OUTPUT_NAME and not np.isfinite(out).all():
        raise ServerError("server answered NaN or Inf probabilities")
    return out


def _scores(get, info: ModelInfo, n: int) -> Scores:
    prob = _check_output(get(contract.OUTPUT_NAME), n, contract.OUTPUT_NAME)
    ood = _check_output(get(contract.OOD_OUTPUT_NAME), n, contract.OOD_OUTPUT_NAME) if info.ood_threshold is not None else None
    return Scores(prob, ood)

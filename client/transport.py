"""Transports behind :class:`~cxr.client.PneumoniaClient`: gRPC, HTTP (Triton) and embedded onnxruntime."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr import contract
from cxr.errors import InvalidInputError, RetryableServerError, ServerError

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http", "embedded")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}

# Substrings of Triton errors that mean "try again later" (overload, queue policy, restarts).
_RETRYABLE = (
    "unavailable", "deadline", "timed out", "timeout", "connection refused", "connection reset",
    "exceeds maximum queue size", "request timeout expired", "failed to connect", "socket closed",
    "broken pipe", "not ready", "server is stopping", "server is shutting down", "eof", "connect",
)


@dataclass(frozen=True)
class ModelInfo:
    """What a client learns from the served model."""

    name: str
    version: str
    max_batch_size: int
    threshold: float
    labels: tuple[str, ...]
    sha256: str = ""


def _params_to_info(name: str, version: str, config: dict) -> ModelInfo:
    params: dict[str, str] = {
        k: str(v.get("string_value", "") if isinstance(v, dict) else v)
        for k, v in (config.get("parameters") or {}).items()
    }
    labels = tuple(params.get(contract.PARAM_LABELS, ",".join(contract.LABELS)).split(","))
    if len(labels) != 2:
        raise ServerError(f"model {name}: expected two labels, got {labels}")
    return ModelInfo(
        name=name,
        version=version,
        max_batch_size=int(config.get("max_batch_size", 1) or 1),
        threshold=float(params.get(contract.PARAM_THRESHOLD, contract.DEFAULT_THRESHOLD)),
        labels=labels,
        sha256=params.get(contract.PARAM_SHA256, ""),
    )


def classify_error(exc: Exception, where: str) -> Exception:
    """Map a transport exception to :class:`RetryableServerError`, :class:`InvalidInputError` or :class:`ServerError`."""
    text = str(exc)
    low = text.lower()
    status = ""
    status_fn = getattr(exc, "status", None)
    if callable(status_fn):
        status = str(status_fn() or "")
    if "StatusCode.UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status or any(s in low for s in _RETRYABLE):
        return RetryableServerError(f"{where}: {text}")
    if "StatusCode.INVALID_ARGUMENT" in status or "unexpected datatype" in low or "unexpected shape" in low:
        return InvalidInputError(f"{where}: {text}")
    return ServerError(f"{where}: {text}")


class Transport:
    """Sends contract batches and returns probabilities ``(N,)``."""

    info: ModelInfo

    def infer(self, batch: np.ndarray, *, timeout_s: float) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def ready(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def server_metadata(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class GrpcTransport(Transport):
    """tritonclient.grpc; one channel shared by every thread (gRPC channels are thread-safe)."""

    def __init__(self, url: str, model: str, version: str, *, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        self.url, self.model, self.version = url, model, version
        self._client = grpcclient.InferenceServerClient(url=url)
        self.info = self._load_info(timeout_s)

    def _load_info(self, timeout_s: float) -> ModelInfo:
        try:
            meta = self._client.get_model_metadata(self.model, self.version, as_json=True, client_timeout=timeout_s)
            cfg = self._client.get_model_config(self.model, self.version, as_json=True, client_timeout=timeout_s)["config"]
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own type
            raise classify_error(exc, f"grpc {self.url} model {self.model}") from None
        versions = meta.get("versions") or [self.version or "1"]
        return _params_to_info(self.model, self.version or str(versions[-1]), cfg)

    def infer(self, batch: np.ndarray, *, timeout_s: float) -> np.ndarray:
        inp = self._mod.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_TRITON_DTYPE)
        inp.set_data_from_numpy(batch)
        out = self._mod.InferRequestedOutput(contract.OUTPUT_NAME)
        try:
            res = self._client.infer(self.model, [inp], model_version=self.version, outputs=[out], client_timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise classify_error(exc, f"grpc {self.url}") from None
        return _check_output(res.as_numpy(contract.OUTPUT_NAME), len(batch))

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
    """tritonclient.http with binary tensor data; one connection per thread (the client is not thread-safe)."""

    def __init__(self, url: str, model: str, version: str, *, timeout_s: float) -> None:
        import tritonclient.http as httpclient

        self._mod = httpclient
        self.url, self.model, self.version = url, model, version
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()
        try:
            c = self._client()
            meta = c.get_model_metadata(self.model, self.version)
            cfg = c.get_model_config(self.model, self.version)
        except Exception as exc:  # noqa: BLE001
            raise classify_error(exc, f"http {self.url} model {self.model}") from None
        versions = meta.get("versions") or [self.version or "1"]
        self.info = _params_to_info(self.model, self.version or str(versions[-1]), cfg)

    def _client(self):  # type: ignore[no-untyped-def]
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._mod.InferenceServerClient(
                url=self.url, connection_timeout=self._timeout_s, network_timeout=self._timeout_s
            )
            self._local.client = c
            with self._lock:
                self._all.append(c)
        return c

    def infer(self, batch: np.ndarray, *, timeout_s: float) -> np.ndarray:
        inp = self._mod.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_TRITON_DTYPE)
        inp.set_data_from_numpy(batch, binary_data=True)
        out = self._mod.InferRequestedOutput(contract.OUTPUT_NAME, binary_data=True)
        try:
            res = self._client().infer(self.model, [inp], model_version=self.version, outputs=[out])
        except Exception as exc:  # noqa: BLE001
            self._local.client = None  # a broken connection is not reused
            raise classify_error(exc, f"http {self.url}") from None
        return _check_output(res.as_numpy(contract.OUTPUT_NAME), len(batch))

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
    """Parse a model folder's ``config.pbtxt`` (or ``configs/<name>.pbtxt``) into a dict."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(model_dir) / "configs" / f"{config_name}.pbtxt" if config_name else Path(model_dir) / "config.pbtxt"
    if not path.exists():
        raise ServerError(f"model config not found: {path}")
    cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


class EmbeddedTransport(Transport):
    """The served ONNX run in-process with onnxruntime: same API and results, no server."""

    def __init__(self, repository: str | Path, model: str, version: str, *, threads: int = 0) -> None:
        import onnxruntime as ort

        model_dir = Path(repository) / model
        if not model_dir.is_dir():
            raise ServerError(f"embedded: no model folder {model_dir}")
        if not version:
            versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
            if not versions:
                raise ServerError(f"embedded: no version folder in {model_dir}")
            version = str(versions[-1])
        cfg = read_config(model_dir)
        self.info = _params_to_info(model, version, cfg)
        onnx_path = model_dir / version / "model.onnx"
        if self.info.sha256:
            from cxr.errors import ModelIntegrityError
            from cxr.serving.integrity import sha256_file

            if sha256_file(onnx_path) != self.info.sha256:
                raise ModelIntegrityError(f"{onnx_path}: sha256 does not match its config; refusing to load")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray, *, timeout_s: float) -> np.ndarray:
        with self._lock:  # onnxruntime already uses every core; serialise calls
            out = self._session.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: batch})[0]
        return _check_output(out, len(batch))

    def ready(self) -> bool:
        return True


def _check_output(out: np.ndarray | None, n: int) -> np.ndarray:
    if out is None or out.size != n:
        raise ServerError(f"server answered {None if out is None else out.shape} for a batch of {n} (empty tensor: numpy 2 in the Python backend?)")
    out = out.reshape(-1).astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ServerError("server answered NaN or Inf probabilities")
    return out


def make_transport(protocol: str, url: str | None, model: str, version: str, *, timeout_s: float) -> Transport:
    """Create the transport for ``protocol`` (``grpc``, ``http`` or ``embedded``)."""
    if protocol == "grpc":
        return GrpcTransport(url or DEFAULT_URLS["grpc"], model, version, timeout_s=timeout_s)
    if protocol == "http":
        return HttpTransport(url or DEFAULT_URLS["http"], model, version, timeout_s=timeout_s)
    if protocol == "embedded":
        from cxr.cli import DEFAULT_REPOSITORY

        return EmbeddedTransport(url or DEFAULT_REPOSITORY, model, version)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")

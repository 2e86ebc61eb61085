"""The thin client: preprocessing, batching, concurrency, retries and thresholded labels."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cxr import contract
from cxr.client.transport import PROTOCOLS, ModelInfo, Transport, make_transport
from cxr.errors import CxrError, InvalidInputError, RetryableServerError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        source: The input's name (path, or a summary for in-memory inputs).
        label: ``Normal`` or ``Pneumonia``; ``None`` when ``error`` is set.
        probability: Calibrated probability of pneumonia; ``None`` on error.
        threshold: Decision threshold read from the served model.
        model_name: Served model name.
        model_version: Served model version.
        error: One-line reason when this input failed, else ``None``.
        sop_instance_uid: DICOM SOP Instance UID, when the input was DICOM.
    """

    source: str
    label: str | None
    probability: float | None
    threshold: float
    model_name: str
    model_version: str
    error: str | None = None
    sop_instance_uid: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter.

    Attributes:
        attempts: Total tries per request (1 = no retry).
        backoff_s: First backoff; doubles each retry.
        max_backoff_s: Cap of one backoff.
    """

    attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))


class PneumoniaClient:
    """Classify chest X-rays with the served pneumonia model.

    Example:
        >>> with PneumoniaClient("127.0.0.1:8001", protocol="grpc") as client:
        ...     for p in client.predict(["a.jpeg", "b.png"]):
        ...         print(p.source, p.label, p.probability)

    Args:
        url: ``host:port`` of Triton (gRPC 8001, HTTP 8000 by default), or for
            ``embedded`` the model repository path (default: the shipped one).
        protocol: ``grpc``, ``http`` or ``embedded`` (in-process onnxruntime).
        model: Model name in the repository.
        model_version: Version to use; empty for the server's choice.
        timeout_s: Per-request deadline.
        max_in_flight: Requests kept in flight at once (feeds the dynamic batcher).
        batch_size: Images per request (default: the model's ``max_batch_size``,
            capped at 16 so several requests overlap).
        retry: Retry policy for unavailable / overloaded / timed-out servers.
        preprocess_workers: Threads decoding images.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        protocol: str = "grpc",
        model: str = "pneumonia",
        model_version: str = "",
        timeout_s: float = 30.0,
        max_in_flight: int = 4,
        batch_size: int | None = None,
        retry: RetryPolicy | None = None,
        preprocess_workers: int = 2,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_in_flight < 1 or preprocess_workers < 1:
            raise ValueError("max_in_flight and preprocess_workers must be >= 1")
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.transport: Transport = self._with_retries(
            lambda: make_transport(protocol, url, model, model_version, timeout_s=timeout_s), "connect"
        )
        mbs = self.info.max_batch_size
        if batch_size is not None and not 1 <= batch_size <= mbs:
            raise ValueError(f"batch_size must be in [1, {mbs}] (the model's max_batch_size)")
        self.batch_size = batch_size or min(mbs, 16)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="cxr-infer")
        self._pre_pool = ThreadPoolExecutor(max_workers=preprocess_workers, thread_name_prefix="cxr-pre")

    @property
    def info(self) -> ModelInfo:
        """Served model name, version, max batch, threshold and labels."""
        return self.transport.info

    # -- core -------------------------------------------------------------
    def _with_retries(self, fn, what: str):  # type: ignore[no-untyped-def]
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except RetryableServerError as exc:
                if attempt + 1 >= self.retry.attempts:
                    raise
                delay = self.retry.delay(attempt)
                logger.warning("%s failed (%s); retry %d/%d in %.2f s", what, exc, attempt + 1, self.retry.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def infer_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N,)`` for a contract batch ``(N, 224, 224, 1) uint8`` of any N (split as needed).

        Raises:
            InvalidInputError: The batch violates the contract.
            ServerError: The server failed after the retries.
        """
        contract.validate_batch(batch)
        chunks = [batch[i : i + self.batch_size] for i in range(0, len(batch), self.batch_size)]
        futures = [
            self._pool.submit(self._with_retries, lambda c=c: self.transport.infer(c, timeout_s=self.timeout_s), "infer")
            for c in chunks
        ]
        return np.concatenate([f.result() for f in futures])

    def _prepare(self, source: contract.ImageSource) -> tuple[str, np.ndarray | None, str | None, str | None]:
        name = contract.describe(source)
        try:
            array, meta = contract.preprocess_with_meta(source, name=name)
            return name, array, None, meta.get("sop_instance_uid")
        except InvalidInputError as exc:
            return name, None, str(exc), None
        except Exception as exc:  # noqa: BLE001 - one bad file must not sink the batch
            return name, None, f"{name}: unexpected error while reading ({type(exc).__name__}: {exc})", None

    def predict(self, images: Sequence[contract.ImageSource]) -> list[Prediction]:
        """Classify images; a bad input fails alone (its ``error`` is set) and the rest complete.

        Server failures that outlast the retries are reported per image as errors too.
        """
        prepared = list(self._pre_pool.map(self._prepare, images))
        info = self.info
        good = [i for i, (_, arr, err, _) in enumerate(prepared) if err is None]
        probs: dict[int, float] = {}
        server_error: str | None = None
        if good:
            batch = np.stack([prepared[i][1] for i in good])  # type: ignore[misc]
            try:
                p = self.infer_batch(batch)
                probs = {i: float(v) for i, v in zip(good, p)}
            except CxrError as exc:
                server_error = f"inference failed: {exc}".splitlines()[0]
        out = []
        for i, (name, _, err, uid) in enumerate(prepared):
            if err is None and server_error is not None:
                err = f"{name}: {server_error}"
            prob = probs.get(i)
            label = None if prob is None else (info.labels[1] if prob >= info.threshold else info.labels[0])
            out.append(Prediction(name, label, prob, info.threshold, info.name, info.version, err, uid))
        return out

    # -- misc -------------------------------------------------------------
    def ready(self) -> bool:
        """Server and model are ready."""
        return self.transport.ready()

    def server_metadata(self) -> dict:
        return self.transport.server_metadata()

    def close(self) -> None:
        """Stop worker threads and close connections."""
        self._pool.shutdown(wait=True)
        self._pre_pool.shutdown(wait=True)
        self.transport.close()

    def __enter__(self) -> PneumoniaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

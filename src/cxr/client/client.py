"""The thin client: preprocessing, batching, concurrency, retries and thresholded labels."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cxr.client.connect import make_transport
from cxr.client.transport import PROTOCOLS, ModelInfo, Scores, Transport
from cxr.core import contract, imaging
from cxr.core.eligibility import Eligibility
from cxr.core.errors import CxrError, InvalidInputError, NotAssessableError, RetryableServerError
from cxr.core.security import TlsClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One input's final answer, built by keyword only (a positional field list would silently shift when a field
    is added).

    Attributes:
        source: The input's name (path, or a summary for in-memory inputs).
        status: ``ok``, ``not_assessable`` or ``error`` (:class:`cxr.core.contract.Status`).
        label: ``Normal`` or ``Pneumonia`` when ``status`` is ``ok``, else ``None``.
        probability: Calibrated P(pneumonia) when ``status`` is ``ok``, else ``None``
            (a not-assessable input's number would be a guess).
        threshold: Decision threshold read from the served model.
        model_name: Served model name.
        model_version: Served model version.
        reason: One line naming the rule (``not_assessable``) or the failure (``error``); ``None`` when ok.
        sop_instance_uid: DICOM SOP Instance UID, when the input was DICOM.
        ood_score: The served ``ood_score`` (``None`` when not computed).
        ood_threshold: The served OOD threshold (``None`` when the model has no OOD output).
        retryable: For errors: a transient server failure (unavailable, deadline, overload, server error) that
            a rerun should retry; ``False`` for input errors, which stay final until the file changes.
        refusal: For ``not_assessable``: the rule that refused the input, what it measured and the limit.
        model_sha256: sha256 of the served model file ('' when the server publishes none).
        operating_point: The named operating point whose threshold answered ('' for rows of older releases).
    """

    source: str
    status: contract.Status
    label: str | None
    probability: float | None
    threshold: float
    model_name: str
    model_version: str
    reason: str | None = None
    sop_instance_uid: str | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    retryable: bool = False
    refusal: contract.Refusal | None = None
    model_sha256: str = ""
    operating_point: str = ""

    def __post_init__(self) -> None:
        status = contract.Status(self.status)
        if (status is contract.Status.NOT_ASSESSABLE) != isinstance(self.refusal, contract.Refusal):
            raise ValueError(f"{self.source}: not_assessable needs the refusal (rule, value, limit), and only it has one")
        object.__setattr__(self, "status", status)
        if (status is contract.Status.OK) != (self.label is not None and self.probability is not None):
            raise ValueError(f"{self.source}: a label and probability come with status ok, and only with it")
        if (status is contract.Status.OK) == bool(self.reason):
            raise ValueError(f"{self.source}: a reason comes with not_assessable and error, and only with them")
        if self.retryable and status is not contract.Status.ERROR:
            raise ValueError("only errors are retryable")

    @property
    def ok(self) -> bool:
        """The model judged the image (``status == ok``)."""
        return self.status is contract.Status.OK

    @property
    def rule(self) -> str | None:
        """The refusal's rule (``None`` unless ``not_assessable``)."""
        return self.refusal.rule if self.refusal is not None else None

    @property
    def error(self) -> str | None:
        """The failure when ``status == error`` (kept for callers of the two-outcome API)."""
        return self.reason if self.status is contract.Status.ERROR else None


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


@dataclass(frozen=True)
class Prepared:
    """One input after decoding: the contract array, or the final status and one-line reason it gets without
    the model (``not_assessable`` by a rule, or ``error`` when unreadable)."""

    name: str
    array: np.ndarray | None
    uid: str | None = None
    status: contract.Status | None = None
    reason: str | None = None
    refusal: contract.Refusal | None = None
    age_years: float | None = None


def prepare(source: imaging.ImageSource, eligibility: Eligibility | None) -> Prepared:
    """Decode one input under the eligibility and pixel rules; never raises for a bad input. Shared by
    :meth:`PneumoniaClient.predict` and the Ray preprocessing tasks, so both refuse the same inputs."""
    name = imaging.describe(source)
    try:
        array, meta = imaging.preprocess_with_meta(source, name=name, eligibility=eligibility)
        return Prepared(name, array, meta.get("sop_instance_uid"), age_years=meta.get("age_years"))
    except NotAssessableError as exc:
        status, reason, refusal = contract.Status.NOT_ASSESSABLE, str(exc), contract.Refusal.of(exc)
    except InvalidInputError as exc:
        status, reason, refusal = contract.Status.ERROR, str(exc), None
    except Exception as exc:  # noqa: BLE001 - one bad file must not sink the batch
        status, reason, refusal = (contract.Status.ERROR, f"{name}: unexpected error while reading "
                                   f"({type(exc).__name__}: {exc})", None)
    return Prepared(name, None, None, status, reason.splitlines()[0], refusal)


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
        eligibility: DICOM eligibility rules overriding the served ones (default: the
            rules the served config publishes, else the shipped default).
        transport: A ready :class:`Transport` to use instead of connecting to ``url``
            (tests, custom transports); ``protocol`` and ``url`` are then ignored.
        tls: TLS settings (:class:`cxr.core.security.TlsClient`: the CA, and the client certificate for mutual TLS).
        config_key: The key for a server that restricts model-config (``cxr serve --config-key-file``).
        priority: ``urgent`` or ``routine`` (:data:`cxr.core.contract.PRIORITIES`): the Triton priority level its
            requests are sent at; :meth:`predict` can override it per call.
        operating_point: The served operating point every input is answered at (``pediatric``, ``adult``).
            ``None``: a DICOM input whose header states the patient's age gets its population's point
            (:func:`cxr.core.contract.population_for_age`), any other input the model's default point.
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
        eligibility: Eligibility | None = None,
        transport: Transport | None = None,
        tls: TlsClient | None = None,
        config_key: str | None = None,
        priority: str = contract.DEFAULT_PRIORITY,
        operating_point: str | None = None,
    ) -> None:
        self.priority = priority
        contract.priority_level(priority)  # validated before anything connects
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_in_flight < 1 or preprocess_workers < 1:
            raise ValueError("max_in_flight and preprocess_workers must be >= 1")
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.transport: Transport = transport or self._with_retries(
            lambda: make_transport(protocol, url, model, model_version, timeout_s=timeout_s, tls=tls,
                                   config_key=config_key), "connect"
        )
        try:
            self.info.threshold_for(operating_point)  # an unknown name fails here, naming the model's points
        except CxrError:
            self.transport.close()
            raise
        self.operating_point = operating_point
        mbs = self.info.max_batch_size
        if batch_size is not None and not 1 <= batch_size <= mbs:
            raise ValueError(f"batch_size must be in [1, {mbs}] (the model's max_batch_size)")
        self.batch_size = batch_size or min(mbs, 16)
        if eligibility is not None:
            self.eligibility = eligibility
        elif self.info.eligibility:
            self.eligibility = Eligibility.from_json(self.info.eligibility)
        else:
            self.eligibility = Eligibility.default()
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="cxr-infer")
        self._pre_pool = ThreadPoolExecutor(max_workers=preprocess_workers, thread_name_prefix="cxr-pre")

    @property
    def info(self) -> ModelInfo:
        """Served model name, version, max batch, threshold and labels."""
        return self.transport.info

    # -- core -------------------------------------------------------------
    def _with_retries(self, fn, what: str):
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

    def _infer_chunk(self, chunk: np.ndarray, priority: str | None = None) -> Scores:
        level = contract.priority_level(priority or self.priority)
        return self._with_retries(lambda: self.transport.infer(chunk, timeout_s=self.timeout_s, priority=level), "infer")

    def infer_scores(self, batch: np.ndarray) -> Scores:
        """Every model output for a contract batch ``(N, 224, 224, 1) uint8`` of any N (split as needed).

        Raises:
            InvalidInputError: The batch violates the contract.
            ServerError: A chunk failed after the retries.
        """
        contract.validate_batch(batch)
        futures = [self._pool.submit(self._infer_chunk, batch[i : i + self.batch_size])
                   for i in range(0, len(batch), self.batch_size)]
        parts = [f.result() for f in futures]
        ood = None if any(p.ood_score is None for p in parts) else np.concatenate([p.ood_score for p in parts])
        return Scores(np.concatenate([p.probability for p in parts]), ood)

    def infer_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N,)`` for a contract batch (see :meth:`infer_scores`)."""
        return self.infer_scores(batch).probability

    def point_for(self, age_years: float | None = None) -> tuple[str, float]:
        """The operating point (name, threshold) an input is answered at: the client's named point, else its
        population's point when its age is known and the model serves one, else the model's default."""
        if self.operating_point is not None:
            return self.info.threshold_for(self.operating_point)
        if age_years is not None:
            population = contract.population_for_age(age_years)
            if population in dict(self.info.operating_points):
                return self.info.threshold_for(population)
        return self.info.threshold_for(None)

    def _prepare(self, source: imaging.ImageSource) -> tuple[str, np.ndarray | None, Prediction | None, str | None,
                                                             float | None]:
        """Decode one input; an unreadable or ineligible input gets its final :class:`Prediction` here."""
        pre = prepare(source, self.eligibility)
        return pre.name, pre.array, None if pre.array is not None else self.refusal(pre), pre.uid, pre.age_years

    def refusal(self, pre: Prepared) -> Prediction:
        """The final answer for an input that never reached the model (``not_assessable`` or ``error``)."""
        if pre.status is None:
            raise ValueError(f"{pre.name} was decoded: it is answered by the model, not refused")
        info = self.info
        point, threshold = self.point_for(pre.age_years)
        return Prediction(source=pre.name, status=pre.status, label=None, probability=None, threshold=threshold,
                          model_name=info.name, model_version=info.version, reason=pre.reason,
                          ood_threshold=info.ood_threshold, refusal=pre.refusal, model_sha256=info.sha256,
                          operating_point=point)

    def failure(self, name: str, uid: str | None, exc: CxrError, age_years: float | None = None) -> Prediction:
        """The answer for an input whose inference failed after the retries: ``error``, retryable when the
        failure was transient (unavailable, deadline, overload, server error)."""
        info = self.info
        point, threshold = self.point_for(age_years)
        msg = f"inference failed: {exc}".splitlines()[0]
        return Prediction(source=name, status=contract.Status.ERROR, label=None, probability=None,
                          threshold=threshold, model_name=info.name, model_version=info.version,
                          reason=f"{name}: {msg}", sop_instance_uid=uid, ood_threshold=info.ood_threshold,
                          retryable=not isinstance(exc, InvalidInputError), model_sha256=info.sha256,
                          operating_point=point)

    def predict(self, images: Sequence[imaging.ImageSource], *, priority: str | None = None) -> list[Prediction]:
        """Give every input exactly one final :class:`Prediction`, in order.

        An unreadable input is an ``error``; an input the eligibility rules, the
        pixel rules or the served OOD score refuse is ``not_assessable``; the
        rest are ``ok``. Inputs are sent in chunks of ``batch_size``: a chunk
        that still fails after the retries fails alone (its images are
        ``error`` with ``retryable`` set for transient failures), and every
        other chunk keeps its results.
        """
        prepared = list(self._pre_pool.map(self._prepare, images))
        good = [i for i, (_, arr, _, _, _) in enumerate(prepared) if arr is not None]
        chunks = [good[i : i + self.batch_size] for i in range(0, len(good), self.batch_size)]
        futures = [self._pool.submit(self._infer_chunk, np.stack([prepared[i][1] for i in idx]), priority)  # type: ignore[misc]
                   for idx in chunks]
        answers: dict[int, Prediction] = {}
        for idx, fut in zip(chunks, futures):
            try:
                scores = fut.result()
            except CxrError as exc:
                for i in idx:
                    answers[i] = self.failure(prepared[i][0], prepared[i][3], exc, prepared[i][4])
                continue
            for k, i in enumerate(idx):
                answers[i] = self.judge(prepared[i][0], prepared[i][3], float(scores.probability[k]),
                                        None if scores.ood_score is None else float(scores.ood_score[k]),
                                        age_years=prepared[i][4])
        return [answers[i] if pre is None else pre for i, (_, _, pre, _, _) in enumerate(prepared)]

    def judge(self, name: str, uid: str | None, prob: float, ood: float | None, *,
              age_years: float | None = None) -> Prediction:
        """The answer for a served probability and OOD score: ``not_assessable`` above the served OOD
        threshold, else the label at the threshold of the input's operating point (:meth:`point_for`)."""
        info = self.info
        point, threshold = self.point_for(age_years)
        if ood is not None and contract.is_out_of_distribution(ood, info.ood_threshold):
            exc = contract.not_assessable(name, "out_of_distribution", f"ood_score {ood:.2f} > {info.ood_threshold:.2f}",
                                          value=ood, limit=info.ood_threshold)
            return Prediction(source=name, status=contract.Status.NOT_ASSESSABLE, label=None, probability=None,
                              threshold=threshold, model_name=info.name, model_version=info.version, reason=str(exc),
                              sop_instance_uid=uid, ood_score=ood, ood_threshold=info.ood_threshold,
                              refusal=contract.Refusal.of(exc), model_sha256=info.sha256, operating_point=point)
        label = contract.label_for(prob, threshold, info.labels)
        return Prediction(source=name, status=contract.Status.OK, label=label, probability=prob, threshold=threshold,
                          model_name=info.name, model_version=info.version, sop_instance_uid=uid, ood_score=ood,
                          ood_threshold=info.ood_threshold, model_sha256=info.sha256, operating_point=point)

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

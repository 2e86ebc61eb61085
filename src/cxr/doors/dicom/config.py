"""What ``cxr listen`` does (:class:`ListenConfig`) and where its DICOM results go (:class:`Destination`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.doors.dicom.intake import ScreenFilter, UrgentRule

if TYPE_CHECKING:
    from cxr.core.security import HttpAuth, TlsClient, TlsServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    """Where results go: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16 or not self.ae_title.strip():
            raise ValueError(f"AE title must be 1-16 characters, got {self.ae_title!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = re.fullmatch(r"([^@]{1,16})@(.+):(\d+)", text.strip())
        if not m:
            raise ValueError(f"expected AET@HOST:PORT, got {text!r}")
        return cls(m.group(1), m.group(2).strip("[]"), int(m.group(3)))


@dataclass(frozen=True)
class ListenConfig:
    """What ``cxr listen`` does.

    Attributes:
        spool: The durable state folder (incoming, outbox, done).
        host: Address to listen on (loopback by default).
        port: DICOM port.
        ae_title: This SCP's AE title.
        send_to: Where results go (``None``: results stay in the outbox).
        allow: Calling AE titles accepted (empty: any).
        out: Results CSV (the columns of ``cxr predict``), one row per instance.
        url: Inference server (or the repository for ``embedded``).
        protocol: ``grpc``, ``http`` or ``embedded``.
        model: Served model name.
        heatmap: Also send the Grad-CAM overlay as a Secondary Capture, for Pneumonia answers.
        repository: Model repository for the heatmap (its file must be the served model).
        send_backoff_s: First wait after a failed send; doubles up to ``max_backoff_s``.
        max_backoff_s: Longest wait between send attempts.
        batch: Instances screened per inference call.
        tls: TLS to the inference server (:class:`cxr.core.security.TlsClient`).
        config_key: Key for an inference server that restricts model-config.
        dicom_tls: DICOM TLS for incoming associations (:class:`cxr.core.security.TlsServer`; mutual with a client CA).
        send_tls: DICOM TLS for sending results (:class:`cxr.core.security.TlsClient`).
        metrics_port: Serve Prometheus metrics on this port (0 picks a free port).
        metrics_host: The address the metrics are served on (loopback by default; a Prometheus on another host
            needs this host's address, or ``0.0.0.0``).
        stow_url: A DICOMweb root: results are also (or only) stored there with STOW-RS.
        fhir_url: A FHIR server's base URL: each screened instance's results are POSTed there.
        fhir_out: An NDJSON file: one line per screened instance, its FHIR transaction Bundle (appended).
        audit_log: The hash-chained audit trail to append every event to.
        urgent_if: Site rules that make a study urgent (besides Requested Procedure Priority STAT/HIGH).
        screen: Which received instances are screened; the others are accepted and dropped.
        redeliver: On start, put the results parked in ``dead-letter-<destination>/`` back into their outboxes.
        study_quiet_s: One result per study (:mod:`cxr.doors.dicom.study`): a study is answered once nothing of
            it has arrived for this many seconds (``None``: one result per instance).
        web_auth: How ``stow_url`` and ``fhir_url`` authenticate (:class:`cxr.core.security.HttpAuth`).
        retention_days: Done and delivered markers, and what answered studies were answered with, are kept this many
            days (checked at start and every hour), then removed: an instance sent again after that is screened again,
            a film of a study answered that long ago makes a new study result.
        patient_id_system: The site's patient identifier system (a URI) for the FHIR results' subjects, where the
            header names no IssuerOfPatientID that is a system.
        operating_point: Answer every film at this served operating point (``None``: by the patient's age in the
            header, else the model's default).
    """

    spool: Path
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "CXR_AI"
    send_to: Destination | None = None
    allow: tuple[str, ...] = ()
    out: Path | None = None
    url: str | None = None
    protocol: str = "embedded"
    model: str = "pneumonia"
    heatmap: bool = False
    repository: Path | None = None
    send_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    batch: int = 16
    tls: TlsClient | None = field(default=None, repr=False)
    config_key: str | None = field(default=None, repr=False)
    dicom_tls: TlsServer | None = None
    send_tls: TlsClient | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    stow_url: str | None = None
    fhir_url: str | None = None
    fhir_out: Path | None = None
    audit_log: Path | None = None
    urgent_if: tuple[UrgentRule, ...] = ()
    screen: ScreenFilter = ScreenFilter()
    redeliver: bool = False
    study_quiet_s: float | None = None
    web_auth: HttpAuth | None = field(default=None, repr=False)
    operating_point: str | None = None
    patient_id_system: str | None = None
    retention_days: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16:
            raise ValueError("the AE title must be 1-16 characters")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.send_backoff_s <= 0 or self.max_backoff_s < self.send_backoff_s:
            raise ValueError("need 0 < send_backoff_s <= max_backoff_s")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if self.study_quiet_s is not None and not 0 <= self.study_quiet_s <= 86400:
            raise ValueError("--study-quiet-s must be in 0..86400 seconds")
        from cxr.core.security import is_loopback

        if not 0 < self.retention_days <= 3650:
            raise ValueError("--retention-days must be in (0, 3650]")
        if self.patient_id_system is not None:
            if not (self.fhir_url or self.fhir_out):
                raise ValueError("--patient-id-system names the patients of FHIR results: give --fhir-url or "
                                 "--fhir-out too")
            if not re.match(r"^(urn:[a-z0-9][a-z0-9-]*:\S+|https?://\S+)$", self.patient_id_system, re.I):
                raise ValueError(f"--patient-id-system must be a URI (urn:oid:..., http(s)://...), got "
                                 f"{self.patient_id_system!r}")
        if not self.metrics_host.strip():
            raise ValueError("--metrics-host must name an address")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError("--metrics-port must be in 0..65535")
        if not is_loopback(self.host) and self.dicom_tls is None:
            logger.warning("listening on %s without DICOM TLS: keep this link on a trusted network", self.host)

    @property
    def destinations(self) -> tuple[str, ...]:
        """The outboxes this configuration fills: ``dimse`` (C-STORE), ``stow``, ``fhir``. Without any destination,
        results wait in the C-STORE outbox."""
        dimse = self.send_to is not None or not (self.stow_url or self.fhir_url)
        return tuple(k for k, on in (("dimse", dimse), ("stow", self.stow_url), ("fhir", self.fhir_url)) if on)

"""``cxr listen``: a DICOM Storage SCP that screens what it receives and sends DICOM SR results back to the PACS.

Durable by design; the spool folder holds every state, so a restart finishes
whatever was in flight and never drops or duplicates a result:

* ``incoming/<SOP Instance UID>.dcm``: written to a temporary file, fsynced and
  renamed (and the folder fsynced) *before* C-STORE answers success;
* ``done/<SOP Instance UID>``: a marker once the instance's result is in the
  outbox and the CSV; a second copy of the same instance is acknowledged and
  skipped (deduplication by SOP Instance UID);
* ``outbox/<UID>.dcm`` (C-STORE, ``--send-to``), ``outbox-stow/<UID>.dcm``
  (STOW-RS, ``--stow-url``) and ``outbox-fhir/<UID>.json`` (a FHIR transaction
  Bundle, ``--fhir-url``): results waiting for their destination; each has a
  sender that retries with exponential backoff and removes a file only after
  the destination confirmed it. Result UIDs are derived from the source UID and
  the model's sha256, so a resend after a crash replaces rather than duplicates.
* ``incoming/<UID>.urgent``: an urgent study's marker (Requested Procedure
  Priority STAT or HIGH, or a site rule such as the emergency department's
  Station Name): urgent instances are screened first, at Triton's urgent level.

Screening runs asynchronously (one worker, in batches), through the project's
client: the eligibility rules and ``not_assessable`` apply as everywhere. A
transient inference failure leaves the instance in ``incoming`` for a retry; an
unreadable instance gets an error row and no SR. Logs carry SOP Instance UIDs,
never patient attributes; with ``--audit-log`` every event goes to the
hash-chained audit trail (:mod:`cxr.core.audit_trail`).
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.core import contract, imaging
from cxr.core.durable import AppendOnlyCsv, fsync_dir, write_durably
from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)

#: SOP classes screened: CR, DX for presentation and for processing, and Secondary Capture.
ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: C-STORE statuses.
SUCCESS = 0x0000
REFUSED_SOP_CLASS = 0x0122  # Refused: SOP Class not supported
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Requested Procedure Priority (0040,1003) values that make a study urgent.
URGENT_PRIORITIES = ("STAT", "HIGH")
#: C-STORE failure statuses worth a retry (the peer is short of resources or failed to process); any other
#: failure refuses that one result for good.
RETRYABLE_STORE_STATUSES = range(0xA700, 0xA800)
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class ScreenFilter:
    """Which received instances are screened. The others are accepted (C-STORE success, so that a PACS routing a
    whole study goes on with the rest of it), counted and audited as dropped, and not kept.

    Attributes:
        sop_classes: SOP Class UIDs screened (default: CR, DX for presentation and for processing, Secondary
            Capture).
        modalities: Modality (0008,0060) values screened, upper case (empty: any).
        body_parts: Body Part Examined (0018,0015) values screened, upper case (empty: any; an instance without one
            is screened, the eligibility rules judge it).
    """

    sop_classes: tuple[str, ...] = tuple(ACCEPTED_SOP_CLASSES)
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.sop_classes:
            raise ValueError("--screen-sop-class: name at least one SOP class to screen")
        for uid in self.sop_classes:
            if not _UID.match(uid) or len(uid) > 64:
                raise ValueError(f"--screen-sop-class: {uid!r} is not a UID")
        for what, values in (("--screen-modality", self.modalities), ("--screen-body-part", self.body_parts)):
            for v in values:
                if not v.strip() or v != v.strip().upper() or len(v) > 16:
                    raise ValueError(f"{what}: {v!r} must be an upper-case DICOM code string (e.g. DX, CHEST)")

    @classmethod
    def of(cls, sop_classes: tuple[str, ...] = (), modalities: tuple[str, ...] = (),
           body_parts: tuple[str, ...] = ()) -> ScreenFilter:
        """From command-line values (empty SOP classes: the default set; case folded)."""
        return cls(tuple(sop_classes) or tuple(ACCEPTED_SOP_CLASSES), tuple(m.strip().upper() for m in modalities),
                   tuple(b.strip().upper() for b in body_parts))

    def drop_reason(self, sop_class: str, ds=None) -> str | None:  # type: ignore[no-untyped-def]
        """Why an instance is not screened (``sop_class``, ``modality`` or ``body_part``), or ``None``."""
        if sop_class not in self.sop_classes:
            return "sop_class"
        if ds is None:
            return None
        if self.modalities and str(ds.get("Modality", "") or "").strip().upper() not in self.modalities:
            return "modality"
        part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        if self.body_parts and part and part not in self.body_parts:
            return "body_part"
        return None


@dataclass(frozen=True)
class UrgentRule:
    """A site rule: a study is urgent when a header attribute has one of these values (case-insensitive), e.g.
    ``InstitutionalDepartmentName=Emergency`` or ``StationName=ED-DX-1``."""

    keyword: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        from pydicom.datadict import tag_for_keyword

        if tag_for_keyword(self.keyword) is None:
            raise ValueError(f"--urgent-if: {self.keyword!r} is not a DICOM keyword")
        if not self.values or not all(v.strip() for v in self.values):
            raise ValueError(f"--urgent-if {self.keyword}: give the values that make a study urgent")

    @classmethod
    def parse(cls, text: str) -> UrgentRule:
        key, sep, values = text.partition("=")
        if not sep:
            raise ValueError(f"--urgent-if: expected KEYWORD=VALUE[,VALUE...], got {text!r}")
        return cls(key.strip(), tuple(v.strip() for v in values.split(",")))

    def matches(self, ds) -> bool:  # type: ignore[no-untyped-def]
        value = str(ds.get(self.keyword, "") or "").strip().upper()
        return bool(value) and value in {v.upper() for v in self.values}


def study_priority(ds, rules: tuple[UrgentRule, ...] = ()) -> str:  # type: ignore[no-untyped-def]
    """``urgent`` when the header's Requested Procedure Priority (top level or in the Request Attributes
    Sequence) is STAT or HIGH, or a site rule matches; ``routine`` otherwise."""
    values = [ds.get("RequestedProcedurePriority", "")]
    for item in ds.get("RequestAttributesSequence", None) or []:
        values.append(item.get("RequestedProcedurePriority", ""))
    if any(str(v or "").strip().upper() in URGENT_PRIORITIES for v in values) or any(r.matches(ds) for r in rules):
        return "urgent"
    return "routine"


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
        dicom_tls: DICOM TLS for incoming associations (:class:`cxr.core.security.TlsServer`; mutual with a client CA).
        send_tls: DICOM TLS for sending results (:class:`cxr.core.security.TlsClient`).
        stow_url: A DICOMweb root: results are also (or only) stored there with STOW-RS.
        fhir_url: A FHIR server's base URL: each screened instance's results are POSTed there.
        fhir_out: An NDJSON file: one line per screened instance, its FHIR transaction Bundle (appended).
        audit_log: The hash-chained audit trail to append every event to.
        urgent_if: Site rules that make a study urgent (besides Requested Procedure Priority STAT/HIGH).
        screen: Which received instances are screened; the others are accepted and dropped.
        redeliver: On start, put the results parked in ``dead-letter-<destination>/`` back into their outboxes.
        study_quiet_s: One result per study (:mod:`cxr.hospital.dicom.study`): a study is answered once nothing of it has
            arrived for this many seconds (``None``: one result per instance).
        web_auth: How ``stow_url`` and ``fhir_url`` authenticate (:class:`cxr.core.security.HttpAuth`).
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
    tls: object | None = field(default=None, repr=False)
    config_key: str | None = field(default=None, repr=False)
    dicom_tls: object | None = None
    send_tls: object | None = None
    metrics_port: int | None = None
    stow_url: str | None = None
    fhir_url: str | None = None
    fhir_out: Path | None = None
    audit_log: Path | None = None
    urgent_if: tuple[UrgentRule, ...] = ()
    screen: ScreenFilter = ScreenFilter()
    redeliver: bool = False
    study_quiet_s: float | None = None
    web_auth: object | None = field(default=None, repr=False)
    operating_point: str | None = None

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

        if not is_loopback(self.host) and self.dicom_tls is None:
            logger.warning("listening on %s without DICOM TLS: keep this link on a trusted network", self.host)


class _Unanswerable(Exception):
    """An instance no result can be made for (set aside with ``why``, a code, and the message, a reason)."""

    def __init__(self, why: str, reason: str, study: str = "") -> None:
        super().__init__(reason)
        self.why = why
        self.study = study


class Spool:
    """The durable state folder."""

    #: Outbox folder per destination kind.
    OUTBOXES = {"dimse": "outbox", "stow": "outbox-stow", "fhir": "outbox-fhir"}

    def __init__(self, root: Path, destinations: tuple[str, ...] = ("dimse",)) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.done = self.root / "done"
        self.outboxes = {k: self.root / self.OUTBOXES[k] for k in destinations}
        for d in (self.incoming, self.outbox, self.done, *self.outboxes.values()):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.root.rglob(".*.tmp"):  # a crash mid-write: the sender was never told success
            stale.unlink(missing_ok=True)

    def is_done(self, uid: str) -> bool:
        return (self.done / uid).exists()

    def receive(self, uid: str, data: bytes, *, urgent: bool = False) -> bool:
        """Store an incoming instance durably (an urgent one's marker first); ``False`` when it was already
        screened (a duplicate)."""
        if self.is_done(uid):
            return False
        if urgent:
            write_durably(self.incoming / f"{uid}.urgent", b"")
        write_durably(self.incoming / f"{uid}.dcm", data)
        return True

    def is_urgent(self, path: Path) -> bool:
        return path.with_suffix(".urgent").exists()

    def pending(self) -> list[Path]:
        """Instances waiting, urgent ones first, each group in arrival order."""
        files = []
        for p in self.incoming.glob("*.dcm"):
            try:
                files.append((not self.is_urgent(p), p.stat().st_mtime, p))
            except FileNotFoundError:  # finished meanwhile
                continue
        return [p for _, _, p in sorted(files)]

    @property
    def dead_letter(self) -> Path:
        """Instances that cannot be answered, each beside ``<UID>.why`` (JSON: the reason)."""
        return self.root / "dead-letter"

    def parked(self, kind: str) -> Path:
        """Results a destination refused for good, each beside ``<name>.why``."""
        return self.root / f"dead-letter-{kind}"

    @staticmethod
    def _why(folder: Path, name: str, reason: str, **detail: object) -> None:
        import datetime as dt
        import json

        folder.mkdir(exist_ok=True)
        why = {"reason": reason, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **detail}
        write_durably(folder / f"{name}.why", (json.dumps(why) + "\n").encode())

    def set_aside(self, uid: str, reason: str) -> None:
        """An instance that cannot be answered leaves the queue for ``dead-letter/`` with its reason (the reason
        first, so a crash in between leaves the instance queued, never lost)."""
        self._why(self.dead_letter, uid, reason)
        src = self.incoming / f"{uid}.dcm"
        if src.exists():
            src.replace(self.dead_letter / f"{uid}.dcm")
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        fsync_dir(self.incoming)
        fsync_dir(self.dead_letter)

    def park(self, kind: str, f: Path, reason: str) -> Path:
        """A result its destination refused for good, out of the outbox into ``dead-letter-<kind>/``."""
        folder = self.parked(kind)
        self._why(folder, f.name, reason)
        f.replace(folder / f.name)
        f.with_name(f"{f.name}.urgent").unlink(missing_ok=True)
        fsync_dir(folder)
        return folder / f.name

    def redeliver(self) -> dict[str, int]:
        """Parked results back into their outboxes (their reasons removed); the count per destination."""
        moved = {}
        for kind, outbox in self.outboxes.items():
            folder, n = self.parked(kind), 0
            for f in sorted(folder.glob("*")) if folder.is_dir() else []:
                if f.suffix == ".why" or f.name.startswith("."):
                    continue
                f.replace(outbox / f.name)
                (folder / f"{f.name}.why").unlink(missing_ok=True)
                n += 1
            if n:
                fsync_dir(outbox)
            moved[kind] = n
        return moved

    def finish(self, uid: str, results: list[tuple[str, str, bytes]], *, urgent: bool = False) -> None:
        """Results into their outboxes (``(kind, name, data)``; an urgent study's marked ``<name>.urgent`` first,
        and each result dated with the instance's arrival, for the end-to-end latency), then the done marker, then
        the incoming file and its marker away (in that order)."""

        src = self.incoming / f"{uid}.dcm"
        try:
            arrived = src.stat().st_mtime
        except FileNotFoundError:
            arrived = None
        self._to_outboxes(results, urgent=urgent, arrived=arrived)
        write_durably(self.done / uid, b"")
        src.unlink(missing_ok=True)
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        fsync_dir(self.incoming)

    def _to_outboxes(self, results: list[tuple[str, str, bytes]], *, urgent: bool, arrived: float | None) -> None:
        """Each result into its destination's outbox (urgent marker first), dated with the film's arrival so that
        the end-to-end latency counts from it."""
        import os

        for kind, name, data in results:
            if kind in self.outboxes:
                if urgent:
                    write_durably(self.outboxes[kind] / f"{name}.urgent", b"")
                write_durably(self.outboxes[kind] / name, data)
                if arrived is not None:
                    os.utime(self.outboxes[kind] / name, (arrived, arrived))

    @property
    def studies(self) -> Path:
        """Screened instances waiting for the rest of their study: ``studies/<Study UID>/<UID>.dcm`` and
        ``<UID>.json`` (the answer)."""
        return self.root / "studies"

    def hold(self, study: str, uid: str, answer: bytes, *, urgent: bool = False) -> None:
        """A screened instance into its study's folder (the answer first, then the instance, then the markers)."""
        folder = self.studies / study
        folder.mkdir(parents=True, exist_ok=True)
        if urgent:
            write_durably(folder / ".urgent", b"")
        write_durably(folder / f"{uid}.json", answer)
        src = self.incoming / f"{uid}.dcm"
        if src.exists():
            src.replace(folder / f"{uid}.dcm")  # keeps its arrival time
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        fsync_dir(self.incoming)
        fsync_dir(folder)

    def finish_study(self, folder: Path, uids: list[str], results: list[tuple[str, str, bytes]]) -> None:
        """A study's results into their outboxes (dated with its first arrival), then every instance's done marker,
        then the study's folder away."""
        import shutil

        urgent = (folder / ".urgent").exists()
        arrived = min((p.stat().st_mtime for p in folder.glob("*.dcm")), default=None)
        self._to_outboxes(results, urgent=urgent, arrived=arrived)
        for uid in uids:
            write_durably(self.done / uid, b"")
        shutil.rmtree(folder)
        fsync_dir(self.studies)

    def queued(self, kind: str) -> list[Path]:
        """Results waiting in one outbox: urgent studies' first, then by arrival."""
        files = []
        for p in self.outboxes[kind].iterdir():
            if p.name.startswith(".") or p.suffix == ".urgent":
                continue
            try:
                files.append((not p.with_name(f"{p.name}.urgent").exists(), p.stat().st_mtime, p.name, p))
            except FileNotFoundError:
                continue
        return [p for *_, p in sorted(files)]

    def sent(self, f: Path) -> None:
        """A result its destination confirmed: removed (with its urgency marker)."""
        f.unlink(missing_ok=True)
        f.with_name(f"{f.name}.urgent").unlink(missing_ok=True)


class Listener:
    """The SCP, the screening worker and the result sender (start, then stop)."""

    def __init__(self, cfg: ListenConfig) -> None:
        from cxr.client.results import CSV_COLUMNS

        self.cfg = cfg
        # without any destination, results wait in outbox/ (the C-STORE outbox) as they always did
        dimse = cfg.send_to is not None or not (cfg.stow_url or cfg.fhir_url)
        kinds = tuple(k for k, on in (("dimse", dimse), ("stow", cfg.stow_url), ("fhir", cfg.fhir_url)) if on)
        self.spool = Spool(cfg.spool, kinds)
        self.csv = AppendOnlyCsv(cfg.out, CSV_COLUMNS) if cfg.out else None  # the columns of cxr predict
        self.audit = None
        if cfg.audit_log is not None:
            from cxr.core.audit_trail import AuditLog, default_actor

            self.audit = AuditLog(cfg.audit_log, component="cxr listen")
            self._me = default_actor()
        self._fhir_lines = None
        if cfg.fhir_out is not None:
            from cxr.core.durable import AppendOnlyLines

            self._fhir_lines = AppendOnlyLines(cfg.fhir_out)  # type: ignore[assignment]
        self._screen_failures: dict[str, int] = {}
        self._unscreened: dict[str, set[str]] = {}  # study -> instances received, not yet screened (study mode)
        self._arrived: dict[str, float] = {}  # study -> time of its last arrival (study mode)
        self._study_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_worker = threading.Event()
        self._senders: dict[str, threading.Event] = {}
        self._server = None
        self._threads: list[threading.Thread] = []
        self._client = None
        self._gradcam = None
        self.stats = {"received": 0, "duplicates": 0, "refused": 0, "dropped": 0, "screened": 0, "set_aside": 0,
                      "sent": 0, "send_failures": 0, "parked": 0, "urgent": 0}
        self.metrics = None
        self.metrics_port: int | None = None

    # -- the SCP --------------------------------------------------------------------------------------------
    def _ae(self):  # type: ignore[no-untyped-def]
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.cfg.ae_title)
        ae.add_supported_context(Verification)
        for ctx in StoragePresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        if self.cfg.allow:
            ae.require_calling_aet = list(self.cfg.allow)
        ae.require_called_aet = True  # an association addressed to another AE title is not for us
        ae.maximum_pdu_size = 0
        return ae

    def _on_echo(self, event) -> int:  # type: ignore[no-untyped-def]
        return SUCCESS

    def _on_rejected(self, event) -> None:  # type: ignore[no-untyped-def]
        """An association refused (calling AE title not allowed, called AE title not ours): counted and audited."""
        req = event.assoc.requestor
        calling = str(getattr(req, "ae_title", "") or "").strip()
        called = str(getattr(event.assoc.acceptor, "ae_title", "") or "").strip()
        why = "calling_ae" if self.cfg.allow and calling not in self.cfg.allow else "called_ae"
        self.stats["refused"] += 1
        self._metric("refused", why=why)
        self._audit("refused", actor=f"ae:{calling}", outcome="failure", why=why, called_ae=called,
                    peer=str(getattr(req, "address", "") or ""))
        logger.warning("association from %s refused (%s)", calling or "?", why)

    def _on_store(self, event) -> int:  # type: ignore[no-untyped-def]
        req = event.request
        sop_class = str(req.AffectedSOPClassUID)
        uid = str(req.AffectedSOPInstanceUID)
        calling = str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()
        if not _UID.match(uid) or len(uid) > 64:
            self.stats["refused"] += 1
            self._metric("refused", why="bad_instance_uid")
            self._audit("refused", actor=f"ae:{calling}", outcome="failure", why="bad_instance_uid",
                        status=CANNOT_UNDERSTAND)
            return CANNOT_UNDERSTAND
        ds = None
        if sop_class in self.cfg.screen.sop_classes:
            try:
                ds = event.dataset
                ds.get("Modality")  # decode the header now
            except Exception:  # noqa: BLE001 - an undecodable header: spooled, screened as an error, set aside
                ds = None
        why = self.cfg.screen.drop_reason(sop_class, ds)
        if why is not None:  # not ours to screen: accepted (the rest of the study goes on), not kept
            self.stats["dropped"] += 1
            study = ""
            try:
                study = str(event.dataset.get("StudyInstanceUID", "") or "")
            except Exception:  # noqa: BLE001 - a header we do not screen need not decode
                pass
            logger.info("dropped C-STORE of SOP class %s (instance %s): not screened (%s)", sop_class, uid, why)
            self._audit("dropped", actor=f"ae:{calling}", study_uid=study, instance_uid=uid, why=why,
                        sop_class=sop_class)
            self._metric("dropped", why=why)
            return SUCCESS
        try:
            urgent = ds is not None and study_priority(ds, self.cfg.urgent_if) == "urgent"
            study = str(ds.get("StudyInstanceUID", "") or "") if ds is not None else ""
        except Exception:  # noqa: BLE001 - an undecodable header: screened (and set aside) like any other
            urgent, study = False, ""
        try:
            data = event.encoded_dataset(include_meta=True)
            fresh = self.spool.receive(uid, data, urgent=urgent)
        except OSError as exc:
            logger.error("cannot spool instance %s: %s", uid, exc.strerror or exc)
            self._audit("received", actor=f"ae:{calling}", outcome="failure", study_uid=study, instance_uid=uid,
                        why="spool")
            return OUT_OF_RESOURCES
        self._audit("received", actor=f"ae:{calling}", study_uid=study, instance_uid=uid,
                    priority="urgent" if urgent else "routine", duplicate=not fresh)
        if fresh:
            self.stats["received"] += 1
            self._metric("received")
            self._note_arrival(study, uid)
            self.stats["urgent"] += int(urgent)
            self._wake_worker.set()
        else:
            self.stats["duplicates"] += 1
            logger.info("instance %s already screened: acknowledged, skipped", uid)
        return SUCCESS

    def _audit(self, event: str, *, actor: str | None = None, **kw) -> None:  # type: ignore[no-untyped-def]
        if self.audit is not None:
            self.audit.event(event, actor=actor or self._me, **kw)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Listener:
        from pynetdicom import evt

        from cxr.client import PneumoniaClient

        self._client = PneumoniaClient(self.cfg.url, protocol=self.cfg.protocol, model=self.cfg.model,  # type: ignore[assignment]
                                       tls=self.cfg.tls, config_key=self.cfg.config_key,  # type: ignore[arg-type]
                                       operating_point=self.cfg.operating_point)
        if not self._client.info.sha256:  # type: ignore[attr-defined]
            raise CxrError("the served model publishes no sha256: result UIDs cannot be made stable")
        if self.cfg.heatmap:
            from cxr.client.explain import ExplanationUnavailable, GradCam
            from cxr.core.paths import DEFAULT_REPOSITORY

            try:
                self._gradcam = GradCam(Path(self.cfg.repository or DEFAULT_REPOSITORY) / self.cfg.model,  # type: ignore[assignment]
                                        served_sha256=self._client.info.sha256)  # type: ignore[attr-defined]
            except ExplanationUnavailable as exc:
                raise CxrError(f"--heatmap: {exc}") from None
        if self.cfg.metrics_port is not None:
            from cxr.client.metrics import ScreeningMetrics

            self.metrics = ScreeningMetrics(self._client.info.ood_threshold)  # type: ignore[attr-defined,assignment]
            self.metrics_port = self.metrics.serve(self.cfg.metrics_port)  # type: ignore[attr-defined]
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        ssl_context = None
        if self.cfg.dicom_tls is not None:
            ssl_context = _server_ssl_context(self.cfg.dicom_tls)
        if self.cfg.study_quiet_s is not None:  # instances spooled before a restart count for their studies
            import pydicom

            for f in self.spool.pending():
                try:
                    study = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                                .get("StudyInstanceUID", "") or "")
                except Exception:  # noqa: BLE001 - an unreadable one is set aside when screened
                    continue
                self._note_arrival(study, f.stem)
        if self.cfg.redeliver:
            moved = self.spool.redeliver()
            for kind, n in moved.items():
                if n:
                    logger.info("%d parked results back in the %s outbox (--redeliver)", n, kind)
        try:
            self._server = self._ae().start_server((self.cfg.host, self.cfg.port), block=False,
                                                   evt_handlers=handlers, ssl_context=ssl_context)
        except OSError as exc:
            if self.metrics is not None:
                self.metrics.close()
            raise CxrError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc}") from None
        info = self._client.info  # type: ignore[attr-defined]
        self._audit("started", port=self.cfg.port, ae_title=self.cfg.ae_title)
        self._audit("model_changed", model_sha256=info.sha256, model=info.name, version=info.version,
                    threshold=info.threshold)
        self._senders = {kind: threading.Event() for kind in self.spool.outboxes}
        workers: list[tuple[Callable[..., None], str, tuple[str, ...]]] = [(self._work, "cxr-listen-screen", ())]
        workers += [(self._send, f"cxr-listen-send-{kind}", (kind,)) for kind in self.spool.outboxes]
        for target, name, args in workers:
            t = threading.Thread(target=target, name=name, args=args, daemon=True)
            t.start()
            self._threads.append(t)
        self._wake_worker.set()  # finish whatever the spool holds
        for ev in self._senders.values():
            ev.set()
        logger.info("listening as %s on %s:%d; spool %s", self.cfg.ae_title, self.cfg.host, self.cfg.port, self.cfg.spool)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake_worker.set()
        for ev in self._senders.values():
            ev.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(timeout=30)
        if self._client is not None:
            self._client.close()
        if self.csv is not None:
            self.csv.close()
        if self._fhir_lines is not None:
            self._fhir_lines.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.audit is not None:
            self._audit("stopped", counts=dict(self.stats))
            self.audit.close()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def idle(self) -> bool:
        """Nothing left to screen or send."""
        waiting = self.spool.studies.is_dir() and any(self.spool.studies.iterdir())
        return not self.spool.pending() and not waiting and not any(self.spool.queued(k) for k in self.spool.outboxes)

    # -- screening ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        backoff = 0.5
        quiet = self.cfg.study_quiet_s
        tick = 2.0 if quiet is None else min(2.0, max(0.1, quiet / 4))
        while not self._stop.is_set():
            self._wake_worker.wait(timeout=tick)
            self._wake_worker.clear()
            while not self._stop.is_set():
                self._close_studies()
                files = self.spool.pending()[: self.cfg.batch]
                if not files:
                    break
                try:
                    progressed = self._screen(files)
                except Exception:  # noqa: BLE001 - the worker must survive; the files stay in the spool
                    logger.exception("screening a batch of %d failed; screening them one by one", len(files))
                    progressed = self._screen_one_by_one(files)
                if not progressed:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    break
                backoff = 0.5

    #: Tries of an instance whose screening raises before it is set aside.
    MAX_SCREEN_FAILURES = 3

    def _screen_one_by_one(self, files: list[Path]) -> bool:
        """After a batch raised: each instance alone; one that raises :attr:`MAX_SCREEN_FAILURES` times is set
        aside, so that it never holds the queue."""
        progressed = False
        for f in files:
            if self._stop.is_set():
                break
            try:
                progressed |= self._screen([f])
            except Exception as exc:  # noqa: BLE001
                n = self._screen_failures.get(f.stem, 0) + 1
                self._screen_failures[f.stem] = n
                if n >= self.MAX_SCREEN_FAILURES:
                    self._set_aside(f.stem, "screening_failed", f"screening raised {n} times: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}")
                    progressed = True
        return progressed

    def _set_aside(self, uid: str, why: str, reason: str, study: str = "") -> None:
        """An instance that cannot be answered: out of the queue into ``dead-letter/`` with its reason, audited,
        counted."""
        self.spool.set_aside(uid, reason)
        self._screen_failures.pop(uid, None)
        self._screened(uid)
        self.stats["set_aside"] += 1
        self._metric("set_aside", why=why)
        self._audit("screened", outcome="failure", study_uid=study, instance_uid=uid, status="set_aside", why=why)
        logger.error("instance %s set aside in %s: %s", uid, self.spool.dead_letter, reason)

    def _metric(self, what: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.count(what, **labels)  # type: ignore[attr-defined]

    def _screen(self, files: list[Path]) -> bool:
        """Screen a batch (its urgent instances first, at the urgent level); ``True`` when at least one instance
        reached a final state."""
        urgent = [f for f in files if self.spool.is_urgent(f)]
        routine = [f for f in files if f not in set(urgent)]
        progressed = False
        for group, priority in ((urgent, "urgent"), (routine, "routine")):
            if group:
                preds = self._client.predict([str(f) for f in group], priority=priority)  # type: ignore[attr-defined]
                progressed |= self._finish(group, preds, priority)
        if progressed:
            for ev in self._senders.values():
                ev.set()
        return progressed

    def _finish(self, files: list[Path], preds: list, priority: str) -> bool:  # type: ignore[type-arg]
        progressed = False
        for f, pred in zip(files, preds):
            uid = f.stem
            if pred.status is contract.Status.ERROR and pred.retryable:
                logger.warning("instance %s: transient failure, kept for a retry", uid)
                continue
            try:
                self._finish_one(f, pred, priority)
            except _Unanswerable as exc:
                self._set_aside(uid, exc.why, str(exc), exc.study)
            except Exception as exc:  # noqa: BLE001 - one instance's failure must not hold the others
                self._set_aside(uid, "result_failed", f"making its result failed: {type(exc).__name__}: "
                                f"{str(exc)[:200]}")
            progressed = True
        return progressed

    def _finish_one(self, f: Path, pred, priority: str) -> None:  # type: ignore[no-untyped-def]
        import pydicom

        from cxr.client.batch import file_sha256
        from cxr.client.results import to_row
        from cxr.hospital.dicom.sr import build_heatmap_sc, build_sr

        info = self._client.info  # type: ignore[attr-defined]
        uid = f.stem
        results: list[tuple[str, str, bytes]] = []
        source = None
        study = ""
        if pred.status is not contract.Status.ERROR:
            source = pydicom.dcmread(f, stop_before_pixels=True)
            study = str(source.get("StudyInstanceUID", "") or "")
            if not _UID.match(study) or len(study) > 64:
                raise _Unanswerable("no_study_uid", "no valid Study Instance UID: a result cannot be filed in its "
                                    "study")
        if source is not None and self.cfg.study_quiet_s is None:
            sr = build_sr(source, pred)
            encoded = [(f"{sr.SOPInstanceUID}.dcm", _encode(sr))]
            if self._gradcam is not None and pred.ok and pred.label == info.labels[1]:
                from cxr.client.explain import film_for_display, overlay

                film = film_for_display(f)
                heat = self._gradcam.heatmap(imaging.preprocess(f), size=(film.shape[1], film.shape[0]))
                sc = build_heatmap_sc(source, pred, overlay(film, heat),
                                      unverified=self._gradcam.passes_check is False)  # type: ignore[attr-defined]
                encoded.append((f"{sc.SOPInstanceUID}.dcm", _encode(sc)))
            results += [(kind, name, data) for kind in ("dimse", "stow") for name, data in encoded]
            if self.cfg.fhir_url or self.cfg.fhir_out:
                results += self._fhir(f, pred, uid)
        if self.csv is not None:
            row = to_row(pred, file_sha256(f))
            row["path"] = f"dicom:{uid}"
            row["sop_instance_uid"] = uid
            self.csv.append([row])
        if self.metrics is not None:
            self.metrics.observe(pred, manufacturer=str(getattr(source, "Manufacturer", "") or "")[:64],
                                 station=str(getattr(source, "StationName", "") or "")[:64])
        if pred.status is contract.Status.ERROR:  # unreadable: an error row, and the file set aside, visibly
            raise _Unanswerable("unreadable", f"unreadable: {pred.reason}")
        if self.cfg.study_quiet_s is not None:  # answered with its study, once the study is quiet
            import json

            from cxr.hospital.dicom.study import to_json

            self.spool.hold(study, uid, json.dumps(to_json(pred)).encode(), urgent=priority == "urgent")
            self._screened(uid)
        else:
            self.spool.finish(uid, results, urgent=priority == "urgent")
        self._screen_failures.pop(uid, None)
        self._audit("screened", outcome="success", study_uid=study, instance_uid=uid, model_sha256=pred.model_sha256,
                    status=pred.status.value, rule=pred.rule, probability=pred.probability, priority=priority)
        self.stats["screened"] += 1
        logger.info("instance %s: %s%s", uid, pred.status.value, f" ({pred.label})" if pred.label else "")

    # -- one result per study -----------------------------------------------------------------------------------
    def _note_arrival(self, study: str, uid: str) -> None:
        if self.cfg.study_quiet_s is not None and study:
            import time

            with self._study_lock:
                self._unscreened.setdefault(study, set()).add(uid)
                self._arrived[study] = time.time()

    def _screened(self, uid: str) -> None:
        with self._study_lock:
            for study, uids in list(self._unscreened.items()):
                uids.discard(uid)
                if not uids:
                    del self._unscreened[study]

    def _close_studies(self) -> None:
        """Answer every study that has been quiet for ``study_quiet_s`` and has nothing left to screen."""
        import time

        if self.cfg.study_quiet_s is None or not self.spool.studies.is_dir():
            return
        for folder in sorted(self.spool.studies.iterdir()):
            if self._stop.is_set():
                return
            answers = list(folder.glob("*.json"))
            with self._study_lock:
                busy = bool(self._unscreened.get(folder.name))
                last = self._arrived.get(folder.name, 0.0)
            try:
                last = max([last, *(a.stat().st_mtime for a in answers)])
            except FileNotFoundError:
                continue
            if busy or not answers or time.time() - last < self.cfg.study_quiet_s:
                continue
            try:
                self._close_study(folder)
            except Exception as exc:  # noqa: BLE001 - one study's failure must not hold the others
                for a in answers:
                    uid, film = a.stem, folder / f"{a.stem}.dcm"
                    if film.exists():
                        film.replace(self.spool.incoming / f"{uid}.dcm")  # set aside from there, with its reason
                    a.unlink(missing_ok=True)
                    self._set_aside(uid, "study_result_failed", f"making its study's result failed: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}", folder.name)
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
            with self._study_lock:
                self._arrived.pop(folder.name, None)
        for ev in self._senders.values():
            ev.set()

    def _close_study(self, folder: Path) -> None:
        import json

        import pydicom

        from cxr.hospital import fhir
        from cxr.hospital.dicom.sr import build_heatmap_sc, build_study_sr
        from cxr.hospital.dicom.study import combine, from_json

        items = []
        for a in sorted(folder.glob("*.json")):
            film = folder / f"{a.stem}.dcm"
            items.append((a.stem, from_json(json.loads(a.read_text())), pydicom.dcmread(film, stop_before_pixels=True),
                          film))
        # films in the order they were taken (Instance Number), then by UID
        items.sort(key=lambda it: (int(it[2].get("InstanceNumber", 0) or 0), it[0]))
        study = combine([(uid, pred) for uid, pred, _, _ in items])
        sr = build_study_sr([src for _, _, src, _ in items], [pred for _, pred, _, _ in items], study)
        encoded = [(f"{sr.SOPInstanceUID}.dcm", _encode(sr))]
        info = self._client.info  # type: ignore[attr-defined]
        if self._gradcam is not None:
            from cxr.client.explain import film_for_display, overlay

            for uid, pred, src, film in items:
                if uid in study.frontal and pred.ok and pred.label == info.labels[1]:
                    shown = film_for_display(film)
                    heat = self._gradcam.heatmap(imaging.preprocess(film), size=(shown.shape[1], shown.shape[0]))
                    sc = build_heatmap_sc(src, pred, overlay(shown, heat),
                                          unverified=self._gradcam.passes_check is False)  # type: ignore[attr-defined]
                    encoded.append((f"{sc.SOPInstanceUID}.dcm", _encode(sc)))
        results = [(kind, name, data) for kind in ("dimse", "stow") for name, data in encoded]
        if self.cfg.fhir_url or self._fhir_lines is not None:
            b = fhir.study_bundle([(pred, fhir.StudyRef.of_file(film)) for _, pred, _, film in items], study)
            if self._fhir_lines is not None:
                self._fhir_lines.append(json.dumps(b, separators=(",", ":")))
            if self.cfg.fhir_url:
                results.append(("fhir", f"{sr.SOPInstanceUID}.json", json.dumps(b).encode()))
        self.spool.finish_study(folder, [uid for uid, *_ in items], results)
        model = items[0][1]
        self._audit("screened", study_uid=folder.name, model_sha256=model.model_sha256, level="study",
                    status=study.status.value, label=study.label, probability=study.probability,
                    instances=len(items), frontal=len(study.frontal), why=study.why or None)
        logger.info("study %s: %s%s from %d film(s), %d frontal", folder.name, study.status.value,
                    f" ({study.label})" if study.label else "", len(items), len(study.frontal))

    def _fhir(self, f: Path, pred, uid: str) -> list[tuple[str, str, bytes]]:  # type: ignore[no-untyped-def]
        """The instance's FHIR results: a transaction Bundle for the FHIR outbox, and (``--fhir-out``) the same
        Bundle appended as one line of the NDJSON file (linear: nothing written before is read or rewritten)."""
        import json

        from cxr.hospital import fhir

        b = fhir.bundle([(pred, fhir.StudyRef.of_file(f))])
        if self._fhir_lines is not None:
            self._fhir_lines.append(json.dumps(b, separators=(",", ":")))
        return [("fhir", f"{uid}.json", json.dumps(b).encode())] if self.cfg.fhir_url else []

    # -- sending -------------------------------------------------------------------------------------------------
    #: Consecutive retryable failures after which a delivery round stops (the destination is down: the rest waits).
    ROUND_FAILURES = 3

    def _send(self, kind: str) -> None:
        """One destination's sender. Each result retries on its own schedule (exponential backoff from
        ``send_backoff_s`` to ``max_backoff_s``); one refused for good is parked in ``dead-letter-<kind>/`` and the
        results behind it go on."""
        import time

        wake = self._senders[kind]
        retry: dict[str, tuple[int, float]] = {}  # result name -> (failed attempts, monotonic time of the next)
        while not self._stop.is_set():
            files = self.spool.queued(kind)
            names = {f.name for f in files}
            retry = {n: v for n, v in retry.items() if n in names}
            if self.metrics is not None:
                self.metrics.depth(kind, len(files))  # type: ignore[attr-defined]
            now = time.monotonic()
            due = [f for f in files if retry.get(f.name, (0, 0.0))[1] <= now]
            if due and not (kind == "dimse" and self.cfg.send_to is None):
                try:
                    outcome = self._deliver(kind, due)
                except Exception:  # noqa: BLE001 - the sender must survive; the results stay queued
                    logger.exception("delivering to %s failed; retried later", self._where(kind))
                    outcome = {f.name: "retry" for f in due}
                for name, result in outcome.items():
                    if result == "retry":
                        n = retry.get(name, (0, 0.0))[0] + 1
                        wait = min(self.cfg.send_backoff_s * 2 ** (n - 1), self.cfg.max_backoff_s)
                        retry[name] = (n, time.monotonic() + wait)
                    else:
                        retry.pop(name, None)
                if any(r == "retry" for r in outcome.values()):
                    logger.warning("results not delivered (%s); %d queued; next try in %.1f s", self._where(kind),
                                   len(self.spool.queued(kind)),
                                   max(0.0, min(t for _, t in retry.values()) - time.monotonic()) if retry else 0.0)
                if outcome:
                    continue  # look at the outbox again at once (new results, or the next due)
            next_due = min((t for _, t in retry.values()), default=None)
            timeout = self.cfg.send_backoff_s if next_due is None else max(0.05, next_due - time.monotonic())
            wake.wait(timeout=min(timeout, self.cfg.max_backoff_s))
            wake.clear()

    def _where(self, kind: str) -> str:
        from cxr.core.security import redact_url

        return redact_url({"dimse": str(self.cfg.send_to), "stow": str(self.cfg.stow_url),
                           "fhir": str(self.cfg.fhir_url)}[kind])

    def _deliver(self, kind: str, files: list[Path]) -> dict[str, str]:
        """Try the due results; each one's outcome by name: ``sent``, ``retry`` or ``parked``. Results not tried
        (the round stopped) are left out."""
        if kind == "dimse":
            return self._send_files(files)
        from cxr.core.errors import RetryableServerError

        out: dict[str, str] = {}
        failures = 0
        for f in files:
            if self._stop.is_set():
                break
            if failures >= self.ROUND_FAILURES:  # the destination is down: the rest waits, untried
                out[f.name] = "retry"
                continue
            try:
                self._deliver_one(kind, f)
                self.spool.sent(f)
                out[f.name] = "sent"
                failures = 0
            except RetryableServerError as exc:  # down or overloaded: this one tries again after its backoff
                failures += 1
                out[f.name] = "retry"
                self._failed(kind, f, type(exc).__name__, retry=True)
                logger.warning("%s", exc)
            except FileNotFoundError:
                continue  # taken away meanwhile (redelivered or cleaned by hand)
            except CxrError as exc:  # refused for good: parked (kept, never lost), the queue goes on
                out[f.name] = "parked"
                self._park(kind, f, str(exc), type(exc).__name__)
        return out

    def _failed(self, kind: str, f: Path, error: str, *, retry: bool, study: str = "", instance: str = "",
                **detail: Any) -> None:
        self.stats["send_failures"] += 1
        self._metric("delivery_failures", destination=kind, retry=str(retry).lower())
        self._audit("delivery_failed", outcome="failure", study_uid=study, instance_uid=instance or f.stem,
                    destination=f"{kind}:{self._where(kind)}", error=error, retry=retry, **detail)

    def _park(self, kind: str, f: Path, reason: str, error: str, **detail: Any) -> None:
        from cxr.core.security import redact_url

        where = self.spool.park(kind, f, redact_url(reason))
        self.stats["parked"] += 1
        self._metric("dead_lettered", destination=kind)
        self._failed(kind, where, error, retry=False, **detail)
        logger.error("%s refused %s for good: %s; kept in %s (cxr listen --redeliver sends it again)",
                     self._where(kind), f.name, redact_url(reason), where.parent)

    def _delivered(self, kind: str, f: Path, study: str, instance: str) -> None:
        import time

        try:
            self._latency(time.time() - f.stat().st_mtime)
        except FileNotFoundError:
            pass
        self.stats["sent"] += 1
        self._metric("delivered", destination=kind)
        self._audit("result_delivered", study_uid=study, instance_uid=instance,
                    destination=f"{kind}:{self._where(kind)}")

    def _latency(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.latency(seconds)  # type: ignore[attr-defined]

    def _deliver_one(self, kind: str, f: Path) -> None:
        import json

        import pydicom

        if kind == "stow":
            from cxr.hospital.dicomweb import DicomWeb

            ds = pydicom.dcmread(f)
            DicomWeb(str(self.cfg.stow_url), auth=self.cfg.web_auth).store([ds], study_uid=str(ds.StudyInstanceUID))
            study, instance = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        else:
            from cxr.hospital import fhir

            fhir.post_bundle(str(self.cfg.fhir_url), json.loads(f.read_text()), auth=self.cfg.web_auth)
            study, instance = "", f.stem
        self._delivered(kind, f, study, instance)

    def _send_files(self, files: list[Path]) -> dict[str, str]:
        """One association; each result's outcome (``sent``, ``retry``, ``parked``) by name. A failure status
        worth a retry (out of resources, processing failure) or a lost association stops the round; any other
        failure status parks that result and the next one goes."""
        import pydicom
        from pynetdicom import AE

        dest = self.cfg.send_to
        assert dest is not None
        out: dict[str, str] = {}
        ae = AE(ae_title=self.cfg.ae_title)
        ae.add_requested_context(COMPREHENSIVE_SR)
        ae.add_requested_context(SECONDARY_CAPTURE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        tls_args = None
        if self.cfg.send_tls is not None:
            tls_args = (self.cfg.send_tls.ssl_context(), self.cfg.send_tls.server_name or dest.host)  # type: ignore[attr-defined]
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            self.stats["send_failures"] += 1
            self._metric("delivery_failures", destination="dimse", retry="true")
            self._audit("delivery_failed", outcome="failure", destination=f"dimse:{dest}", error="association")
            return {f.name: "retry" for f in files}  # the PACS is down: every due result waits its backoff
        try:
            for f in files:
                if self._stop.is_set():
                    break
                try:
                    ds = pydicom.dcmread(f)
                except FileNotFoundError:
                    continue
                study, instance = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as exc:  # the PACS accepted no presentation context for this SOP class
                    out[f.name] = "parked"
                    self._park("dimse", f, f"C-STORE not possible: {exc}", "presentation_context", study=study,
                               instance=instance)
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == SUCCESS or code in (0xB000, 0xB007, 0xB006):  # success, or success with warnings
                    self._delivered("dimse", f, study, instance)
                    self.spool.sent(f)
                    out[f.name] = "sent"
                elif code == -1 or code in RETRYABLE_STORE_STATUSES or code == PROCESSING_FAILURE:
                    out[f.name] = "retry"
                    logger.warning("PACS answered %s for %s: retried later", "nothing" if code == -1 else
                                   f"0x{code & 0xFFFF:04X}", f.stem)
                    self._failed("dimse", f, "status", retry=True, study=study, instance=instance,
                                 status=code & 0xFFFF if code != -1 else None)
                    break
                else:
                    out[f.name] = "parked"
                    self._park("dimse", f, f"C-STORE status 0x{code & 0xFFFF:04X}", "status", study=study,
                               instance=instance, status=code & 0xFFFF)
        finally:
            if assoc.is_established:
                assoc.release()
        return out


def _server_ssl_context(tls):  # type: ignore[no-untyped-def]
    """TLS for the SCP: its certificate, and client certificates required when a client CA is given."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=str(tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _encode(ds) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()

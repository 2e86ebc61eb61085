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
        fhir_out: A FHIR Bundle file holding every result this spool screened (rewritten after each instance).
        audit_log: The hash-chained audit trail to append every event to.
        urgent_if: Site rules that make a study urgent (besides Requested Procedure Priority STAT/HIGH).
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

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16:
            raise ValueError("the AE title must be 1-16 characters")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.send_backoff_s <= 0 or self.max_backoff_s < self.send_backoff_s:
            raise ValueError("need 0 < send_backoff_s <= max_backoff_s")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        from cxr.core.security import is_loopback

        if not is_loopback(self.host) and self.dicom_tls is None:
            logger.warning("listening on %s without DICOM TLS: keep this link on a trusted network", self.host)


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

    def finish(self, uid: str, results: list[tuple[str, str, bytes]]) -> None:
        """Results into their outboxes (``(kind, name, data)``), then the done marker, then the incoming file
        and its marker away (in that order)."""
        for kind, name, data in results:
            if kind in self.outboxes:
                write_durably(self.outboxes[kind] / name, data)
        write_durably(self.done / uid, b"")
        (self.incoming / f"{uid}.dcm").unlink(missing_ok=True)
        (self.incoming / f"{uid}.urgent").unlink(missing_ok=True)
        fsync_dir(self.incoming)


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
        self._fhir_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_worker = threading.Event()
        self._senders: dict[str, threading.Event] = {}
        self._server = None
        self._threads: list[threading.Thread] = []
        self._client = None
        self._gradcam = None
        self.stats = {"received": 0, "duplicates": 0, "refused": 0, "screened": 0, "sent": 0, "send_failures": 0,
                      "urgent": 0}
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
        ae.maximum_pdu_size = 0
        return ae

    def _on_echo(self, event) -> int:  # type: ignore[no-untyped-def]
        return SUCCESS

    def _on_store(self, event) -> int:  # type: ignore[no-untyped-def]
        req = event.request
        sop_class = str(req.AffectedSOPClassUID)
        uid = str(req.AffectedSOPInstanceUID)
        if sop_class not in ACCEPTED_SOP_CLASSES:
            self.stats["refused"] += 1
            logger.info("refused C-STORE of SOP class %s (instance %s)", sop_class, uid)
            return REFUSED_SOP_CLASS
        if not _UID.match(uid) or len(uid) > 64:
            return CANNOT_UNDERSTAND
        calling = str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()
        try:
            ds = event.dataset
            urgent = study_priority(ds, self.cfg.urgent_if) == "urgent"
            study = str(ds.get("StudyInstanceUID", "") or "")
        except Exception:  # noqa: BLE001 - an undecodable header: screened (and refused) like any other
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
                                       tls=self.cfg.tls, config_key=self.cfg.config_key)  # type: ignore[arg-type]
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
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store)]
        ssl_context = None
        if self.cfg.dicom_tls is not None:
            ssl_context = _server_ssl_context(self.cfg.dicom_tls)
        self._server = self._ae().start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers,
                                               ssl_context=ssl_context)
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
        return not self.spool.pending() and not any(any(d.iterdir()) for d in self.spool.outboxes.values())

    # -- screening ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self._wake_worker.wait(timeout=2.0)
            self._wake_worker.clear()
            while not self._stop.is_set():
                files = self.spool.pending()[: self.cfg.batch]
                if not files:
                    break
                try:
                    progressed = self._screen(files)
                except Exception:  # noqa: BLE001 - the worker must survive; the files stay in the spool
                    logger.exception("screening failed; retrying")
                    progressed = False
                if not progressed:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    break
                backoff = 0.5

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
        import pydicom

        from cxr.client.batch import file_sha256
        from cxr.client.results import to_row
        from cxr.pacs.sr import build_heatmap_sc, build_sr

        info = self._client.info  # type: ignore[attr-defined]
        progressed = False
        for f, pred in zip(files, preds):
            uid = f.stem
            if pred.status is contract.Status.ERROR and pred.retryable:
                logger.warning("instance %s: transient failure, kept for a retry", uid)
                continue
            results: list[tuple[str, str, bytes]] = []
            source = None
            study = ""
            if pred.status is not contract.Status.ERROR:
                source = pydicom.dcmread(f, stop_before_pixels=True)
                study = str(source.get("StudyInstanceUID", "") or "")
                sr = build_sr(source, pred)
                encoded = [(f"{sr.SOPInstanceUID}.dcm", _encode(sr))]
                if self._gradcam is not None and pred.ok and pred.label == info.labels[1]:
                    from cxr.client.explain import film_for_display, overlay

                    film = film_for_display(f)
                    heat = self._gradcam.heatmap(imaging.preprocess(f), size=(film.shape[1], film.shape[0]))
                    sc = build_heatmap_sc(source, pred, overlay(film, heat))
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
            self.spool.finish(uid, results)
            self._audit("screened", outcome="failure" if pred.status is contract.Status.ERROR else "success",
                        study_uid=study, instance_uid=uid, model_sha256=pred.model_sha256, status=pred.status.value,
                        rule=pred.rule, probability=pred.probability, priority=priority)
            self.stats["screened"] += 1
            progressed = True
            logger.info("instance %s: %s%s", uid, pred.status.value, f" ({pred.label})" if pred.label else "")
        return progressed

    def _fhir(self, f: Path, pred, uid: str) -> list[tuple[str, str, bytes]]:  # type: ignore[no-untyped-def]
        """The instance's FHIR results: a transaction Bundle for the FHIR outbox, and (``--fhir-out``) its
        entries added to the spool's Bundle file."""
        import json

        from cxr.client import fhir

        b = fhir.bundle([(pred, fhir.StudyRef.of_file(f))])
        if self.cfg.fhir_out is not None:
            with self._fhir_lock:
                path = Path(self.cfg.fhir_out)
                whole: dict = (json.loads(path.read_text()) if path.exists()
                               else {"resourceType": "Bundle", "type": "transaction", "entry": []})
                known = {e["resource"].get("identifier", [{}])[0].get("value") for e in whole["entry"]
                         if e["resource"]["resourceType"] == "Device"}
                whole["entry"] += [e for e in b["entry"] if e["resource"]["resourceType"] != "Device"
                                   or e["resource"]["identifier"][0]["value"] not in known]
                whole["timestamp"] = b["timestamp"]
                fhir.validate(whole)
                write_durably(path, (json.dumps(whole, indent=1) + "\n").encode())
        return [("fhir", f"{uid}.json", json.dumps(b).encode())] if self.cfg.fhir_url else []

    # -- sending -------------------------------------------------------------------------------------------------
    def _send(self, kind: str) -> None:
        backoff = self.cfg.send_backoff_s
        wake = self._senders[kind]
        outbox = self.spool.outboxes[kind]
        while not self._stop.is_set():
            wake.wait(timeout=backoff)
            wake.clear()
            files = sorted(p for p in outbox.iterdir() if not p.name.startswith("."))
            if not files or (kind == "dimse" and self.cfg.send_to is None):
                continue
            if self._deliver(kind, files):
                backoff = self.cfg.send_backoff_s
            else:
                backoff = min(backoff * 2, self.cfg.max_backoff_s)
                logger.warning("results not delivered (%s); %d queued; next try in %.1f s", self._where(kind),
                               len(files), backoff)

    def _where(self, kind: str) -> str:
        return {"dimse": str(self.cfg.send_to), "stow": str(self.cfg.stow_url), "fhir": str(self.cfg.fhir_url)}[kind]

    def _deliver(self, kind: str, files: list[Path]) -> bool:
        if kind == "dimse":
            return self._send_files(files)
        from cxr.core.errors import RetryableServerError

        for f in files:
            if self._stop.is_set():
                return False
            try:
                self._deliver_one(kind, f)
                f.unlink(missing_ok=True)
            except RetryableServerError as exc:  # down or overloaded: everything waits for the next try
                self.stats["send_failures"] += 1
                self._audit("delivery_failed", outcome="failure", instance_uid=f.stem,
                            destination=f"{kind}:{self._where(kind)}", error=type(exc).__name__, retry=True)
                logger.warning("%s", exc)
                return False
            except CxrError as exc:  # refused for good: set aside (kept, never lost), the queue goes on
                self.stats["send_failures"] += 1
                refused = self.spool.root / f"refused-{kind}"
                refused.mkdir(exist_ok=True)
                f.replace(refused / f.name)
                self._audit("delivery_failed", outcome="failure", instance_uid=f.stem,
                            destination=f"{kind}:{self._where(kind)}", error=type(exc).__name__, retry=False)
                logger.error("%s; kept in %s", exc, refused)
        return True

    def _deliver_one(self, kind: str, f: Path) -> None:
        import json

        import pydicom

        if kind == "stow":
            from cxr.client.dicomweb import DicomWeb

            ds = pydicom.dcmread(f)
            DicomWeb(str(self.cfg.stow_url)).store([ds], study_uid=str(ds.StudyInstanceUID))
            study, instance = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        else:
            from cxr.client import fhir

            fhir.post_bundle(str(self.cfg.fhir_url), json.loads(f.read_text()))
            study, instance = "", f.stem
        self.stats["sent"] += 1
        self._audit("result_delivered", study_uid=study, instance_uid=instance,
                    destination=f"{kind}:{self._where(kind)}")

    def _send_files(self, files: list[Path]) -> bool:
        """One association; ``True`` when every file was confirmed (and removed)."""
        import pydicom
        from pynetdicom import AE

        dest = self.cfg.send_to
        assert dest is not None
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
            self._audit("delivery_failed", outcome="failure", destination=f"dimse:{dest}", error="association")
            return False
        ok = True
        try:
            for f in files:
                if self._stop.is_set():
                    return False
                ds = pydicom.dcmread(f)
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == SUCCESS or code in (0xB000, 0xB007, 0xB006):  # success, or success with warnings
                    f.unlink(missing_ok=True)
                    self.stats["sent"] += 1
                    self._audit("result_delivered", study_uid=str(ds.StudyInstanceUID), instance_uid=str(ds.SOPInstanceUID),
                                destination=f"dimse:{dest}")
                else:
                    ok = False
                    self.stats["send_failures"] += 1
                    logger.warning("PACS answered 0x%04X for %s", code & 0xFFFF, f.stem)
                    self._audit("delivery_failed", outcome="failure", study_uid=str(ds.StudyInstanceUID),
                                instance_uid=str(ds.SOPInstanceUID), destination=f"dimse:{dest}", status=code & 0xFFFF)
                    break
        finally:
            assoc.release()
        return ok


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

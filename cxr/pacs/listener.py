"""``cxr listen``: a DICOM Storage SCP that screens what it receives and sends DICOM SR results back to the PACS.

Durable by design; the spool folder holds every state, so a restart finishes
whatever was in flight and never drops or duplicates a result:

* ``incoming/<SOP Instance UID>.dcm``: written to a temporary file, fsynced and
  renamed (and the folder fsynced) *before* C-STORE answers success;
* ``done/<SOP Instance UID>``: a marker once the instance's result is in the
  outbox and the CSV; a second copy of the same instance is acknowledged and
  skipped (deduplication by SOP Instance UID);
* ``outbox/<UID>.dcm``: results (SR, and the heatmap Secondary Capture with
  ``--heatmap``) waiting to be sent; a sender retries with exponential backoff
  and removes a file only after the PACS confirmed it. Result UIDs are derived
  from the source UID and the model's sha256, so a resend after a crash
  replaces rather than duplicates.

Screening runs asynchronously (one worker, in batches), through the project's
client: the eligibility rules and ``not_assessable`` apply as everywhere. A
transient inference failure leaves the instance in ``incoming`` for a retry; an
unreadable instance gets an error row and no SR. Logs carry SOP Instance UIDs,
never patient attributes.
"""

from __future__ import annotations

import io
import logging
import re
import threading
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

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.done = self.root / "done"
        for d in (self.incoming, self.outbox, self.done):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.root.rglob(".*.tmp"):  # a crash mid-write: the sender was never told success
            stale.unlink(missing_ok=True)

    def is_done(self, uid: str) -> bool:
        return (self.done / uid).exists()

    def receive(self, uid: str, data: bytes) -> bool:
        """Store an incoming instance durably; ``False`` when it was already screened (a duplicate)."""
        if self.is_done(uid):
            return False
        write_durably(self.incoming / f"{uid}.dcm", data)
        return True

    def pending(self) -> list[Path]:
        return sorted(self.incoming.glob("*.dcm"), key=lambda p: p.stat().st_mtime)

    def finish(self, uid: str, results: list[tuple[str, bytes]]) -> None:
        """Results into the outbox, then the done marker, then the incoming file away (in that order)."""
        for name, data in results:
            write_durably(self.outbox / name, data)
        write_durably(self.done / uid, b"")
        (self.incoming / f"{uid}.dcm").unlink(missing_ok=True)
        fsync_dir(self.incoming)


class Listener:
    """The SCP, the screening worker and the result sender (start, then stop)."""

    def __init__(self, cfg: ListenConfig) -> None:
        from cxr.client.results import CSV_COLUMNS

        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.csv = AppendOnlyCsv(cfg.out, CSV_COLUMNS) if cfg.out else None  # the columns of cxr predict
        self._stop = threading.Event()
        self._wake_worker = threading.Event()
        self._wake_sender = threading.Event()
        self._server = None
        self._threads: list[threading.Thread] = []
        self._client = None
        self._gradcam = None
        self.stats = {"received": 0, "duplicates": 0, "refused": 0, "screened": 0, "sent": 0, "send_failures": 0}
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
        try:
            data = event.encoded_dataset(include_meta=True)
            fresh = self.spool.receive(uid, data)
        except OSError as exc:
            logger.error("cannot spool instance %s: %s", uid, exc.strerror or exc)
            return OUT_OF_RESOURCES
        if fresh:
            self.stats["received"] += 1
            self._wake_worker.set()
        else:
            self.stats["duplicates"] += 1
            logger.info("instance %s already screened: acknowledged, skipped", uid)
        return SUCCESS

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
        for target, name in ((self._work, "cxr-listen-screen"), (self._send, "cxr-listen-send")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._wake_worker.set()  # finish whatever the spool holds
        self._wake_sender.set()
        logger.info("listening as %s on %s:%d; spool %s", self.cfg.ae_title, self.cfg.host, self.cfg.port, self.cfg.spool)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake_worker.set()
        self._wake_sender.set()
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

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def idle(self) -> bool:
        """Nothing left to screen or send."""
        return not self.spool.pending() and not list(self.spool.outbox.glob("*.dcm"))

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
        """Screen a batch; ``True`` when at least one instance reached a final state."""
        import pydicom

        from cxr.client.batch import file_sha256
        from cxr.client.results import to_row
        from cxr.pacs.sr import build_heatmap_sc, build_sr

        preds = self._client.predict([str(f) for f in files])  # type: ignore[attr-defined]
        info = self._client.info  # type: ignore[attr-defined]
        progressed = False
        for f, pred in zip(files, preds):
            uid = f.stem
            if pred.status is contract.Status.ERROR and pred.retryable:
                logger.warning("instance %s: transient failure, kept for a retry", uid)
                continue
            results: list[tuple[str, bytes]] = []
            source = None
            if pred.status is not contract.Status.ERROR:
                source = pydicom.dcmread(f, stop_before_pixels=True)
                sr = build_sr(source, pred)
                results.append((f"{sr.SOPInstanceUID}.dcm", _encode(sr)))
                if self._gradcam is not None and pred.ok and pred.label == info.labels[1]:
                    from cxr.client.explain import film_for_display, overlay

                    film = film_for_display(f)
                    heat = self._gradcam.heatmap(imaging.preprocess(f), size=(film.shape[1], film.shape[0]))
                    sc = build_heatmap_sc(source, pred, overlay(film, heat))
                    results.append((f"{sc.SOPInstanceUID}.dcm", _encode(sc)))
            if self.csv is not None:
                row = to_row(pred, file_sha256(f))
                row["path"] = f"dicom:{uid}"
                row["sop_instance_uid"] = uid
                self.csv.append([row])
            if self.metrics is not None:
                self.metrics.observe(pred, manufacturer=str(getattr(source, "Manufacturer", "") or "")[:64],
                                     station=str(getattr(source, "StationName", "") or "")[:64])
            self.spool.finish(uid, results)
            self.stats["screened"] += 1
            progressed = True
            logger.info("instance %s: %s%s", uid, pred.status.value, f" ({pred.label})" if pred.label else "")
        if progressed:
            self._wake_sender.set()
        return progressed

    # -- sending -------------------------------------------------------------------------------------------------
    def _send(self) -> None:
        backoff = self.cfg.send_backoff_s
        while not self._stop.is_set():
            self._wake_sender.wait(timeout=backoff)
            self._wake_sender.clear()
            files = sorted(self.spool.outbox.glob("*.dcm"))
            if not files or self.cfg.send_to is None:
                continue
            if self._send_files(files):
                backoff = self.cfg.send_backoff_s
            else:
                backoff = min(backoff * 2, self.cfg.max_backoff_s)
                logger.warning("results not delivered to %s; %d queued; next try in %.1f s", self.cfg.send_to,
                               len(files), backoff)

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
            return False
        ok = True
        try:
            for f in files:
                if self._stop.is_set():
                    return False
                status = assoc.send_c_store(pydicom.dcmread(f))
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == SUCCESS or code in (0xB000, 0xB007, 0xB006):  # success, or success with warnings
                    f.unlink(missing_ok=True)
                    self.stats["sent"] += 1
                else:
                    ok = False
                    self.stats["send_failures"] += 1
                    logger.warning("PACS answered 0x%04X for %s", code & 0xFFFF, f.stem)
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

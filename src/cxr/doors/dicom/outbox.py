"""The outboxes and their senders: one thread per destination (C-STORE to the PACS, STOW-RS to a DICOMweb server,
FHIR transaction POST) delivers the results queued in its outbox, urgent ones first. Each result retries on its own
schedule (exponential backoff from ``send_backoff_s`` to ``max_backoff_s``) and leaves the outbox only once its
destination confirmed it; one refused for good is parked in ``dead-letter-<destination>/`` (``cxr listen
--redeliver`` queues it again) and the results behind it go on."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from cxr.core.errors import CxrError
from cxr.doors.dicom.config import ListenConfig
from cxr.doors.dicom.spool import Spool
from cxr.doors.dicom.telemetry import Telemetry

logger = logging.getLogger(__name__)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: C-STORE statuses.
SUCCESS = 0x0000
#: C-STORE success with warnings (coercion of data elements, elements discarded, data set does not match the SOP
#: class).
SUCCESS_WITH_WARNINGS = (0xB000, 0xB007, 0xB006)
#: C-STORE failure statuses worth a retry (the peer is short of resources or failed to process); any other
#: failure refuses that one result for good.
RETRYABLE_STORE_STATUSES = range(0xA700, 0xA800)
PROCESSING_FAILURE = 0x0110


class Outbox:
    """The senders of every outbox of the spool: :meth:`run` is one destination's thread, :meth:`wake` tells them
    that results were queued."""

    #: Consecutive retryable failures after which a delivery round stops (the destination is down: the rest waits).
    ROUND_FAILURES = 3

    def __init__(self, cfg: ListenConfig, spool: Spool, telemetry: Telemetry, stop: threading.Event) -> None:
        self.cfg = cfg
        self.spool = spool
        self.telemetry = telemetry
        self._stop = stop
        self._wake = {kind: threading.Event() for kind in spool.outboxes}

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._wake)

    def wake(self) -> None:
        for ev in self._wake.values():
            ev.set()

    def run(self, kind: str) -> None:
        """One destination's sender, until stopped."""
        wake = self._wake[kind]
        retry: dict[str, tuple[int, float]] = {}  # result name -> (failed attempts, monotonic time of the next)
        while not self._stop.is_set():
            files = self.spool.queued(kind)
            names = {f.name for f in files}
            retry = {n: v for n, v in retry.items() if n in names}
            self.telemetry.depth(kind, len(files))
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
        self.telemetry.count("send_failures")
        self.telemetry.metric("delivery_failures", destination=kind, retry=str(retry).lower())
        self.telemetry.event("delivery_failed", outcome="failure", study_uid=study, instance_uid=instance or f.stem,
                             destination=f"{kind}:{self._where(kind)}", error=error, retry=retry, **detail)

    def _park(self, kind: str, f: Path, reason: str, error: str, **detail: Any) -> None:
        from cxr.core.security import redact_url

        where = self.spool.park(kind, f, redact_url(reason))
        self.telemetry.count("parked")
        self.telemetry.metric("dead_lettered", destination=kind)
        self._failed(kind, where, error, retry=False, **detail)
        logger.error("%s refused %s for good: %s; kept in %s (cxr listen --redeliver sends it again)",
                     self._where(kind), f.name, redact_url(reason), where.parent)

    def _delivered(self, kind: str, f: Path, study: str, instance: str) -> None:
        try:
            self.telemetry.latency(time.time() - f.stat().st_mtime)
        except FileNotFoundError:
            pass
        self.telemetry.count("sent")
        self.telemetry.metric("delivered", destination=kind)
        # once per result and destination: a re-delivery after a crash (before the delivered marker) is not recorded
        self.telemetry.event_once("result_delivered", [kind, f.name], study_uid=study, instance_uid=instance,
                                  destination=f"{kind}:{self._where(kind)}")

    def _deliver_one(self, kind: str, f: Path) -> None:
        """One result by STOW-RS or FHIR POST (raises :class:`cxr.core.errors.RetryableServerError` for a retry,
        another :class:`cxr.core.errors.CxrError` when refused for good)."""
        import json

        import pydicom

        if kind == "stow":
            from cxr.doors.dicomweb import DicomWeb

            ds = pydicom.dcmread(f)
            with DicomWeb(str(self.cfg.stow_url), auth=self.cfg.web_auth) as web:  # its connection closed after
                web.store([ds], study_uid=str(ds.StudyInstanceUID))
            study, instance = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        else:
            from cxr.doors import fhir

            fhir.post_bundle(str(self.cfg.fhir_url), json.loads(f.read_text()), auth=self.cfg.web_auth)
            study, instance = "", f.stem
        self._delivered(kind, f, study, instance)

    def _send_files(self, files: list[Path]) -> dict[str, str]:
        """C-STORE to the PACS, over one association; each result's outcome (``sent``, ``retry``, ``parked``) by
        name. A failure status worth a retry (out of resources, processing failure) or a lost association stops the
        round; any other failure status parks that result and the next one goes."""
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
            tls_args = (self.cfg.send_tls.ssl_context(), self.cfg.send_tls.server_name or dest.host)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            self.telemetry.count("send_failures")
            self.telemetry.metric("delivery_failures", destination="dimse", retry="true")
            self.telemetry.event("delivery_failed", outcome="failure", destination=f"dimse:{dest}",
                                 error="association")
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
                if code == SUCCESS or code in SUCCESS_WITH_WARNINGS:
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

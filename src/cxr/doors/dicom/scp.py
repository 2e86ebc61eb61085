"""The Storage SCP of ``cxr listen`` (pynetdicom): associations (calling AE titles allowed, called AE title ours,
optionally over TLS), C-ECHO, and C-STORE into the spool. An instance is spooled durably before C-STORE answers
success; one the screen filter does not take (:class:`cxr.doors.dicom.intake.ScreenFilter`) is acknowledged,
counted and audited as dropped, and not kept."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from cxr.core.errors import CxrError
from cxr.doors.dicom.config import ListenConfig
from cxr.doors.dicom.intake import is_uid, study_priority
from cxr.doors.dicom.spool import Spool
from cxr.doors.dicom.telemetry import Telemetry

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event, EventHandlerType
    from pynetdicom.transport import ThreadedAssociationServer

    from cxr.core.security import TlsServer

logger = logging.getLogger(__name__)

#: C-STORE statuses.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def server_ssl_context(tls: TlsServer) -> ssl.SSLContext:
    """TLS for the SCP: its certificate, and client certificates required when a client CA is given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=str(tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StorageScp:
    """The DICOM server: :meth:`start`, then :meth:`stop`. ``on_received(study_uid, sop_uid)`` is called for each
    new instance once it is in the spool."""

    def __init__(self, cfg: ListenConfig, spool: Spool, telemetry: Telemetry,
                 on_received: Callable[[str, str], None]) -> None:
        self.cfg = cfg
        self.spool = spool
        self.telemetry = telemetry
        self._on_received = on_received
        self._server: ThreadedAssociationServer | None = None

    def _ae(self) -> AE:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.cfg.ae_title)
        ae.add_supported_context(Verification)
        for ctx in StoragePresentationContexts:
            assert ctx.abstract_syntax is not None
            ae.add_supported_context(ctx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        if self.cfg.allow:
            ae.require_calling_aet = list(self.cfg.allow)
        ae.require_called_aet = True  # an association addressed to another AE title is not for us
        ae.maximum_pdu_size = 0
        return ae

    def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen (not blocking; over TLS with ``ssl_context``, :func:`server_ssl_context`); a one-line
        :class:`cxr.core.errors.CxrError` when the port cannot be had."""
        from pynetdicom import evt

        handlers: list[EventHandlerType] = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        try:
            self._server = self._ae().start_server((self.cfg.host, self.cfg.port), block=False,
                                                   evt_handlers=handlers, ssl_context=ssl_context)
        except OSError as exc:
            raise CxrError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc}") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_echo(self, event: Event) -> int:
        return SUCCESS

    def _on_rejected(self, event: Event) -> None:
        """An association refused (calling AE title not allowed, called AE title not ours): counted and audited."""
        req = event.assoc.requestor
        calling = str(getattr(req, "ae_title", "") or "").strip()
        called = str(getattr(event.assoc.acceptor, "ae_title", "") or "").strip()
        why = "calling_ae" if self.cfg.allow and calling not in self.cfg.allow else "called_ae"
        self.telemetry.count("refused")
        self.telemetry.metric("refused", why=why)
        self.telemetry.event("refused", actor=f"ae:{calling}", outcome="failure", why=why, called_ae=called,
                             peer=str(getattr(req, "address", "") or ""))
        logger.warning("association from %s refused (%s)", calling or "?", why)

    def _on_store(self, event: Event) -> int:
        req = cast("C_STORE", event.request)
        sop_class = str(req.AffectedSOPClassUID)
        uid = str(req.AffectedSOPInstanceUID)
        calling = str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()
        if not is_uid(uid):
            self.telemetry.count("refused")
            self.telemetry.metric("refused", why="bad_instance_uid")
            self.telemetry.event("refused", actor=f"ae:{calling}", outcome="failure", why="bad_instance_uid",
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
            self.telemetry.count("dropped")
            study = ""
            try:
                study = str(event.dataset.get("StudyInstanceUID", "") or "")
            except Exception:  # noqa: BLE001 - a header we do not screen need not decode
                pass
            logger.info("dropped C-STORE of SOP class %s (instance %s): not screened (%s)", sop_class, uid, why)
            self.telemetry.event("dropped", actor=f"ae:{calling}", study_uid=study, instance_uid=uid, why=why,
                                 sop_class=sop_class)
            self.telemetry.metric("dropped", why=why)
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
            self.telemetry.event("received", actor=f"ae:{calling}", outcome="failure", study_uid=study,
                                 instance_uid=uid, why="spool")
            return OUT_OF_RESOURCES
        self.telemetry.event("received", actor=f"ae:{calling}", study_uid=study, instance_uid=uid,
                             priority="urgent" if urgent else "routine", duplicate=not fresh)
        if fresh:
            self.telemetry.count("received")
            self.telemetry.metric("received")
            self.telemetry.count("urgent", int(urgent))
            self._on_received(study, uid)
        else:
            self.telemetry.count("duplicates")
            logger.info("instance %s already screened: acknowledged, skipped", uid)
        return SUCCESS

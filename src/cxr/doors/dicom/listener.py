"""``cxr listen``: a DICOM Storage SCP that screens what it receives and sends its results back to the PACS.

:class:`Listener` composes the parts over one durable spool (the layout: :mod:`cxr.doors.dicom`): the SCP
(:mod:`~cxr.doors.dicom.scp`) spools what arrives, the screening worker (:mod:`~cxr.doors.dicom.worker`)
screens it and queues its results (:mod:`~cxr.doors.dicom.results`), and one sender per destination
(:mod:`~cxr.doors.dicom.outbox`) delivers them with retries; all report through
:mod:`~cxr.doors.dicom.telemetry`. Screening runs through the project's client: the eligibility rules and
``not_assessable`` apply as everywhere. Logs carry SOP Instance UIDs, never patient attributes; with
``--audit-log`` every event goes to the hash-chained audit trail (:mod:`cxr.core.audit_trail`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.core.errors import CxrError
from cxr.doors.dicom.config import ListenConfig
from cxr.doors.dicom.outbox import Outbox
from cxr.doors.dicom.results import ResultBuilder
from cxr.doors.dicom.scp import StorageScp, server_ssl_context
from cxr.doors.dicom.spool import Spool
from cxr.doors.dicom.telemetry import Telemetry
from cxr.doors.dicom.worker import ScreeningWorker, StudyTracker

if TYPE_CHECKING:
    from cxr.client import PneumoniaClient

logger = logging.getLogger(__name__)


class Listener:
    """The SCP, the screening worker and the result senders over one spool (start, then stop; or ``with``)."""

    def __init__(self, cfg: ListenConfig) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool, cfg.destinations)
        self.results = ResultBuilder(cfg)
        self.telemetry = Telemetry(cfg.audit_log)
        self.studies = StudyTracker(cfg.study_quiet_s)
        self._stop = threading.Event()
        self.outbox = Outbox(cfg, self.spool, self.telemetry, self._stop)
        self.worker = ScreeningWorker(cfg, self.spool, self.results, self.telemetry, self.studies, self._stop,
                                      on_results=self.outbox.wake)
        self.scp = StorageScp(cfg, self.spool, self.telemetry, on_received=self._received)
        self._client: PneumoniaClient | None = None
        self._threads: list[threading.Thread] = []

    @property
    def stats(self) -> dict[str, int]:
        """Events counted since the start (:data:`cxr.doors.dicom.telemetry.STATS`)."""
        return self.telemetry.stats

    @property
    def metrics_port(self) -> int | None:
        """Where the Prometheus metrics are served (``None``: not served)."""
        return self.telemetry.metrics_port

    def _received(self, study: str, uid: str) -> None:
        self.studies.arrived(study, uid)
        self.worker.wake()

    def start(self) -> Listener:
        from cxr.client import PneumoniaClient

        client = self._client = PneumoniaClient(self.cfg.url, protocol=self.cfg.protocol, model=self.cfg.model,
                                                tls=self.cfg.tls, config_key=self.cfg.config_key,
                                                operating_point=self.cfg.operating_point)
        info = client.info
        if not info.sha256:
            raise CxrError("the served model publishes no sha256: result UIDs cannot be made stable")
        if self.cfg.heatmap:
            from cxr.core.paths import DEFAULT_REPOSITORY

            self.results.explain(Path(self.cfg.repository or DEFAULT_REPOSITORY) / self.cfg.model, info.sha256,
                                 info.labels[1])
        if self.cfg.metrics_port is not None:
            try:
                self.telemetry.serve_metrics(info.ood_threshold, self.cfg.metrics_port, self.cfg.metrics_host)
            except OSError as exc:
                raise CxrError(f"--metrics-host {self.cfg.metrics_host} --metrics-port {self.cfg.metrics_port}: "
                               f"cannot serve the metrics there ({exc.strerror or exc})") from None
        ssl_context = server_ssl_context(self.cfg.dicom_tls) if self.cfg.dicom_tls is not None else None
        if self.cfg.study_quiet_s is not None:  # instances spooled before a restart count for their studies
            import pydicom

            for f in self.spool.pending():
                try:
                    study = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                                .get("StudyInstanceUID", "") or "")
                except Exception:  # noqa: BLE001 - an unreadable one is set aside when screened
                    continue
                self.studies.arrived(study, f.stem)
        if self.cfg.redeliver:
            moved = self.spool.redeliver()
            for kind, n in moved.items():
                if n:
                    logger.info("%d parked results back in the %s outbox (--redeliver)", n, kind)
        try:
            self.scp.start(ssl_context)
        except CxrError:
            self.telemetry.close_metrics()
            raise
        self.telemetry.event("started", port=self.cfg.port, ae_title=self.cfg.ae_title)
        self.telemetry.event("model_changed", model_sha256=info.sha256, model=info.name, version=info.version,
                             threshold=info.threshold)
        threads = [threading.Thread(target=self.worker.run, name="cxr-listen-screen", args=(client,), daemon=True)]
        threads += [threading.Thread(target=self.outbox.run, name=f"cxr-listen-send-{kind}", args=(kind,),
                                     daemon=True) for kind in self.outbox.kinds]
        for t in threads:
            t.start()
            self._threads.append(t)
        self.worker.wake()  # finish whatever the spool holds
        self.outbox.wake()
        logger.info("listening as %s on %s:%d; spool %s", self.cfg.ae_title, self.cfg.host, self.cfg.port, self.cfg.spool)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.worker.wake()
        self.outbox.wake()
        self.scp.stop()
        for t in self._threads:
            t.join(timeout=30)
        if self._client is not None:
            self._client.close()
        self.results.close()
        self.telemetry.close()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def idle(self) -> bool:
        """Nothing left to screen or send."""
        waiting = self.spool.studies.is_dir() and any(self.spool.studies.iterdir())
        return not self.spool.pending() and not waiting and not any(self.spool.queued(k) for k in self.spool.outboxes)

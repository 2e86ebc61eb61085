"""What the listener counts and tells: its counters (:attr:`Telemetry.stats`), the Prometheus metrics
(``--metrics-port``, :mod:`cxr.client.metrics`) and the hash-chained audit trail (``--audit-log``,
:mod:`cxr.core.audit_trail`). Every part of the listener reports through one :class:`Telemetry`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cxr.client.client import Prediction
    from cxr.client.metrics import ScreeningMetrics
    from cxr.core.audit_trail import AuditLog

#: The counters, in the order the ``stopped`` audit event lists them.
STATS = ("received", "duplicates", "refused", "dropped", "screened", "set_aside", "sent", "send_failures", "parked",
         "urgent")


class Telemetry:
    """The listener's counters, metrics and audit trail (each optional but the counters).

    Attributes:
        stats: Events counted since the start, by name (:data:`STATS`).
        audit: The audit trail (``None`` without ``--audit-log``).
        metrics: The Prometheus metrics (``None`` until :meth:`serve_metrics`).
        metrics_port: The port they are served on.
    """

    def __init__(self, audit_log: Path | None = None) -> None:
        self.stats = dict.fromkeys(STATS, 0)
        self.audit: AuditLog | None = None
        self._me = ""
        if audit_log is not None:
            from cxr.core.audit_trail import AuditLog, default_actor

            self.audit = AuditLog(audit_log, component="cxr listen")
            self._me = default_actor()
        self.metrics: ScreeningMetrics | None = None
        self.metrics_port: int | None = None

    def serve_metrics(self, ood_threshold: float | None, port: int) -> int:
        """Serve the Prometheus metrics on this loopback port (0: a free one); the port."""
        from cxr.client.metrics import ScreeningMetrics

        self.metrics = ScreeningMetrics(ood_threshold)
        self.metrics_port = self.metrics.serve(port)
        return self.metrics_port

    def count(self, stat: str, n: int = 1) -> None:
        self.stats[stat] += n

    def metric(self, what: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.count(what, 1, **labels)

    def event(self, event: str, *, actor: str | None = None, **kw: Any) -> None:
        """One audit event (by this process unless ``actor`` says who caused it)."""
        if self.audit is not None:
            self.audit.event(event, actor=actor or self._me, **kw)

    def observe(self, pred: Prediction, *, manufacturer: str, station: str) -> None:
        if self.metrics is not None:
            self.metrics.observe(pred, manufacturer=manufacturer, station=station)

    def depth(self, kind: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.depth(kind, n)

    def latency(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.latency(seconds)

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def close(self) -> None:
        """The metrics stop; the audit trail gets the ``stopped`` event with the counters, and closes."""
        self.close_metrics()
        if self.audit is not None:
            self.event("stopped", counts=dict(self.stats))
            self.audit.close()

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
        self._recorded = self._keys(audit_log)
        self.metrics: ScreeningMetrics | None = None
        self.metrics_port: int | None = None

    def serve_metrics(self, ood_threshold: float | None, port: int, host: str = "127.0.0.1") -> int:
        """Serve the Prometheus metrics on ``host:port`` (port 0: a free one); the port."""
        from cxr.client.metrics import ScreeningMetrics

        self.metrics = ScreeningMetrics(ood_threshold)
        self.metrics_port = self.metrics.serve(port, host)
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

    #: Events recorded once per key (``detail.key``): a restart after a crash does not record them again.
    ONCE = ("screened", "result_delivered")

    @classmethod
    def _keys(cls, audit_log: Path | None) -> set[tuple[str, ...]]:
        """The keys of the :data:`ONCE` events already in the trail (a torn or foreign line is skipped)."""
        import json

        keys: set[tuple[str, ...]] = set()
        if audit_log is None or not Path(audit_log).exists():
            return keys
        with open(audit_log, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key = rec["detail"]["key"] if rec.get("event") in cls.ONCE else None
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(key, list):
                    keys.add((str(rec["event"]), *map(str, key)))
        return keys

    def event_once(self, event: str, key: list[str], **kw: Any) -> bool:
        """:meth:`event`, unless an ``event`` with this ``key`` is in the trail already (recorded before a crash);
        whether it was recorded now."""
        k = (event, *map(str, key))
        if self.audit is None or k in self._recorded:
            return False
        self.event(event, key=[str(x) for x in key], **kw)
        self._recorded.add(k)
        return True

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

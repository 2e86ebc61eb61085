"""Prometheus metrics of screening answers (``cxr predict`` and ``cxr listen``), with prometheus-client.

The same figures ``cxr monitor`` compares with the model's reference, live:

* ``cxr_screened_total{model,status}``: answers by status;
* ``cxr_refused_total{model,rule}``: not-assessable answers by the rule that refused them;
* ``cxr_positive_total{model}``: Pneumonia answers;
* ``cxr_screened_by_device_total{model,manufacturer,station,status}``: answers by the DICOM Manufacturer and
  StationName of the film (empty for non-DICOM inputs; values cut to 64 characters);
* ``cxr_probability{model}`` and ``cxr_ood_score{model}``: histograms of P(pneumonia) (judged films) and of the
  out-of-distribution score (every film that reached the model), the latter with buckets at fractions of the
  served refusal threshold.

``cxr listen`` adds its pipeline (:data:`PIPELINE`): ``cxr_listen_received_total``, ``..._dropped_total{why}``,
``..._refused_total{why}``, ``..._set_aside_total{why}``, ``..._delivered_total{destination}``,
``..._delivery_failures_total{destination,retry}``, ``..._dead_lettered_total{destination}``, the gauge
``cxr_listen_outbox_depth{destination}`` and the histogram ``cxr_listen_end_to_end_seconds``.

The alerts a site sets on them are in the README ("Deploying at a new hospital") and docs/hospital.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxr.core import contract

#: Buckets of ``cxr_probability``.
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
#: Buckets of ``cxr_ood_score`` as fractions of the served OOD threshold.
OOD_FRACTIONS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


#: ``cxr listen``'s pipeline counters (``cxr_listen_<name>_total``): help and label names.
PIPELINE = {
    "received": ("Instances received and kept for screening (C-STORE success)", ()),
    "dropped": ("Instances accepted but not screened (SOP class, modality or body part)", ("why",)),
    "refused": ("C-STORE requests and associations refused", ("why",)),
    "set_aside": ("Instances that could not be answered, moved to dead-letter/", ("why",)),
    "delivered": ("Results confirmed by their destination", ("destination",)),
    "delivery_failures": ("Failed delivery attempts (retried or refused for good)", ("destination", "retry")),
    "dead_lettered": ("Results a destination refused for good, moved to dead-letter-<destination>/", ("destination",)),
}
#: Buckets of ``cxr_listen_end_to_end_seconds``.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


def device_of(path: str | Path) -> tuple[str, str]:
    """(Manufacturer, StationName) of a DICOM file's header, ``("", "")`` for anything else."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return "", ""
    if head[128:132] != b"DICM" and p.suffix.lower() not in (".dcm", ".dicom"):
        return "", ""
    try:
        import pydicom

        ds = pydicom.dcmread(p, stop_before_pixels=True, force=True,
                             specific_tags=["Manufacturer", "StationName"])
        return str(ds.get("Manufacturer", "") or "")[:64], str(ds.get("StationName", "") or "")[:64]
    except Exception:  # noqa: BLE001 - a header that cannot be read has no device to count
        return "", ""


class ScreeningMetrics:
    """Counters and histograms of answers in their own registry (served on a port, or written to a file)."""

    def __init__(self, ood_threshold: float | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.screened = Counter("cxr_screened", "Answers by status", ["model", "status"], registry=self.registry)
        self.refused = Counter("cxr_refused", "Not-assessable answers by rule", ["model", "rule"], registry=self.registry)
        self.positive = Counter("cxr_positive", "Pneumonia answers", ["model"], registry=self.registry)
        self.by_device = Counter("cxr_screened_by_device", "Answers by DICOM Manufacturer and StationName",
                                 ["model", "manufacturer", "station", "status"], registry=self.registry)
        self.probability = Histogram("cxr_probability", "P(pneumonia) of judged films", ["model"],
                                     buckets=PROBABILITY_BUCKETS, registry=self.registry)
        ood_buckets = tuple(f * ood_threshold for f in OOD_FRACTIONS) if ood_threshold else (
            5, 10, 20, 30, 40, 50, 75, 100, 200)
        self.ood = Histogram("cxr_ood_score", "Out-of-distribution score of films that reached the model", ["model"],
                             buckets=ood_buckets, registry=self.registry)
        self._server: object | None = None

    def observe(self, pred, *, manufacturer: str = "", station: str = "") -> None:
        """Count one answer (a :class:`cxr.client.client.Prediction`)."""
        model = pred.model_name
        status = contract.Status(pred.status).value
        self.screened.labels(model, status).inc()
        self.by_device.labels(model, manufacturer, station, status).inc()
        if pred.rule:
            self.refused.labels(model, pred.rule).inc()
        if pred.probability is not None:
            self.probability.labels(model).observe(pred.probability)
            if pred.label == contract.LABELS[1]:
                self.positive.labels(model).inc()
        if pred.ood_score is not None:
            self.ood.labels(model).observe(pred.ood_score)

    def count(self, what: str, n: float = 1, **labels: str) -> None:
        """A ``cxr listen`` pipeline counter (:data:`PIPELINE`), e.g. ``count("dropped", why="sop_class")``."""
        counter = self._pipeline()[what]
        (counter.labels(**labels) if labels else counter).inc(n)

    def depth(self, destination: str, n: int) -> None:
        """Results waiting in one destination's outbox (``cxr_listen_outbox_depth``)."""
        self._pipeline()["outbox_depth"].labels(destination=destination).set(n)

    def latency(self, seconds: float) -> None:
        """Seconds from an instance's arrival to its result's delivery (``cxr_listen_end_to_end_seconds``)."""
        self._pipeline()["end_to_end"].observe(max(0.0, seconds))

    def _pipeline(self) -> dict:
        if not hasattr(self, "_pipe"):
            from prometheus_client import Counter, Gauge, Histogram

            pipe: dict[str, Any] = {name: Counter(f"cxr_listen_{name}", help_, list(labels), registry=self.registry)
                    for name, (help_, labels) in PIPELINE.items()}
            pipe["outbox_depth"] = Gauge("cxr_listen_outbox_depth", "Results waiting for their destination",
                                         ["destination"], registry=self.registry)
            pipe["end_to_end"] = Histogram("cxr_listen_end_to_end_seconds", "Arrival of an instance to the delivery "
                                           "of its result", buckets=LATENCY_BUCKETS, registry=self.registry)
            self._pipe = pipe
        return self._pipe

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (a thread) and return the port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def write(self, path: Path) -> None:
        """Write the metrics in the text format (for node_exporter's textfile collector), atomically."""
        from prometheus_client import generate_latest

        from cxr.core.durable import write_durably

        write_durably(Path(path), generate_latest(self.registry))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None

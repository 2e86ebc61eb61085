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

The alert a site sets on them is in the README ("Deploying at a new hospital").
"""

from __future__ import annotations

from pathlib import Path

from cxr.core import contract

#: Buckets of ``cxr_probability``.
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
#: Buckets of ``cxr_ood_score`` as fractions of the served OOD threshold.
OOD_FRACTIONS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


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

    def observe(self, pred, *, manufacturer: str = "", station: str = "") -> None:  # type: ignore[no-untyped-def]
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

"""``cxr soak``: a bounded open-loop soak at a fraction of measured saturation, with memory readings.

It first measures saturation (closed loop, single-image requests), then sends
requests at ``fraction`` of that rate for ``duration_s`` seconds through the
project's client, and reports failures, latency percentiles, and the resident
memory of the server (tritonserver plus its Python-backend stubs) and of this
client process at start and end.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoakConfig:
    """A soak run.

    Attributes:
        grpc_url: Triton gRPC address.
        server_pid: tritonserver's pid (its children are counted too); ``None`` skips server RSS.
        model: Model name.
        duration_s: Soak length (bounded).
        fraction: Share of measured saturation to offer (0.8 = 80%).
        saturation_s: Length of the saturation measurement.
        concurrency: Closed-loop concurrency used to measure saturation.
        out: JSON report path.
    """

    grpc_url: str = "127.0.0.1:8001"
    server_pid: int | None = None
    model: str = "pneumonia"
    duration_s: float = 120.0
    fraction: float = 0.8
    saturation_s: float = 8.0
    concurrency: int = 8
    out: Path = Path("out/soak.json")

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 3600:
            raise ValueError("duration_s must be in (0, 3600]")
        if not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs) / 2**20
    except psutil.Error:
        return None


def soak(cfg: SoakConfig) -> dict:
    """Run the soak; write and return the report."""
    import psutil

    from cxr.client import PneumoniaClient
    from cxr.loadtest.bench import triton_load

    sat = triton_load(cfg.grpc_url, cfg.model, concurrency=cfg.concurrency, batch=1, seconds=cfg.saturation_s)
    rate = sat["images_per_s"] * cfg.fraction
    me = psutil.Process()
    x = np.random.default_rng(2).integers(0, 256, (1, *contract.IMAGE_SHAPE), dtype=np.uint8)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    with PneumoniaClient(cfg.grpc_url, model=cfg.model, batch_size=1, max_in_flight=64, timeout_s=30) as client:
        client.infer_batch(x)
        start = {"server_rss_mb": _rss_mb(cfg.server_pid), "client_rss_mb": me.memory_info().rss / 2**20}

        def one() -> None:
            t0 = time.perf_counter()
            try:
                client.transport.infer(x, timeout_s=30)
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(str(exc).splitlines()[0])

        interval = 1.0 / rate
        sent = 0
        t_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=64) as pool:
            while (now := time.perf_counter()) - t_start < cfg.duration_s:
                due = t_start + sent * interval
                if now < due:
                    time.sleep(min(due - now, 0.01))
                    continue
                pool.submit(one)
                sent += 1
        elapsed = time.perf_counter() - t_start
        end = {"server_rss_mb": _rss_mb(cfg.server_pid), "client_rss_mb": me.memory_info().rss / 2**20}
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    report = {
        "saturation_images_per_s": sat["images_per_s"],
        "offered_images_per_s": rate,
        "achieved_images_per_s": len(latencies) / elapsed,
        "duration_s": elapsed,
        "requests": sent,
        "succeeded": len(latencies),
        "failed": len(failures),
        "failure_examples": sorted(set(failures))[:5],
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "rss_start": start,
        "rss_end": end,
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report

"""``cxr bench-priority``: do urgent studies still get through while routine work saturates the server?

One run, side by side, on the embedded CPU Triton with the shipped model:

1. **idle**: urgent requests (one film each, one at a time) on an idle server: their p50/p95;
2. **saturated, priority levels on** (the shipped config): routine load from ``routine_threads`` closed-loop
   clients (``routine_batch`` films a request, as a night's batch would send) while the same urgent requests
   are timed;
3. **saturated, priority levels off** (the same config without ``priority_levels``), the same load, for contrast;
4. **saturated, the triage config** (``configs/cpu_triage.pbtxt``: priority levels on, ``max_batch_size`` 4): on a
   CPU an urgent request cannot preempt a batch already running, so the largest batch bounds its wait; this phase
   measures that trade against routine throughput.

Routine requests are delayed, never dropped: every routine request is counted as answered, rejected
(``UNAVAILABLE`` when its level's queue is full: the client retries it) or failed (anything else; the
measurement reports it, and none is expected). Every loop is bounded in requests and in time. Results:
``priority.json``, ``priority.md`` and ``priority.png`` in the output folder (``docs/capacity/priority/``).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.paths import REPORTS_DIR, relative

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorityConfig:
    """What the measurement does.

    Attributes:
        repository: Model repository (the shipped one).
        model: Model name.
        out_dir: Where the reports go.
        urgent_requests: Urgent requests timed per phase (one film each, one at a time).
        routine_threads: Closed-loop routine clients during saturation.
        routine_batch: Films per routine request.
        warmup_s: Saturation before the urgent requests start.
        max_seconds: Bound on each saturated phase.
        small_batch: ``max_batch_size`` of the fourth phase (the shipped triage config's by default).
        urgent_interval_s: Pause between urgent requests (they arrive as studies do, not back to back), which also
            gives every phase a window long enough to count the routine throughput in.
    """

    repository: Path
    model: str = "pneumonia"
    out_dir: Path = REPORTS_DIR / "bench-priority"
    urgent_requests: int = 60
    routine_threads: int = 8
    routine_batch: int = 16
    warmup_s: float = 3.0
    max_seconds: float = 120.0
    small_batch: int = 4
    urgent_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.urgent_requests < 20:
            raise ValueError("urgent_requests must be >= 20 (a p95 needs them)")
        if self.routine_threads < 1 or not 1 <= self.routine_batch <= 64:
            raise ValueError("routine_threads >= 1 and routine_batch in 1..64")
        if self.max_seconds <= self.warmup_s:
            raise ValueError("max_seconds must exceed warmup_s")
        if not 1 <= self.small_batch <= 64:
            raise ValueError("small_batch must be in 1..64")


def _films(n: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, *contract.IMAGE_SHAPE), dtype=np.uint8)


def _urgent_latencies(transport, n: int, deadline: float, *, interval_s: float = 0.0) -> list[float]:
    """``n`` urgent single-film requests, one at a time, ``interval_s`` apart (arrivals, as studies come in)."""
    x = _films(1)
    level = contract.priority_level("urgent")
    out = []
    pace = threading.Event()  # never set: its wait() paces the arrivals
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        transport.infer(x, timeout_s=60, priority=level)
        out.append((time.perf_counter() - t0) * 1000)
        pace.wait(interval_s)
    return out


def _saturated(url: str, model: str, cfg: PriorityConfig, *, batch: int) -> dict:
    """Routine load from ``routine_threads`` clients (``batch`` films a request); urgent requests timed meanwhile."""
    from cxr.client.connect import make_transport
    from cxr.core.errors import CxrError, RetryableServerError

    x = _films(batch)
    level = contract.priority_level("routine")
    stop = threading.Event()
    counts = {"answered": 0, "rejected_retried": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + cfg.max_seconds

    def routine() -> None:
        t = make_transport("grpc", url, model, "", timeout_s=60)
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    t.infer(x, timeout_s=60, priority=level)
                    key = "answered"
                except RetryableServerError:
                    key = "rejected_retried"  # the client would retry it after a backoff
                    stop.wait(0.05)
                except CxrError:
                    key = "failed"
                with lock:
                    counts[key] += 1
        finally:
            t.close()

    threads = [threading.Thread(target=routine, daemon=True) for _ in range(cfg.routine_threads)]
    for th in threads:
        th.start()
    stop.wait(cfg.warmup_s)
    urgent = make_transport("grpc", url, model, "", timeout_s=60)
    with lock:
        before = dict(counts)  # the warm-up's requests are not counted
    t0 = time.monotonic()
    try:
        lat = _urgent_latencies(urgent, cfg.urgent_requests, deadline, interval_s=cfg.urgent_interval_s)
    finally:
        urgent.close()
        with lock:
            during = {k: counts[k] - before[k] for k in counts}
        seconds = time.monotonic() - t0
        stop.set()
        for th in threads:
            th.join(timeout=120)
    return {"urgent_ms": lat, "routine": {**during, "films_per_s": during["answered"] * batch / max(seconds, 1e-9)},
            "seconds": round(seconds, 1)}


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms, float)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "max_ms": float(a.max())}


def _variant(src: Path, model: str, dst: Path, *, priorities: bool, max_batch: int | None = None) -> Path:
    """A copy of the model folder whose cpu config has (the shipped) or lacks priority levels, and a smaller
    ``max_batch_size`` when asked."""
    import dataclasses

    from cxr.core.model_dir import ModelDir
    from cxr.export import repository, triton_config

    shutil.copytree(src / model, dst / model)
    base = triton_config.TRIAGE_CPU_POLICY if max_batch else triton_config.CPU_POLICY
    policy = dataclasses.replace(base, priorities=priorities, max_batch_size=max_batch or base.max_batch_size)
    cfg = triton_config.build(model, "cpu", repository.served_params(src / model), policy=policy)
    ModelDir(dst / model).write_config(cfg, target=f"cpu (priority levels {'on' if priorities else 'off'}, "
                                                   f"max batch {policy.max_batch_size})", config_name="cpu")
    return dst


#: The phases under load: name, priority levels, max batch size (None: the shipped one).
PHASES = (("with_priorities", True, None), ("without_priorities", False, None), ("cpu_triage", True, -1))


def run(cfg: PriorityConfig) -> dict:
    """Measure, write the reports, return the result."""
    from cxr.client.connect import make_transport
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    phases: dict = {}
    with tempfile.TemporaryDirectory(prefix="cxr-priority-") as tmp:
        for name, on, mb in PHASES:
            max_batch = cfg.small_batch if mb == -1 else None
            repo = _variant(Path(cfg.repository), cfg.model, Path(tmp) / name, priorities=on, max_batch=max_batch)
            h, g, m = free_ports(3)
            with TritonServer(ServerConfig(model_repository=repo, http_port=h, grpc_port=g, metrics_port=m,
                                           models=(cfg.model,))) as s:
                url = s.config.grpc_url
                t = make_transport("grpc", url, cfg.model, "", timeout_s=60)
                try:  # idle, on this same server and config, paced as under load
                    _urgent_latencies(t, 5, time.monotonic() + 60)  # warm the instances
                    idle = _stats(_urgent_latencies(t, cfg.urgent_requests, time.monotonic() + cfg.max_seconds,
                                                    interval_s=cfg.urgent_interval_s))
                finally:
                    t.close()
                batch = min(cfg.routine_batch, max_batch or cfg.routine_batch)
                res = _saturated(url, cfg.model, cfg, batch=batch)
                under = _stats(res["urgent_ms"])
                phases[name] = {"idle": idle, "urgent": under, "ratio_p95": under["p95_ms"] / idle["p95_ms"],
                                "routine": res["routine"], "seconds": res["seconds"],
                                "max_batch_size": max_batch or 64, "routine_batch": batch,
                                "urgent_ms": [round(v, 2) for v in res["urgent_ms"]]}
    base = phases["with_priorities"]
    ratios = {
        "urgent_p95_saturated_over_idle": base["ratio_p95"],
        "urgent_p95_without_priorities_over_idle": phases["without_priorities"]["ratio_p95"],
        "urgent_p95_small_batch_over_idle": phases["cpu_triage"]["ratio_p95"],
        "routine_throughput_small_batch_over_shipped": (phases["cpu_triage"]["routine"]["films_per_s"]
                                                        / max(base["routine"]["films_per_s"], 1e-9)),
    }
    result: dict = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                   "repository": relative(cfg.repository), "out_dir": relative(cfg.out_dir)},
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "phases": phases,
        "ratios": ratios,
        "target": "urgent p95 under routine saturation within 2x its idle p95 (the same server and config)",
    }
    result["target_met"] = {name: ph["ratio_p95"] <= 2.0 for name, ph in phases.items()}
    result["routine_dropped"] = sum(ph["routine"]["failed"] for ph in phases.values())
    write(result, Path(cfg.out_dir))
    return result


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "priority.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, out_dir / "priority.png")
    ph, r = result["phases"], result["ratios"]
    c = result["config"]
    lines = [
        "# Urgent studies first: priority levels under routine saturation",
        "",
        f"Measured by `cxr bench-priority` on this machine ({result['machine']['cpus']} CPUs, embedded CPU Triton, "
        f"model `{c['model']}`). For each config, on its own server: {c['urgent_requests']} urgent requests of one "
        f"film, {c['urgent_interval_s']} s apart, timed on the idle server, then again while {c['routine_threads']} "
        f"routine clients send up to {c['routine_batch']} films a request without pause. Configs: the shipped `cpu` "
        "(priority levels on, `max_batch_size` 64), the same without priority levels, and the triage config "
        f"(`cpu_triage`: priority levels on, `max_batch_size` {c['small_batch']}). Routine throughput is counted over "
        "the urgent requests' window.",
        "",
        "| config | idle urgent p95 (ms) | saturated urgent p50 (ms) | saturated urgent p95 (ms) | p95 saturated / idle | "
        "routine films/s | routine answered | rejected (retried) | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"with_priorities": "`cpu`, priority levels", "without_priorities": "`cpu`, no priority levels",
              "cpu_triage": f"`cpu_triage`, priority levels, batch {c['small_batch']}"}
    for name, label in labels.items():
        p = ph[name]
        rt = p["routine"]
        lines.append(f"| {label} | {p['idle']['p95_ms']:.1f} | {p['urgent']['p50_ms']:.1f} | {p['urgent']['p95_ms']:.1f} | "
                     f"**{p['ratio_p95']:.2f}x** | {rt['films_per_s']:.0f} | {rt['answered']} | {rt['rejected_retried']} | "
                     f"{rt['failed']} |")
    met = [labels[n] for n, ok in result["target_met"].items() if ok]
    lines += [
        "",
        f"- target: urgent p95 under saturation within 2x its idle p95; met by: {', '.join(met) if met else 'none'}",
        f"- routine throughput of `cpu_triage` over `cpu`: {r['routine_throughput_small_batch_over_shipped']:.2f}x",
        f"- routine requests failed (dropped): {result['routine_dropped']}; a rejection is `UNAVAILABLE` from a full "
        "queue, which the client retries with backoff",
        "",
        "![urgent latency](priority.png)",
        "",
        "Rerun: `cxr bench-priority --out docs/capacity/priority` (writes this folder).",
    ]
    (out_dir / "priority.md").write_text("\n".join(lines) + "\n")


def _plot(result: dict, path: Path) -> None:
    from cxr.train.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(8, 4))
    ph = result["phases"]
    data = [ph[k]["urgent_ms"] for k in ("with_priorities", "without_priorities", "cpu_triage")]
    small = result["config"]["small_batch"]
    ax.boxplot(data, tick_labels=["cpu config\n(priority levels, batch 64)", "cpu config without\npriority levels",
                               f"cpu_triage config\n(priority levels, batch {small})"],
               showfliers=True)
    idle = max(ph[k]["idle"]["p95_ms"] for k in ("with_priorities", "without_priorities", "cpu_triage"))
    ax.axhline(idle, color="g", ls="--", label="idle p95 (the highest of the three)")
    ax.axhline(2 * idle, color="r", ls=":", label="2x that (target)")
    ax.set_ylabel("urgent request latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Urgent single-film requests while routine batches saturate the server")
    save_figure(fig, path)

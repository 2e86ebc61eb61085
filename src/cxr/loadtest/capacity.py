"""``cxr capacity``: a Locust sweep of concurrent users against a running Triton, and the planning arithmetic.

For each user count the sweep runs a bounded headless Locust (its own
process, as Locust and TensorFlow do not mix in one), records client
throughput and p50/p95/p99 latency, and reads Triton's own view from the
statistics API: queue time vs compute time and the average executed batch.
It then finds the highest throughput that meets the latency objective and
answers "how many servers for N studies an hour at p95 under X ms".
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxr.core.paths import relative

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True)
class CapacityConfig:
    """A capacity sweep.

    Attributes:
        grpc_url: Triton gRPC ``host:port`` the users load.
        http_url: Triton HTTP ``host:port`` (statistics API).
        metrics_url: Triton metrics ``host:port`` (server-side latency summaries, cross-checked against the client).
        admin_key: Sent as header ``admin-key`` to the statistics API when the server restricts it.
        model: Served model name.
        users: User counts to sweep.
        step_seconds: Duration of each step (Locust ``-t``).
        images_per_request: Images in each request.
        images_dir: X-rays the users send (None: generated images).
        slo_p95_ms: Latency objective on p95.
        images_per_study: Images per study (a PA + lateral study is 2).
        target_studies_per_hour: Planning target.
        headroom: Fraction of capacity kept free (0.3 = plan at 70% load).
        protocol: ``grpc`` or ``http`` users.
        out_dir: Report folder.
    """

    grpc_url: str = "127.0.0.1:8001"  # a comma list is a fleet: Locust users spread over it
    http_url: str = "127.0.0.1:8000"
    metrics_url: str = "127.0.0.1:8002"
    admin_key: str | None = field(default=None, repr=False)
    model: str = "pneumonia"
    users: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    step_seconds: int = 20
    images_per_request: int = 1
    images_dir: Path | None = None
    slo_p95_ms: float = 500.0
    images_per_study: int = 1
    target_studies_per_hour: float = 10_000.0
    headroom: float = 0.3
    protocol: str = "grpc"
    out_dir: Path = Path("out/capacity")

    def __post_init__(self) -> None:
        if not self.users or min(self.users) < 1:
            raise ValueError("users must be positive")
        if self.step_seconds < 2:
            raise ValueError("step_seconds must be >= 2")
        if not 0 <= self.headroom < 1:
            raise ValueError("headroom must be in [0, 1)")
        if self.images_per_request < 1 or self.images_per_study < 1:
            raise ValueError("images per request/study must be >= 1")
        if self.protocol not in ("grpc", "http"):
            raise ValueError("protocol must be grpc or http")


def triton_stats(http_url: str, model: str, admin_key: str | None = None) -> dict[str, float]:
    """Cumulative counters of one model from ``/v2/models/<model>/stats`` (sends the admin key when given)."""
    from cxr.core.security import ADMIN_HEADER

    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/stats",
                                 headers={ADMIN_HEADER: admin_key} if admin_key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        s = json.load(r)["model_stats"][0]
    inf = s["inference_stats"]
    return {
        "inference_count": float(s["inference_count"]),
        "execution_count": float(s["execution_count"]),
        "success_count": float(inf["success"]["count"]),
        "queue_ns": float(inf["queue"]["ns"]),
        "compute_ns": float(inf["compute_input"]["ns"] + inf["compute_infer"]["ns"] + inf["compute_output"]["ns"]),
    }


def server_latency(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's own request latency from ``/metrics`` (``cxr serve`` turns on ``summary_latencies``).

    Returns the cumulative ``sum_us`` and ``count`` (for exact per-step means) and the summary's current
    quantiles ``p50_us``, ``p90_us``, ``p99_us`` (Triton's sliding window; empty when summaries are off).
    """
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    pat = re.compile(r'^nv_inference_request_summary_us(_sum|_count)?\{([^}]*)\} ([0-9.eE+-]+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if not m or f'model="{model}"' not in m.group(2):
            continue
        suffix, labels, value = m.groups()
        if suffix == "_sum":
            out["sum_us"] = float(value)
        elif suffix == "_count":
            out["count"] = float(value)
        else:
            q = re.search(r'quantile="([0-9.]+)"', labels)
            if q and q.group(1) in ("0.5", "0.9", "0.99"):
                out[{"0.5": "p50_us", "0.9": "p90_us", "0.99": "p99_us"}[q.group(1)]] = float(value)
    return out


def _urls(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def fleet_sum(parts: list[dict[str, float]]) -> dict[str, float]:
    """Counters summed over replicas; quantiles (not summable) kept only for a single replica."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if not k.startswith("p"):
                out[k] = out.get(k, 0.0) + v
    return out


def run_locust(cfg: CapacityConfig, users: int, prefix: Path) -> dict[str, float]:
    """One bounded headless Locust step; returns the aggregated row of its stats CSV."""
    host = cfg.grpc_url if cfg.protocol == "grpc" else cfg.http_url
    user_class = "TritonGrpcUser" if cfg.protocol == "grpc" else "TritonHttpUser"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user_class, "--headless", "-u", str(users),
        "-r", str(users), "-t", f"{cfg.step_seconds}s", "--host", host, "--csv", str(prefix), "--only-summary",
        "--stop-timeout", "5", "--images-per-request", str(cfg.images_per_request),
        "--model-name", cfg.model, "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ] + (["--images-dir", str(cfg.images_dir)] if cfg.images_dir is not None else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.step_seconds + 60, stdin=subprocess.DEVNULL)
    stats = Path(f"{prefix}_stats.csv")
    if r.returncode != 0 or not stats.exists():
        raise RuntimeError(f"locust failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    rows = [row for row in csv.DictReader(stats.open()) if row["Name"] == "Aggregated"]
    if not rows:
        raise RuntimeError("locust wrote no aggregated statistics")
    row = rows[0]
    return {
        "requests": float(row["Request Count"]),
        "failures": float(row["Failure Count"]),
        "requests_per_s": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
        "avg_ms": float(row["Average Response Time"]),
    }


def plan(steps: list[dict], cfg: CapacityConfig) -> dict:
    """Best step meeting the SLO, and servers needed for the target with headroom."""
    ok = [s for s in steps if s["p95_ms"] <= cfg.slo_p95_ms and s["failures"] == 0]
    if not ok:
        return {"meets_slo": False, "note": f"no step met p95 <= {cfg.slo_p95_ms:.0f} ms with zero failures"}
    best = max(ok, key=lambda s: s["images_per_s"])
    per_server_studies_h = best["images_per_s"] * 3600 / cfg.images_per_study
    usable = per_server_studies_h * (1 - cfg.headroom)
    return {
        "meets_slo": True,
        "best_users": best["users"],
        "images_per_s": best["images_per_s"],
        "p95_ms": best["p95_ms"],
        "studies_per_hour_per_server": per_server_studies_h,
        "usable_studies_per_hour_per_server": usable,
        "target_studies_per_hour": cfg.target_studies_per_hour,
        "servers_needed": max(1, math.ceil(cfg.target_studies_per_hour / usable)),
    }


def sweep(cfg: CapacityConfig) -> dict:
    """Run the sweep, write ``capacity.csv``, ``capacity.json``, ``capacity.md`` and PNG plots."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = []
    with tempfile.TemporaryDirectory(prefix="cxr-capacity-") as tmp:
        for users in cfg.users:
            logger.info("capacity step: %d users for %d s", users, cfg.step_seconds)
            before = fleet_sum([triton_stats(u, cfg.model, cfg.admin_key) for u in _urls(cfg.http_url)])
            lat0 = fleet_sum([server_latency(u, cfg.model) for u in _urls(cfg.metrics_url)])
            client = run_locust(cfg, users, Path(tmp) / f"u{users}")
            after = fleet_sum([triton_stats(u, cfg.model, cfg.admin_key) for u in _urls(cfg.http_url)])
            lat1 = fleet_sum([server_latency(u, cfg.model) for u in _urls(cfg.metrics_url)])
            d = {k: after[k] - before[k] for k in after}
            n = lat1.get("count", 0.0) - lat0.get("count", 0.0)
            server = {"server_mean_ms": (lat1["sum_us"] - lat0["sum_us"]) / n / 1000 if n > 0 else float("nan"),
                      "server_p50_ms": lat1.get("p50_us", float("nan")) / 1000,
                      "server_p99_ms": lat1.get("p99_us", float("nan")) / 1000}
            step = {"users": users, **client,
                    "images_per_s": client["requests_per_s"] * cfg.images_per_request,
                    "avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else 0.0,
                    "queue_ms_per_request": d["queue_ns"] / d["success_count"] / 1e6 if d["success_count"] else 0.0,
                    "compute_ms_per_request": d["compute_ns"] / d["success_count"] / 1e6 if d["success_count"] else 0.0,
                    **server}
            steps.append(step)
            logger.info("  %.1f img/s, p95 %.0f ms, batch %.2f", step["images_per_s"], step["p95_ms"], step["avg_batch"])
    result = {"config": {k: (relative(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "admin_key"},
              "steps": steps, "plan": plan(steps, cfg)}
    (out / "capacity.json").write_text(json.dumps(result, indent=1) + "\n")
    with open(out / "capacity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(steps[0].keys()))
        w.writeheader()
        w.writerows(steps)
    _plots(steps, cfg, out)
    (out / "capacity.md").write_text(markdown(result))
    return result


def _plots(steps: list[dict], cfg: CapacityConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s["users"] for s in steps]
    fig, ax1 = plt.subplots(figsize=(7, 4.5))
    ax1.plot(users, [s["images_per_s"] for s in steps], "o-", color="tab:blue", label="throughput")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent users")
    ax1.set_ylabel("images/s", color="tab:blue")
    ax2 = ax1.twinx()
    for key, style in (("p50_ms", ":"), ("p95_ms", "-"), ("p99_ms", "--")):
        ax2.plot(users, [s[key] for s in steps], style, color="tab:red", label=key)
    ax2.axhline(cfg.slo_p95_ms, color="grey", lw=1, label=f"SLO p95 {cfg.slo_p95_ms:.0f} ms")
    ax2.set_ylabel("latency (ms)", color="tab:red")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    ax1.set_title(f"Throughput and latency vs users ({cfg.model}, {cfg.images_per_request} image(s)/request)")
    fig.tight_layout()
    fig.savefig(out / "throughput_latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(users))
    q = [s["queue_ms_per_request"] for s in steps]
    c = [s["compute_ms_per_request"] for s in steps]
    ax.bar(x, c, label="compute (per request)")
    ax.bar(x, q, bottom=c, label="queue (per request)")
    for i, s in enumerate(steps):
        ax.text(i, q[i] + c[i], f"b={s['avg_batch']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [str(u) for u in users])
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("ms")
    ax.set_title("Triton: queue vs compute time (b = average executed batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "queue_compute.png", dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The capacity report as Markdown."""
    cfg, steps, p = result["config"], result["steps"], result["plan"]
    lines = [
        "# Capacity report",
        "",
        f"Model `{cfg['model']}` over {cfg['protocol']} at `{cfg['grpc_url'] if cfg['protocol'] == 'grpc' else cfg['http_url']}`, "
        f"{cfg['images_per_request']} image(s) per request, {cfg['step_seconds']} s per step, images from "
        + (f"`{relative(cfg['images_dir'])}`." if cfg["images_dir"] else "generated films (no --images-dir)."),
        "",
        "| users | images/s | p50 ms | p95 ms | p99 ms | failures | avg batch | queue ms/req | compute ms/req "
        "| server mean ms | server p50 ms | server p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(f"| {s['users']} | {s['images_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} | "
                     f"{s['failures']:.0f} | {s['avg_batch']:.2f} | {s['queue_ms_per_request']:.1f} | {s['compute_ms_per_request']:.1f} "
                     f"| {s.get('server_mean_ms', float('nan')):.1f} | {s.get('server_p50_ms', float('nan')):.1f} "
                     f"| {s.get('server_p99_ms', float('nan')):.1f} |")
    lines += [
        "",
        "Cross-check: the client's figures (Locust, end to end) against Triton's own request latency from `:8002/metrics` "
        "(`--metrics-config summary_latencies=true`). The server mean is exact per step (from the summary's sum and "
        "count); its p50/p99 come from Triton's sliding window (about a minute), which can include the previous step. "
        "The client sees the server's latency plus the network, gRPC and its own scheduling.",
    ]
    lines += ["", "## Planning", ""]
    if p["meets_slo"]:
        lines += [
            f"- Highest throughput meeting p95 <= {cfg['slo_p95_ms']:.0f} ms: **{p['images_per_s']:.1f} images/s** "
            f"at {p['best_users']} users (p95 {p['p95_ms']:.0f} ms).",
            f"- One server: {p['images_per_s']:.1f} img/s x 3600 / {cfg['images_per_study']} image(s) per study = "
            f"**{p['studies_per_hour_per_server']:.0f} studies/hour**; with {cfg['headroom']:.0%} headroom, "
            f"{p['usable_studies_per_hour_per_server']:.0f} studies/hour.",
            f"- Replicas needed for {cfg['target_studies_per_hour']:.0f} studies/hour at p95 <= {cfg['slo_p95_ms']:.0f} ms: "
            f"ceil({cfg['target_studies_per_hour']:.0f} / {p['usable_studies_per_hour_per_server']:.0f}) = "
            f"**{p['servers_needed']} server(s)** like this one (from the measured curve of "
            f"{len(_urls(cfg['grpc_url']))} replica(s) loaded together).",
        ]
    else:
        lines.append(f"- {p['note']}.")
    lines += ["", "![throughput and latency](throughput_latency.png)", "", "![queue vs compute](queue_compute.png)", ""]
    return "\n".join(lines)

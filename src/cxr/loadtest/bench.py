"""``cxr bench``: serving benchmarks measured side by side in one run, reported as ratios.

Not a test: numbers depend on the machine. Every figure is measured in the
same process run on the same machine, and the JSON records the machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract, imaging
from cxr.core.errors import NotAssessableError
from cxr.core.paths import DEFAULT_CACHE, relative

logger = logging.getLogger(__name__)

#: Keys the JSON always has (ratios unless the name says otherwise).
REQUIRED_KEYS = (
    "ort_images_per_s", "triton_vs_ort", "batching_gain", "p99_ms_batching", "p99_ms_no_batching",
    "int8_speedup", "preprocess_vs_server", "compact_vs_inception",
    "p99_over_p50_c1", "p99_over_p50_c8", "stalls_per_1000", "legacy_stalls_per_1000", "client_vs_perf_analyzer",
    "tls_vs_plaintext", "ray_scaling_1_to_2",
)
#: A request slower than this is a stall.
STALL_MS = 250.0
#: Where perf_analyzer is looked for: a root file system (a Debian 13 chroot) holding it, in the tools' cache.
DEFAULT_PERF_ANALYZER_ROOT = DEFAULT_CACHE / "perf_analyzer"


@dataclass(frozen=True)
class BenchConfig:
    """What ``cxr bench`` measures.

    Attributes:
        repository: Model repository holding ``<model>`` and ``<model>_int8``.
        model: FP32 model name.
        images_dir: Full-resolution images for the preprocessing rate (generated when absent).
        out: JSON output file.
        seconds: Duration of each timed window.
        batch_sizes: Batch sizes tried for raw onnxruntime throughput.
        concurrency: Concurrent single-image requests for the batching comparison.
        inception: Measure the InceptionV3 baseline (needs TensorFlow + tf2onnx once; cached).
        tail_seconds: Length of each tail-latency probe (1-image requests back to back, at concurrency 1 and 8).
        ray_images: Files in the Ray scaling job (one node, then two).
        perf_analyzer_root: Chroot holding NVIDIA's perf_analyzer (``None`` or missing: that ratio is skipped, said so).
    """

    repository: Path
    model: str = "pneumonia"
    images_dir: Path | None = None
    out: Path = Path("bench/results.json")
    seconds: float = 8.0
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64)
    concurrency: int = 16
    inception: bool = True
    tail_seconds: float = 25.0
    ray_images: int = 256
    perf_analyzer_root: Path | None = DEFAULT_PERF_ANALYZER_ROOT

    def __post_init__(self) -> None:
        if self.tail_seconds <= 0:
            raise ValueError("tail_seconds must be > 0")
        if self.seconds <= 0:
            raise ValueError("seconds must be > 0")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch_sizes must be positive")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")


def _timed(fn: Callable[[], int], seconds: float, *, warmup: int = 2) -> float:
    """Items per second of ``fn`` (which returns items done) over ``seconds``."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def ort_throughput(onnx_path: Path, batch_sizes: tuple[int, ...], seconds: float) -> dict[int, float]:
    """In-process onnxruntime images/s per batch size (all cores, all graph optimisations)."""
    from cxr.core.ort_session import make_session

    sess = make_session(onnx_path)
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for b in batch_sizes:
        x = rng.integers(0, 256, (b, *contract.IMAGE_SHAPE), dtype=np.uint8)

        def run(x: np.ndarray = x) -> int:
            sess.run(None, {contract.INPUT_NAME: x})
            return len(x)

        out[b] = _timed(run, seconds / len(batch_sizes) * 2)
    return out


def preprocess_rate(images_dir: Path | None, seconds: float) -> tuple[float, str]:
    """Images/s of :func:`imaging.preprocess` on one core over full-resolution files."""
    files: list[Path] = []
    if images_dir is not None and Path(images_dir).is_dir():
        files = sorted(p for p in Path(images_dir).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    source = relative(images_dir) if images_dir is not None else "none"
    if not files:
        from PIL import Image

        tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
        rng = np.random.default_rng(0)
        for i in range(8):
            a = rng.normal(120, 40, (2000, 2300)).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp / f"g{i}.jpeg", quality=90)
        files = sorted(tmp.glob("*.jpeg"))
        source = "generated 2300x2000 JPEGs"
    blobs = [f.read_bytes() for f in files]  # measure decode + resize, not disk
    counter = [0]

    def one() -> int:
        try:  # the eligibility and pixel rules are part of the cost; a refusal is still an answer
            imaging.preprocess(blobs[counter[0] % len(blobs)])
        except NotAssessableError:
            pass
        counter[0] += 1
        return 1

    return _timed(one, seconds), f"{source} ({len(files)} files)"


def _variant_repo(src_repo: Path, model: str, dst: Path, *, variant: str) -> Path:
    """A copy of one model folder whose cpu config is the shipped one, ``legacy`` (one instance, preferred batch
    sizes: the configuration that stalled), or ``no_batching``."""
    from cxr.core.model_dir import ModelDir
    from cxr.export import repository, triton_config

    shutil.copytree(src_repo / model, dst / model)
    policy = triton_config.LEGACY_CPU_POLICY if variant == "legacy" else None
    cfg = triton_config.build(model, "cpu", repository.served_params(src_repo / model), policy=policy)
    if variant == "no_batching":
        cfg.ClearField("dynamic_batching")
    ModelDir(dst / model).write_config(cfg, target=f"cpu ({variant})", config_name="cpu")
    return dst


def tail_probe(url: str, model: str, *, concurrency: int, seconds: float) -> dict[str, float]:
    """Closed loop of 1-image requests (both outputs) from ``concurrency`` threads: percentiles and stalls."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(2).integers(0, 256, (1, *contract.IMAGE_SHAPE), dtype=np.uint8)
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        outs = [grpcclient.InferRequestedOutput(n) for n in contract.OUTPUT_NAMES]
        try:
            while time.perf_counter() < stop:
                inp = grpcclient.InferInput(contract.INPUT_NAME, list(x.shape), contract.INPUT_TRITON_DTYPE)
                inp.set_data_from_numpy(x)
                t0 = time.perf_counter()
                client.infer(model, [inp], outputs=outs, client_timeout=30)
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array(latencies)
    return {"requests": float(len(lat)), "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "stalls": float((lat > STALL_MS).sum()),
            "requests_per_s": float(len(lat) / seconds)}


def perf_analyzer(root: Path | None, url: str, model: str, *, concurrency: int, seconds: float) -> dict | None:
    """NVIDIA perf_analyzer's throughput (1-image requests at ``concurrency``), or ``None`` when it is not installed."""
    import re
    import subprocess

    binary = "/opt/pa/perf_analyzer/bin/perf_analyzer"
    if root is None or not (Path(root) / binary.lstrip("/")).exists():
        return None
    cmd = ["chroot", str(root), binary, "-m", model, "-u", url, "-i", "grpc", "-b", "1",
           "--concurrency-range", str(concurrency), "--measurement-interval", str(int(seconds * 1000)),
           "--stability-percentage", "60", "--max-trials", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=int(seconds * 10) + 120)
    m = re.search(r"Throughput:\s*([0-9.]+)\s*infer/sec", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"perf_analyzer failed (exit {r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    p99 = re.search(r"p99 latency:\s*([0-9]+)\s*usec", r.stdout)
    return {"infer_per_s": float(m.group(1)), "p99_ms": float(p99.group(1)) / 1000 if p99 else None,
            "command": " ".join(cmd[2:])}


def triton_load(url: str, model: str, *, concurrency: int, batch: int, seconds: float, tls=None) -> dict[str, float]:
    """Closed-loop load through the project's client: ``concurrency`` threads, ``batch`` images per request."""
    from cxr.client import PneumoniaClient

    x = np.random.default_rng(1).integers(0, 256, (batch, *contract.IMAGE_SHAPE), dtype=np.uint8)
    latencies: list[float] = []
    lock = threading.Lock()
    with PneumoniaClient(url, protocol="grpc", model=model, batch_size=batch, max_in_flight=concurrency, timeout_s=60,
                         tls=tls) as c:
        for _ in range(3):
            c.infer_batch(x)
        stop = time.perf_counter() + seconds
        count = [0]

        def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                c.transport.infer(x, timeout_s=60)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    count[0] += batch

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"images_per_s": count[0] / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": float(len(lat))}


def _served(repo: Path, models: tuple[str, ...], fn: Callable[[str], dict], *, tls=None) -> dict:
    from cxr.serving.server import ServerConfig, TritonServer, free_ports

    h, g, m = free_ports(3)
    with TritonServer(ServerConfig(model_repository=repo, http_port=h, grpc_port=g, metrics_port=m, models=models,
                                   tls=tls)) as s:
        return fn(s.config.grpc_url)


def tls_saturation(repo: Path, model: str, seconds: float) -> dict | None:
    """Saturation throughput over mutual TLS (a development PKI made on the spot), or ``None`` without cryptography."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return None
    from cxr.core.security import TlsClient, TlsServer, make_dev_pki

    with tempfile.TemporaryDirectory(prefix="cxr-bench-pki-") as d:
        pki = make_dev_pki(Path(d))
        client = TlsClient(pki["ca"], pki["client_cert"], pki["client_key"])
        server = TlsServer(pki["server_cert"], pki["server_key"], pki["ca"])
        return _served(repo, (model,), lambda url: triton_load(url, model, concurrency=4, batch=16, seconds=seconds,
                                                                  tls=client), tls=server)


def inception_onnx(cache_dir: Path) -> Path:
    """The report's InceptionV3 (random weights: speed does not depend on them) as ONNX, cached."""
    path = cache_dir / "inception_v3_bench.onnx"
    if path.exists():
        return path
    from cxr.export.onnx_export import to_onnx
    from cxr.train import models
    from cxr.train.scoring import Calibration

    cache_dir.mkdir(parents=True, exist_ok=True)
    keras_path = cache_dir / "inception_v3_bench.keras"
    models.build("inception_v3").save(str(keras_path))
    to_onnx(keras_path, path, Calibration())
    keras_path.unlink()
    return path


def served_inception(repo: Path) -> Path | None:
    """The newest version of an exported InceptionV3 in the repository (its card says so), if there is one."""
    from cxr.core.model_dir import model_dirs

    for folder in model_dirs(repo):
        if folder.card().architecture == "inception_v3":
            versions = sorted((p for p in folder.path.glob("*/model.onnx") if p.parent.name.isdigit()),
                              key=lambda p: int(p.parent.name))
            if versions:
                return versions[-1]
    return None


RAY_SCRIPT = """
set -e
ip link set lo up
# loopback-only test cluster inside its own namespace: no token auth (a stray ~/.ray/auth_token would otherwise
# put the head in token mode and leave the worker out)
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PATH={bin}:$PATH
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port 6380 --num-cpus 1 --include-dashboard false --node-ip-address 127.0.0.1 >/dev/null 2>&1
run() {{ t0=$(date +%s.%N); cxr predict {inputs} --ray 127.0.0.1:6380 --protocol embedded --format json \
        --out {tmp}/out_$1.json >/dev/null 2>&1 || true; t1=$(date +%s.%N); echo "$1 $t0 $t1" >> {tmp}/times.txt; }}
run 1
ray start --address 127.0.0.1:6380 --num-cpus 1 --node-ip-address 127.0.0.1 >/dev/null 2>&1
run 2
"""


def ray_scaling(images_dir: Path | None, n_images: int = 256) -> dict | None:
    """The same Ray Data job on a one-node and a two-node local cluster (1 CPU each) in a private network namespace.

    Returns ``None`` (the report says why) without Ray, root or ``unshare``.
    """
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("ray") is None or os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    files = sorted(p for p in Path(images_dir).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")) \
        if images_dir and Path(images_dir).is_dir() else []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ray-") as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        if not files:
            from PIL import Image

            rng = np.random.default_rng(0)
            a = rng.normal(120, 40, (2000, 2300)).clip(0, 255).astype(np.uint8)
            Image.fromarray(a).save(Path(tmp) / "g.jpeg", quality=90)
            files = [Path(tmp) / "g.jpeg"]
        for i in range(n_images):
            src = files[i % len(files)]
            shutil.copy(src, inputs / f"img_{i:04d}{src.suffix}")
        script = RAY_SCRIPT.format(bin=Path(sys.executable).parent, inputs=inputs, tmp=tmp)
        subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=900)
        times = {}
        for line in (Path(tmp) / "times.txt").read_text().splitlines() if (Path(tmp) / "times.txt").exists() else []:
            k, t0, t1 = line.split()
            times[k] = float(t1) - float(t0)
    if set(times) != {"1", "2"}:
        raise RuntimeError("the Ray scaling run did not complete")
    return {"images": n_images, "seconds_1_worker": times["1"], "seconds_2_workers": times["2"],
            "images_per_s_1_worker": n_images / times["1"], "images_per_s_2_workers": n_images / times["2"]}


def run_bench(cfg: BenchConfig) -> dict:
    """Measure everything and write ``cfg.out`` (JSON) and the table beside it (``.md``); returns the result dict."""
    repo = Path(cfg.repository)
    fp32 = repo / cfg.model / "1" / "model.onnx"
    int8 = repo / f"{cfg.model}_int8" / "1" / "model.onnx"
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
                 "model": cfg.model, "seconds_per_window": cfg.seconds}
    logger.info("onnxruntime FP32 ...")
    ort_fp32 = ort_throughput(fp32, cfg.batch_sizes, cfg.seconds)
    best_b = max(ort_fp32, key=lambda b: ort_fp32[b])
    res["ort_by_batch"] = {str(b): v for b, v in ort_fp32.items()}
    res["ort_best_batch"] = best_b
    res["ort_images_per_s"] = ort_fp32[best_b]

    logger.info("onnxruntime INT8 ...")
    ort_int8 = ort_throughput(int8, cfg.batch_sizes, cfg.seconds)
    res["ort_int8_by_batch"] = {str(b): v for b, v in ort_int8.items()}
    res["int8_speedup"] = max(ort_int8.values()) / res["ort_images_per_s"]

    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        shipped = _variant_repo(repo, cfg.model, Path(tmp) / "shipped", variant="shipped")
        legacy = _variant_repo(repo, cfg.model, Path(tmp) / "legacy", variant="legacy")
        off = _variant_repo(repo, cfg.model, Path(tmp) / "off", variant="no_batching")

        def shipped_runs(url: str) -> dict:
            sat = triton_load(url, cfg.model, concurrency=4, batch=16, seconds=cfg.seconds)
            single = triton_load(url, cfg.model, concurrency=cfg.concurrency, batch=1, seconds=cfg.seconds)
            c1 = tail_probe(url, cfg.model, concurrency=1, seconds=cfg.tail_seconds)
            c8 = tail_probe(url, cfg.model, concurrency=8, seconds=cfg.tail_seconds)
            pa = perf_analyzer(cfg.perf_analyzer_root, url, cfg.model, concurrency=cfg.concurrency, seconds=cfg.seconds)
            return {"saturation": sat, "single": single, "c1": c1, "c8": c8, "perf_analyzer": pa}

        def legacy_runs(url: str) -> dict:
            return {"c1": tail_probe(url, cfg.model, concurrency=1, seconds=cfg.tail_seconds),
                    "c8": tail_probe(url, cfg.model, concurrency=8, seconds=cfg.tail_seconds)}

        logger.info("Triton, shipped config (dynamic batching, two instances) ...")
        with_b = _served(shipped, (cfg.model,), shipped_runs)
        logger.info("Triton, the earlier config (one instance, preferred batch sizes) ...")
        old = _served(legacy, (cfg.model,), legacy_runs)
        logger.info("Triton, shipped config over mutual TLS ...")
        tls_sat = tls_saturation(shipped, cfg.model, cfg.seconds)
        logger.info("Triton without dynamic batching ...")
        without_b = _served(off, (cfg.model,), lambda url: triton_load(url, cfg.model, concurrency=cfg.concurrency,
                                                                          batch=1, seconds=cfg.seconds))
    res["triton_images_per_s"] = with_b["saturation"]["images_per_s"]
    res["triton_vs_ort"] = res["triton_images_per_s"] / res["ort_images_per_s"]
    res["batching_images_per_s"] = with_b["single"]["images_per_s"]
    res["no_batching_images_per_s"] = without_b["images_per_s"]
    res["batching_gain"] = res["batching_images_per_s"] / res["no_batching_images_per_s"]
    res["p99_ms_batching"] = with_b["single"]["p99_ms"]
    res["p99_ms_no_batching"] = without_b["p99_ms"]
    res["tail"] = {"shipped": {"c1": with_b["c1"], "c8": with_b["c8"]}, "legacy": old}
    res["p99_over_p50_c1"] = with_b["c1"]["p99_ms"] / with_b["c1"]["p50_ms"]
    res["p99_over_p50_c8"] = with_b["c8"]["p99_ms"] / with_b["c8"]["p50_ms"]
    n_new = with_b["c1"]["requests"] + with_b["c8"]["requests"]
    n_old = old["c1"]["requests"] + old["c8"]["requests"]
    res["stalls_per_1000"] = 1000 * (with_b["c1"]["stalls"] + with_b["c8"]["stalls"]) / n_new
    res["legacy_stalls_per_1000"] = 1000 * (old["c1"]["stalls"] + old["c8"]["stalls"]) / n_old
    res["tls_images_per_s"] = tls_sat["images_per_s"] if tls_sat else None
    res["tls_vs_plaintext"] = tls_sat["images_per_s"] / res["triton_images_per_s"] if tls_sat else None
    pa = with_b["perf_analyzer"]
    res["perf_analyzer"] = pa
    res["client_images_per_s_at_peer_concurrency"] = with_b["single"]["images_per_s"]
    res["client_vs_perf_analyzer"] = with_b["single"]["images_per_s"] / pa["infer_per_s"] if pa else None
    if pa is None:
        res["perf_analyzer_note"] = (f"perf_analyzer not found under {relative(cfg.perf_analyzer_root) if cfg.perf_analyzer_root else '-'}"
                                     "; give --perf-analyzer-root, a root file system holding it (docs/serving.md)")

    logger.info("preprocessing on one core ...")
    rate, source = preprocess_rate(cfg.images_dir, cfg.seconds)
    res["preprocess_images_per_s_one_core"] = rate
    res["preprocess_source"] = source
    res["preprocess_vs_server"] = rate / res["triton_images_per_s"]

    logger.info("Ray Data: one worker, then two ...")
    ray_res = ray_scaling(cfg.images_dir, cfg.ray_images)
    res["ray"] = ray_res
    res["ray_scaling_1_to_2"] = ray_res["images_per_s_2_workers"] / ray_res["images_per_s_1_worker"] if ray_res else None
    # Arithmetic, not a measurement: decoding nodes needed to feed a GPU Triton at an assumed rate.
    gpu_rate = 5000.0
    per_node = res["preprocess_images_per_s_one_core"]
    res["decode_arithmetic"] = {
        "assumed_gpu_triton_images_per_s": gpu_rate,
        "measured_decode_images_per_s_per_core": per_node,
        "cores_to_feed_one_gpu": math.ceil(gpu_rate / per_node),
        "nodes_of_8_cores_to_feed_one_gpu": math.ceil(gpu_rate / per_node / 8),
        "note": "arithmetic from the measured one-core decode rate and an assumed GPU serving rate; not measured",
    }

    if cfg.inception:
        logger.info("InceptionV3 baseline ...")
        served = served_inception(Path(cfg.repository))
        inc_path = served or inception_onnx(DEFAULT_CACHE)
        res["inception_source"] = (relative(served) if served else
                                   "random-weight InceptionV3 (no exported one in the repository; speed does not depend on weights)")
        inc = ort_throughput(inc_path, cfg.batch_sizes, cfg.seconds)
        res["inception_ort_by_batch"] = {str(b): v for b, v in inc.items()}
        res["compact_vs_inception"] = res["ort_images_per_s"] / max(inc.values())
    else:
        res["compact_vs_inception"] = None
    res["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(res) + "\n")
    return res


def _tail_text(res: dict, key: str) -> str:
    t = res["tail"]["shipped"][key]
    return (f"{key}: p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms, max {t['max_ms']:.0f} ms over {t['requests']:.0f} "
            "1-image requests (shipped config)")


def table(res: dict) -> str:
    """Markdown table of the headline figures."""
    def f(v: object, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:.2f}{unit}" if isinstance(v, float) else str(v)

    rows = [
        ("ort_images_per_s", f(res["ort_images_per_s"]), f"in-process onnxruntime FP32, best batch {res['ort_best_batch']} (images/s)", ""),
        ("triton_vs_ort", f(res["triton_vs_ort"]), f"Triton gRPC at saturation {f(res['triton_images_per_s'])} img/s over ORT", ">= 0.9"),
        ("batching_gain", f(res["batching_gain"]), f"{f(res['batching_images_per_s'])} vs {f(res['no_batching_images_per_s'])} img/s, 16 concurrent 1-image requests", ">= 1.3"),
        ("p99_ms_batching", f(res["p99_ms_batching"]), "p99 latency with dynamic batching (ms)", ""),
        ("p99_ms_no_batching", f(res["p99_ms_no_batching"]), "p99 latency without (ms)", ""),
        ("int8_speedup", f(res["int8_speedup"]), "INT8 QDQ over FP32, onnxruntime, best batch each", ""),
        ("preprocess_vs_server", f(res["preprocess_vs_server"]), f"one core preprocesses {f(res['preprocess_images_per_s_one_core'])} img/s ({res['preprocess_source']})", ">= 2"),
        ("compact_vs_inception", f(res["compact_vs_inception"]), "compact CNN over InceptionV3, onnxruntime, best batch each", ">= 8"),
        ("p99_over_p50_c1", f(res["p99_over_p50_c1"]), _tail_text(res, "c1"), "<= 3"),
        ("p99_over_p50_c8", f(res["p99_over_p50_c8"]), _tail_text(res, "c8"), "<= 3"),
        ("stalls_per_1000", f(res["stalls_per_1000"]), f"requests over {STALL_MS:.0f} ms per 1000, shipped config, c1 + c8 "
         f"({res['tail']['shipped']['c1']['requests'] + res['tail']['shipped']['c8']['requests']:.0f} requests)", "<= 0.5"),
        ("legacy_stalls_per_1000", f(res["legacy_stalls_per_1000"]), "the same, the earlier config (one instance, preferred "
         f"batch sizes 8/16/32; {res['tail']['legacy']['c1']['requests'] + res['tail']['legacy']['c8']['requests']:.0f} requests)", ""),
        ("tls_vs_plaintext", f(res["tls_vs_plaintext"]),
         f"gRPC over mutual TLS {f(res['tls_images_per_s'])} img/s vs plaintext {f(res['triton_images_per_s'])}, "
         "saturation (4 x 16-image requests)" if res["tls_vs_plaintext"] else "not measured (needs cryptography)", ""),
        ("ray_scaling_1_to_2", f(res["ray_scaling_1_to_2"]),
         (f"Ray Data job (decode + embedded inference) on 2 local nodes over 1: {f(res['ray']['images_per_s_2_workers'])} vs "
          f"{f(res['ray']['images_per_s_1_worker'])} img/s, {res['ray']['images']} full-resolution files; both nodes share "
          "this machine's 2 cores") if res.get("ray") else "not measured (needs the ray extra, root and unshare)", ""),
        ("client_vs_perf_analyzer", f(res["client_vs_perf_analyzer"]),
         (f"project client {f(res['client_images_per_s_at_peer_concurrency'])} img/s vs perf_analyzer "
          f"{f(res['perf_analyzer']['infer_per_s'])} infer/s, 1-image requests at concurrency 16")
         if res["perf_analyzer"] else res.get("perf_analyzer_note", "perf_analyzer not run"), "~1"),
    ]
    lines = ["| key | value | what | target |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {v} | {w} | {t} |" for k, v, w, t in rows]
    a = res.get("decode_arithmetic")
    if a:
        lines.append("")
        lines.append(f"Arithmetic, not measured: one core decodes {a['measured_decode_images_per_s_per_core']:.0f} img/s, so "
                     f"feeding a GPU Triton at an assumed {a['assumed_gpu_triton_images_per_s']:.0f} img/s takes "
                     f"{a['cores_to_feed_one_gpu']} decoding cores, about {a['nodes_of_8_cores_to_feed_one_gpu']} nodes of 8 "
                     "cores (the Ray workers of deploy/kubernetes/rayjob.yaml).")
    m = res["machine"]
    lines.append("")
    lines.append(f"Measured {res['created']} on {m['cpus']} CPUs ({m['platform']}), {res['seconds_per_window']:.0f} s per window.")
    return "\n".join(lines)


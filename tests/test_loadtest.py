"""Locust, the capacity report and the bench JSON on short bounded runs against the real test server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from cxr.loadtest.capacity import LOCUSTFILE, CapacityConfig, plan, sweep
from tests.conftest import cxr

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("user_class", ["TritonGrpcUser", "TritonHttpUser"])
def test_bounded_headless_locust_run(triton_server, sample_images, tmp_path, user_class) -> None:  # type: ignore[no-untyped-def]
    host = triton_server.config.grpc_url if "Grpc" in user_class else triton_server.config.http_url
    prefix = tmp_path / "run"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user_class, "--headless", "-u", "4", "-r", "4",
           "-t", "4s", "--host", host, "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
           "--images-dir", str(sample_images[0].parent), "--images-per-request", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)  # the outer bound: a hung run fails here
    assert r.returncode == 0, r.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    agg = rows["Aggregated"]
    assert int(agg["Request Count"]) > 0 and int(agg["Failure Count"]) == 0
    assert "pneumonia x2" in rows


def test_capacity_report_from_a_short_sweep(triton_server, sample_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = CapacityConfig(grpc_url=triton_server.config.grpc_url, http_url=triton_server.config.http_url,
                         metrics_url=f"127.0.0.1:{triton_server.config.metrics_port}", users=(1, 4), step_seconds=3, images_dir=sample_images[0].parent, slo_p95_ms=10_000,
                         target_studies_per_hour=50_000, out_dir=tmp_path / "cap")
    res = sweep(cfg)
    assert [s["users"] for s in res["steps"]] == [1, 4]
    for s in res["steps"]:
        assert s["requests"] > 0 and s["failures"] == 0 and s["images_per_s"] > 0
        assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] and s["avg_batch"] >= 1.0
    p = res["plan"]
    assert p["meets_slo"] and p["servers_needed"] >= 1
    for f in ("capacity.md", "capacity.csv", "capacity.json", "throughput_latency.png", "queue_compute.png"):
        assert (tmp_path / "cap" / f).stat().st_size > 100
    assert "server(s)** like this one" in (tmp_path / "cap" / "capacity.md").read_text()
    for s in res["steps"]:  # the server's own latency (summary_latencies) next to the client's
        assert 0 < s["server_mean_ms"] <= s["avg_ms"] + 1, s
        assert s["server_p50_ms"] > 0 and s["server_p99_ms"] >= s["server_p50_ms"]


def test_planning_arithmetic() -> None:
    cfg = CapacityConfig(slo_p95_ms=100, images_per_study=2, target_studies_per_hour=500_000, headroom=0.25)
    steps = [{"users": 1, "images_per_s": 50.0, "p95_ms": 40.0, "failures": 0},
             {"users": 8, "images_per_s": 120.0, "p95_ms": 90.0, "failures": 0},
             {"users": 16, "images_per_s": 150.0, "p95_ms": 300.0, "failures": 0}]
    p = plan(steps, cfg)
    assert p["best_users"] == 8
    assert p["studies_per_hour_per_server"] == pytest.approx(120 * 3600 / 2)
    assert p["servers_needed"] == 4  # 500000 / (216000 * 0.75 = 162000) = 3.09 -> 4
    assert not plan([{**steps[2]}], cfg)["meets_slo"]


def test_bench_json_schema_on_a_tiny_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.loadtest.bench import REQUIRED_KEYS
    from tests.conftest import SHIPPED_REPOSITORY

    out = tmp_path / "bench.json"
    r = cxr("bench", "--model-repository", str(SHIPPED_REPOSITORY), "--seconds", "0.5", "--tail-seconds", "1",
            "--ray-images", "16", "--out", str(out), "--no-inception", "--perf-analyzer-root", str(tmp_path / "none"),
            timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in REQUIRED_KEYS:
        assert k in res
    for k in ("ort_images_per_s", "triton_vs_ort", "batching_gain", "int8_speedup", "preprocess_vs_server"):
        assert isinstance(res[k], float) and res[k] > 0
    assert res["compact_vs_inception"] is None  # skipped on request, said so rather than invented
    assert res["client_vs_perf_analyzer"] is None and "perf_analyzer not found" in res["perf_analyzer_note"]
    assert isinstance(res["tls_vs_plaintext"], float) and res["tls_vs_plaintext"] > 0  # mutual TLS, measured
    for key in ("p99_over_p50_c1", "p99_over_p50_c8"):
        assert isinstance(res[key], float) and res[key] >= 1.0
    for variant in ("shipped", "legacy"):
        for c in ("c1", "c8"):
            t = res["tail"][variant] if variant == "legacy" else res["tail"]["shipped"]
            assert t[c]["requests"] > 0 and t[c]["p50_ms"] <= t[c]["p99_ms"] <= t[c]["max_ms"]
    assert res["stalls_per_1000"] >= 0 and res["legacy_stalls_per_1000"] >= 0
    assert res["ray"]["images"] == 16 and res["ray_scaling_1_to_2"] > 0  # a real two-node Ray cluster, in a namespace
    assert res["decode_arithmetic"]["note"].startswith("arithmetic")
    assert "| `triton_vs_ort` |" in r.stdout and "| `stalls_per_1000` |" in r.stdout


def test_bounded_soak_at_80_percent_has_no_failures_and_stable_memory(triton_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.loadtest.soak import SoakConfig, soak

    rep = soak(SoakConfig(grpc_url=triton_server.config.grpc_url, server_pid=triton_server.pid, duration_s=30,
                          saturation_s=4, out=tmp_path / "soak.json"))
    assert rep["failed"] == 0 and rep["succeeded"] == rep["requests"] > 0
    assert rep["achieved_images_per_s"] > 0.5 * rep["offered_images_per_s"]
    s0, s1 = rep["rss_start"]["server_rss_mb"], rep["rss_end"]["server_rss_mb"]
    c0, c1 = rep["rss_start"]["client_rss_mb"], rep["rss_end"]["client_rss_mb"]
    assert s0 and s1 and s1 < s0 * 1.25 + 50, (s0, s1)  # server memory stable
    assert c1 < c0 * 1.25 + 50, (c0, c1)
    assert json.loads((tmp_path / "soak.json").read_text())["requests"] == rep["requests"]


def test_bench_uses_an_exported_inception_when_the_repository_has_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.loadtest.bench import served_inception

    def card(arch: str) -> str:  # what the bench reads of a card; a card is valid only with its sha256 and threshold
        return json.dumps({"architecture": arch, "sha256": "ab" * 32, "calibration": {"threshold": 0.5}})

    (tmp_path / "pneumonia" / "1").mkdir(parents=True)
    (tmp_path / "pneumonia" / "model_card.json").write_text(card("compact_cnn"))
    (tmp_path / "pneumonia" / "1" / "model.onnx").write_bytes(b"x")
    assert served_inception(tmp_path) is None  # only the compact model: the bench builds its own InceptionV3
    for v in (2, 10):
        (tmp_path / "inc" / str(v)).mkdir(parents=True)
        (tmp_path / "inc" / str(v) / "model.onnx").write_bytes(b"x")
    (tmp_path / "inc" / "model_card.json").write_text(card("inception_v3"))
    assert served_inception(tmp_path) == tmp_path / "inc" / "10" / "model.onnx"  # newest version, numerically


@pytest.mark.slow
def test_bench_priority_report_on_a_short_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`cxr bench-priority`, bounded: every phase measured, every routine request answered or retried, none failed.
    (The figures themselves are in docs/capacity/priority/, measured without other load on the machine.)"""
    r = cxr("bench-priority", "--urgent-requests", "20", "--routine-threads", "2", "--max-seconds", "15", "--out",
            str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "priority.json").read_text())
    phases = rep["phases"]
    assert set(phases) == {"with_priorities", "without_priorities", "cpu_triage"}
    for name in ("with_priorities", "without_priorities", "cpu_triage"):
        assert phases[name]["urgent"]["n"] == phases[name]["idle"]["n"] == 20 and phases[name]["routine"]["answered"] > 0
        assert phases[name]["routine"]["failed"] == 0  # delayed or retried, never dropped
    assert phases["cpu_triage"]["routine_batch"] == 4
    assert {"urgent_p95_saturated_over_idle", "urgent_p95_without_priorities_over_idle"} <= set(rep["ratios"])
    assert (tmp_path / "priority.png").stat().st_size > 0 and "priority levels" in (tmp_path / "priority.md").read_text()

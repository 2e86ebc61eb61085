"""Beyond one machine: a fleet of three real replicas (one SIGKILLed mid-run), Locust master and workers,
and the Kubernetes manifests validated against the Kubernetes schemas."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.serving.server import ServerConfig, TritonServer, free_ports
from tests.conftest import REPO, SHIPPED_REPOSITORY, cxr, freeze_after_journal_rows, xray_copies

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))


@pytest.fixture(scope="module")
def fleet():  # type: ignore[no-untyped-def]
    servers = []
    try:
        for _ in range(3):
            h, g, m = free_ports(3)
            cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, http_port=h, grpc_port=g, metrics_port=m,
                               models=("pneumonia",), startup_timeout_s=120)
            servers.append(TritonServer(cfg).start())
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_fleet_of_three_with_one_sigkilled_gives_every_input_one_row(fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = xray_copies(tmp_path / "in", 160)
    out = tmp_path / "r.csv"
    urls = ",".join(s.config.grpc_url for s in fleet)
    cmd = [sys.executable, "-m", "cxr.cli", "predict", str(d), "--url", urls, "--format", "csv", "--out", str(out),
           "--chunk", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    freeze_after_journal_rows(proc, out, 24)  # mid-run, held there while a replica goes
    try:
        fleet[1].kill()  # SIGKILL one replica mid-run
    finally:
        proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "taken out" in stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [f"img_{i:03d}.jpeg" for i in range(160)]
    assert all(r["status"] in ("ok", "not_assessable") for r in rows)  # none failed
    # identical to a single server's answers (the embedded runtime on the same model file)
    single = cxr("predict", str(d), "--protocol", "embedded", "--format", "json", timeout=300)
    assert single.returncode == 0, single.stderr
    ref = {Path(x["path"]).name: x for x in json.loads(single.stdout)}
    for r in rows:
        e = ref[Path(r["path"]).name]
        assert r["status"] == e["status"] and (r["label"] or None) == e["label"]
        if e["probability"] is not None:
            assert abs(float(r["probability"]) - e["probability"]) <= 1e-5


@pytest.mark.slow
def test_locust_master_with_two_workers_against_the_fleet(fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.loadtest.capacity import LOCUSTFILE

    live = [s for s in fleet if s.running()]
    hosts = ",".join(s.config.grpc_url for s in live)
    port = free_ports(1)[0]
    common = ["-f", str(LOCUSTFILE), "TritonGrpcUser", "--host", hosts]
    master = subprocess.Popen(
        [sys.executable, "-m", "locust", *common, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port",
         str(port), "--headless", "-u", "4", "-r", "4", "-t", "6s", "--expect-workers", "2", "--expect-workers-max-wait",
         "60", "--csv", str(tmp_path / "run"), "--only-summary", "--stop-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([sys.executable, "-m", "locust", *common, "--worker", "--master-host", "127.0.0.1",
                                 "--master-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    try:
        _, err = master.communicate(timeout=120)  # bounded: -t 6s, and this outer timeout
        assert master.returncode == 0, err[-3000:]
        with open(tmp_path / "run_stats.csv") as f:
            agg = {row["Name"]: row for row in csv.DictReader(f)}["Aggregated"]
        assert int(agg["Request Count"]) > 0 and int(agg["Failure Count"]) == 0
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()


def test_manifests_exist() -> None:
    kinds = set()
    for m in MANIFESTS:
        for doc in m.read_text().split("\n---\n"):
            for line in doc.splitlines():
                if line.startswith("kind: "):
                    kinds.add(line.split(":", 1)[1].strip())
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
            "RayJob", "ConfigMap"} <= kinds


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(manifest: Path) -> None:
    """kubernetes-validate --strict against the 1.37 schemas; CRD kinds (ServiceMonitor, RayJob) may only warn."""
    exe = Path(sys.executable).with_name("kubernetes-validate")
    assert exe.exists(), "kubernetes-validate is not installed: pip install -e '.[dev]'"
    r = subprocess.run([str(exe), "--strict", "--kubernetes-version", "1.37", str(manifest)], capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR")]
    assert r.returncode == 0 and not errors, out
    for ln in out.splitlines():
        if ln.startswith("WARN"):
            assert "ServiceMonitor" in ln or "RayJob" in ln or "RayCluster" in ln, ln


@pytest.mark.slow
def test_capacity_sweep_over_the_fleet(fleet, sample_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The fleet's counters are summed over the replicas; all replicas share this machine's 2 cores."""
    from cxr.loadtest.capacity import CapacityConfig, sweep

    live = [s for s in fleet if s.running()]
    cfg = CapacityConfig(grpc_url=",".join(s.config.grpc_url for s in live),
                         http_url=",".join(s.config.http_url for s in live),
                         metrics_url=",".join(f"127.0.0.1:{s.config.metrics_port}" for s in live),
                         users=(2, 4), step_seconds=3, images_dir=sample_images[0].parent, slo_p95_ms=10_000,
                         target_studies_per_hour=2_000_000, out_dir=tmp_path / "cap")
    res = sweep(cfg)
    for s in res["steps"]:
        assert s["requests"] > 0 and s["failures"] == 0 and s["avg_batch"] >= 1.0
        assert s["server_mean_ms"] > 0
    assert res["plan"]["meets_slo"] and res["plan"]["servers_needed"] >= 1
    assert f"{len(live)} replica(s) loaded together" in (tmp_path / "cap" / "capacity.md").read_text()

"""`cxr predict --ray`: a real two-node Ray cluster in a private network namespace (loopback only), same answers as a
local run, and a worker node killed mid-job still gives every row once."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cxr, xray_copies

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent

# Ray binds every interface and registers nodes by the machine's address: the cluster, the job and everything
# they talk to run inside `unshare -n`, whose only interface is loopback.
CLUSTER = """
set -e
cd {repo}
ip link set lo up
# loopback-only test cluster: no token auth (a stray ~/.ray/auth_token would otherwise put the head in token mode
# and leave the worker out); the trap is set first, so a failed start never leaves a cluster running
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PATH={bin}:$PATH
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port 6380 --num-cpus 1 --include-dashboard false --node-ip-address 127.0.0.1 >{tmp}/head.log 2>&1
head_raylet=$(pgrep -x raylet | head -1)
ray start --address 127.0.0.1:6380 --num-cpus 1 --node-ip-address 127.0.0.1 >{tmp}/worker.log 2>&1
worker_raylet=$(pgrep -x raylet | grep -vx "$head_raylet" | head -1)
echo "$worker_raylet" > {tmp}/worker_raylet.pid
{job}
"""


def _inputs(d: Path, n: int) -> Path:
    xray_copies(d, n, seed=3000)
    (d / "notes.png").write_text("not an image")  # an error row must travel through Ray too
    return d


def _in_namespace(tmp: Path, job: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("the Ray tests need root, unshare and ip (a private network namespace keeps Ray off the network)")
    script = CLUSTER.format(repo=REPO, bin=VENV_BIN, tmp=tmp, job=job)
    return subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_node_cluster_gives_the_local_answers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _inputs(tmp_path / "in", 40)
    job = (f"cxr predict {d} --ray 127.0.0.1:6380 --protocol embedded --format csv --out {tmp_path}/ray.csv "
           f"|| echo exit=$? > {tmp_path}/ray.exit\n"
           f"python -c \"import ray; ray.init(address='127.0.0.1:6380'); print(len([n for n in ray.nodes() if n['Alive']]))\" "
           f"> {tmp_path}/nodes.txt")
    r = _in_namespace(tmp_path, job)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "ray.exit").read_text().strip() == "exit=1"  # the one unreadable file is an error row
    assert (tmp_path / "nodes.txt").read_text().strip() == "2"
    local = cxr("predict", str(d), "--protocol", "embedded", "--format", "json", timeout=300)
    ref = {Path(x["path"]).name: x for x in json.loads(local.stdout)}
    rows = _rows(tmp_path / "ray.csv")
    assert sorted(Path(r["path"]).name for r in rows) == sorted(ref)
    for r in rows:
        e = ref[Path(r["path"]).name]
        assert r["status"] == e["status"] and (r["label"] or None) == e["label"], (r, e)
        if e["probability"] is not None:
            assert abs(float(r["probability"]) - e["probability"]) <= 1e-5


def test_worker_node_killed_mid_job_every_row_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _inputs(tmp_path / "in", 240)
    out = tmp_path / "ray.csv"
    job = f"""
cxr predict {d} --ray 127.0.0.1:6380 --protocol embedded --format csv --out {out} --chunk 8 > {tmp_path}/job.log 2>&1 &
job=$!
for i in $(seq 1 600); do
  n=$( (wc -l < {out}.journal) 2>/dev/null || echo 0 )
  [ "$n" -gt 24 ] && break
  sleep 0.1
done
journaled=$( (wc -l < {out}.journal) 2>/dev/null || echo 0 )
kill -9 $(cat {tmp_path}/worker_raylet.pid) && echo "$journaled" > {tmp_path}/journaled_at_kill
wait $job || echo "exit=$?" > {tmp_path}/job.exit
"""
    r = _in_namespace(tmp_path, job, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows_at_kill = int((tmp_path / "journaled_at_kill").read_text()) - 1  # the kill succeeded; the header left out
    assert 24 <= rows_at_kill < 241  # the job was mid-way, by its own journal, when the worker node died
    assert (tmp_path / "job.exit").read_text().strip() == "exit=1", (tmp_path / "job.log").read_text()[-3000:]
    rows = _rows(out)
    names = [Path(r["path"]).name for r in rows]
    assert len(names) == len(set(names)) == 241  # every input once, none lost, none twice
    errors = [r for r in rows if r["status"] == "error"]
    assert [Path(r["path"]).name for r in errors] == ["notes.png"]  # only the unreadable file

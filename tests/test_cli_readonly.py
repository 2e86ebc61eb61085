"""Commands that only read a model leave its folder byte-identical (no commands.txt, no report inside it), and the
commands that build a run record themselves in its commands.txt once their work is done."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from cxr.train import run_log
from tests.conftest import REPO, SHIPPED_REPOSITORY


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cxr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_reading_commands_leave_the_model_folder_byte_identical(tmp_path: Path) -> None:
    repo, work = tmp_path / "repo", tmp_path / "work"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", repo / "pneumonia")
    work.mkdir()
    before = _tree(repo)
    films = REPO / "examples"
    r = _cxr("evaluate", "--model", str(repo / "pneumonia" / "1" / "model.onnx"), "--data", str(films),
             "--n-boot", "20", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "eval_examples" / "report.json").exists()  # an exported model's report: in the working directory
    r = _cxr("predict", str(films / "NORMAL"), "--protocol", "embedded", "--url", str(repo), "--format", "csv",
             "--out", str(work / "answers.csv"), cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cxr("monitor", str(work / "answers.csv"), "--model-repository", str(repo), cwd=work)
    assert r.returncode in (0, 3), r.stderr[-2000:]
    r = _cxr("health", "--protocol", "embedded", "--url", str(repo), cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tree(repo) == before


def test_the_run_log_records_commands_in_order(tmp_path: Path) -> None:
    assert run_log.recorded(tmp_path) == []
    assert run_log.record(tmp_path, "  ") is None and not (tmp_path / run_log.COMMANDS_FILE).exists()
    run_log.record(tmp_path, "cxr train --data d --out r")
    run_log.record(tmp_path, "cxr calibrate --model r/model.keras\n--data s")
    assert run_log.recorded(tmp_path) == ["cxr train --data d --out r", "cxr calibrate --model r/model.keras --data s"]


def test_a_failed_command_records_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"not a model")
    r = _cxr("calibrate", "--model", str(run / "model.keras"), "--data", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode != 0 and not (run / run_log.COMMANDS_FILE).exists()

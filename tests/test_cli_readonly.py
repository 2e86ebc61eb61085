"""Commands that only read a model leave its folder byte-identical (no commands.txt, no report inside it), and the
commands that build a run record themselves in its commands.txt once their work is done."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cxr.train import run_log
from tests.conftest import REPO, SHIPPED_REPOSITORY, cxr


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reading_commands_leave_the_model_folder_byte_identical(tmp_path: Path) -> None:
    repo, work = tmp_path / "repo", tmp_path / "work"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", repo / "pneumonia")
    work.mkdir()
    before = _tree(repo)
    films = REPO / "examples"
    r = cxr("evaluate", "--model", str(repo / "pneumonia" / "1" / "model.onnx"), "--data", str(films),
            "--n-boot", "20", cwd=work, home=work / "home", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # an exported model's report: in the state folder's reports, not the working directory
    assert (work / "home" / "reports" / "evaluate" / "eval_examples" / "report.json").exists()
    assert not (work / "eval_examples").exists()
    r = cxr("predict", str(films / "NORMAL"), "--protocol", "embedded", "--url", str(repo), "--format", "csv",
            "--out", str(work / "answers.csv"), cwd=work, home=work / "home", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cxr("monitor", str(work / "answers.csv"), "--model-repository", str(repo), cwd=work, home=work / "home",
            timeout=300)
    assert r.returncode in (0, 3), r.stderr[-2000:]
    r = cxr("health", "--protocol", "embedded", "--url", str(repo), cwd=work, home=work / "home", timeout=300)
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
    r = cxr("calibrate", "--model", str(run / "model.keras"), "--data", str(tmp_path / "missing"), cwd=tmp_path,
            home=tmp_path / "home", timeout=300)
    assert r.returncode != 0 and not (run / run_log.COMMANDS_FILE).exists()


#: Every command that writes a model folder, with what it needs besides its destination (nothing of it exists: the
#: command must refuse before reading any of it).
WRITING_COMMANDS = {
    "export": ["export", "--model", "runs/none/model.keras", "--data", "no-data"],
    "ood-fit": ["ood-fit", "--data", "no-data", "--split", "no-split.json"],
    "operating-points": ["operating-points", "--split", "no-split.json", "--point", "adult=nih:youden"],
    "claims": ["claims", "--split", "no-split.json", "--population", "nih=adult"],
    "configs": ["configs", "--default-operating-point", "pediatric"],
    "calibrate": ["calibrate", "--model", str(SHIPPED_REPOSITORY / "pneumonia"), "--data", "no-site"],
}


def test_writing_commands_never_change_the_shipped_model_by_default(tmp_path: Path) -> None:
    """Each command that writes a model folder, run with its defaults, and again pointed at the shipped repository
    without --overwrite, refuses in one line (exit 2) and leaves the shipped folders byte-identical."""
    shipped = {name: _tree(SHIPPED_REPOSITORY / name) for name in ("pneumonia", "pneumonia_int8")}
    for name, argv in WRITING_COMMANDS.items():
        r = cxr(*argv, cwd=tmp_path, home=tmp_path / "home", timeout=300)
        assert r.returncode == 2, (name, r.stderr[-2000:])
        if name != "calibrate":  # (its destination is --model itself)
            assert "--repository" in r.stderr, (name, r.stderr[-2000:])
            r = cxr(*argv, "--repository", str(SHIPPED_REPOSITORY), cwd=tmp_path, home=tmp_path / "home",
                    timeout=300)
            assert r.returncode == 2, (name, r.stderr[-2000:])
        assert "--overwrite" in r.stderr.strip().splitlines()[-1], (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    assert {name: _tree(SHIPPED_REPOSITORY / name) for name in shipped} == shipped
    assert not (SHIPPED_REPOSITORY.parent / "model_repository.previous").exists()


def test_overwrite_keeps_the_previous_version_aside(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", repo / "pneumonia")
    before = _tree(repo / "pneumonia")
    card = json.loads((repo / "pneumonia" / "model_card.json").read_text())
    other = next(p for p in card["operating_points"] if p != card["default_operating_point"])
    r = cxr("configs", "--repository", str(repo), "--default-operating-point", other, "--overwrite", cwd=tmp_path,
            home=tmp_path / "home", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [kept] = (tmp_path / "repo.previous").iterdir()
    assert kept.name.startswith("pneumonia-") and _tree(kept) == before  # the previous version, whole
    assert f"kept in {kept}" in r.stdout
    assert _tree(repo / "pneumonia") != before  # and the folder itself was rewritten
    assert list(repo.iterdir()) == [repo / "pneumonia"]  # nothing Triton would load as another model


def test_keep_previous_never_reuses_a_name(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from cxr.core.model_dir import keep_previous

    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "f").write_text("1")
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    first, second = keep_previous(tmp_path / "repo" / "m", now=now), keep_previous(tmp_path / "repo" / "m", now=now)
    assert first.name == "m-20260102T030405Z" and second.name == "m-20260102T030405Z-2"
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, second.name]  # no partial copy left

"""The `cxr` command: every subcommand has a help that reads well."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxr.cli import build_parser

SUBCOMMANDS = ["train", "evaluate", "calibrate", "export", "serve", "predict", "health", "bench", "capacity", "soak", "ui"]


def test_top_level_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in text


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cxr {cmd}") and len(out) > 200


def test_console_script_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "predict" in r.stdout


def test_errors_are_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "evaluate", "--model", str(tmp_path / "none.keras"),
                        "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: model not found" in r.stderr

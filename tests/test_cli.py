"""The `cxr` command: every subcommand has a help that reads well."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cxr.cli import build_parser

SUBCOMMANDS = ["lock-split", "train", "evaluate", "operating-points", "claims", "trials", "compare", "calibrate", "export", "ood-fit", "ood-eval", "explain-eval", "configs", "serve",
               "predict", "site-audit", "adapt", "monitor", "health", "bench", "capacity", "soak", "ui", "ui-passwd", "proxy",
               "listen", "audit-log", "bench-priority"]


def test_top_level_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in text


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_listed_and_tested() -> None:
    assert sorted(_subparsers()) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand explains itself in sentences, and every option says what it is."""
    sub = _subparsers()[cmd]
    assert sub.description and len(sub.description) >= 80 and sub.description.rstrip().endswith(".")
    undocumented = [a.option_strings or [a.dest] for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not undocumented, f"options without help: {undocumented}"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cxr {cmd}")
    for a in sub._actions:
        for opt in a.option_strings:
            assert opt in out


def test_console_script_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "predict" in r.stdout


def test_errors_are_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "evaluate", "--model", str(tmp_path / "none.keras"),
                        "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: model not found" in r.stderr

"""The `cxr` command: every subcommand has a help that reads well."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cxr.cli import build_parser
from tests.conftest import cxr

SUBCOMMANDS = ["lock-split", "import-weights", "train", "evaluate", "operating-points", "claims", "trials", "compare", "calibrate", "export", "ood-fit", "ood-eval", "explain-eval", "configs", "serve",
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
    r = cxr("--help", timeout=60)
    assert r.returncode == 0 and "predict" in r.stdout


def test_errors_are_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = cxr("evaluate", "--model", str(tmp_path / "none.keras"), "--data", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "error: model not found" in r.stderr


def test_top_level_help_groups_every_command_once(capsys: pytest.CaptureFixture[str]) -> None:
    """`cxr --help` lists the commands under the groups' headings, each command once, in its group."""
    from cxr.cli import GROUPS, group_commands

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    headings = [text.index(f"{module.TITLE} (cxr [{name}] COMMAND):") for name, module in GROUPS]
    assert headings == sorted(headings)
    listed = [cmd for _, module in GROUPS for cmd in group_commands(module)]
    assert sorted(listed) == sorted(SUBCOMMANDS)  # every command in exactly one group
    bounds = [*headings, text.index("\noptions:")]
    for (_, module), start, end in zip(GROUPS, bounds, bounds[1:]):
        section = text[start:end]
        assert all(f"\n  {cmd} " in section for cmd in group_commands(module)), module.__name__


def test_a_command_runs_after_its_group_name_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cxr.cli import main

    trail = tmp_path / "audit.jsonl"
    trail.write_text("")
    assert main(["site", "audit-log", "verify", str(trail)]) == main(["audit-log", "verify", str(trail)]) == 3
    with pytest.raises(SystemExit) as e:
        main(["build", "monitor", str(trail)])  # monitor is not a command of the build group
    assert e.value.code == 2


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_no_developer_path_in_help_or_defaults(cmd: str) -> None:
    """No `../shared/...` (the developer's data beside the checkout) in a help text or a default."""
    from cxr.core.paths import REPO_ROOT

    sub = _subparsers()[cmd]
    texts = [sub.description or "", sub.epilog or ""] + [a.help or "" for a in sub._actions]
    assert not [t for t in texts if "shared/" in t], cmd
    for a in sub._actions:
        default = a.default if isinstance(a.default, (list, tuple)) else [a.default]
        for d in default:
            if isinstance(d, Path):
                resolved = d.resolve()
                assert REPO_ROOT.parent / "shared" not in (resolved, *resolved.parents), (cmd, a.dest, d)


def test_a_group_lists_its_own_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """`cxr site --help` lists the site group's commands (exit 0); `cxr site` alone is a usage error (exit 2) that
    lists them too; `cxr serve --help` stays the serve command's help (a command of that name)."""
    from cxr.cli import GROUPS, group_commands, main

    site = dict(GROUPS)["site"]
    assert main(["site", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in group_commands(site)) and "predict" not in out
    assert main(["measure"]) == 2
    err = capsys.readouterr().err
    assert "evaluate" in err and err.strip().splitlines()[-1] == "cxr measure: error: choose one of its commands"
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--grpc-port" in capsys.readouterr().out

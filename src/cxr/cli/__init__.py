"""``cxr``: one command for the whole stack.

Each command parses its options, builds the library's typed options, calls one function and prints what it
returns; the commands are grouped by what a user does, one module a group (:mod:`cxr.cli.build`,
:mod:`cxr.cli.measure`, :mod:`cxr.cli.serve`, :mod:`cxr.cli.screen`, :mod:`cxr.cli.site`). Every error leaves
through :func:`main`, as one line and an exit code. Commands import their heavy dependencies (TensorFlow,
tritonclient, onnxruntime) lazily, so ``cxr predict`` works in a client-only install.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from cxr import __version__
from cxr.cli import build, measure, screen, serve, site
from cxr.core.errors import EXIT_CODES, CxrError, ExitCode

logger = logging.getLogger("cxr")

#: The command groups, in the order of ``cxr --help``: (name, module with TITLE and COMMANDS).
GROUPS: tuple[tuple[str, ModuleType], ...] = (
    ("build", build), ("measure", measure), ("serve", serve), ("screen", screen), ("site", site),
)

_EPILOG = """\
typical flow (DATA: a Kaggle-layout root with train/{NORMAL,PNEUMONIA}; SITE: a hospital's labelled sample
{NORMAL,PNEUMONIA}/; FILMS: files or folders to screen; a checkout's examples/ holds a few films):
  cxr train --data DATA --out runs/compact
  cxr evaluate --model runs/compact/model.keras --data SITE
  cxr calibrate --model runs/compact/model.keras --data SITE
  cxr export --model runs/compact/model.keras --data DATA --site SITE --repository runs/repository
  cxr serve --model-repository runs/repository &   # embedded CPU Triton on 127.0.0.1:8000/8001/8002
  cxr predict FILMS --protocol grpc --format csv --out results.csv

commands that write a model folder (export, ood-fit, operating-points, claims, configs) need --repository, and
--overwrite to write into a folder that exists, as calibrate does on an exported folder (its previous version is
copied to REPOSITORY.previous/ first); reading commands default to the shipped model.

every answer has a status: ok (Normal/Pneumonia), not_assessable (no label, a reason naming the
rule: route it to a human reader) or error (unreadable input, or a server failure to retry).

`cxr COMMAND --help` tells a command's options; `cxr GROUP COMMAND ...` works too (e.g. cxr site monitor).

""" + EXIT_CODES

Adder = Callable[[argparse._SubParsersAction], None]


class _Parser(argparse.ArgumentParser):
    """The top-level parser: its help lists the commands under their groups' headings, one line a command."""

    def format_help(self) -> str:
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        sub = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))
        helps = {c.dest: c.help for c in sub._get_subactions()}
        for name, module in GROUPS:
            formatter.start_section(f"{module.TITLE} (cxr [{name}] COMMAND)")
            formatter.add_arguments([argparse.Action([], dest=cmd, help=helps[cmd], metavar=cmd)
                                     for cmd in group_commands(module)])
            formatter.end_section()
        formatter.start_section("options")
        formatter.add_arguments([a for a in self._actions if a.option_strings])
        formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()


def group_commands(module: ModuleType) -> list[str]:
    """The command names of a group's module, in its order."""
    probe = argparse.ArgumentParser(add_help=False).add_subparsers()
    for add in module.COMMANDS:
        add(probe)
    return list(probe.choices)


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr`` argument parser with every command."""
    parser = _Parser(
        prog="cxr",
        description="Chest X-ray pneumonia screening: build a model (train, calibrate, export), measure it, serve it "
        "on Triton, screen films with it, and onboard and watch a site.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"cxr {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=argparse.ArgumentParser)
    for _, module in GROUPS:
        for add in module.COMMANDS:
            add(sub)
    return parser


def _ungrouped(argv: list[str]) -> list[str]:
    """``cxr GROUP COMMAND ...`` as ``cxr COMMAND ...`` (a group's name before one of its commands is dropped)."""
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or i + 1 >= len(argv):
        return argv
    for name, module in GROUPS:
        if argv[i] == name and argv[i + 1] in group_commands(module):
            return argv[:i] + argv[i + 1:]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr`` command."""
    from cxr.core.security import RedactingStream

    streams = sys.stdout, sys.stderr
    if not isinstance(sys.stderr, RedactingStream):  # no URL credentials in anything printed
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        sys.stdout, sys.stderr = streams


def _group_asked(argv: list[str]) -> tuple[str, ModuleType, bool] | None:
    """``cxr GROUP`` or ``cxr GROUP --help`` for a group whose name is no command: (name, module, help asked)."""
    words = [a for a in argv if a not in ("-v", "--verbose")]
    if not words or words[0] not in dict(GROUPS) or words[0] in _command_names():
        return None
    rest = words[1:]
    if rest and rest[0] not in ("-h", "--help"):
        return None  # a command follows (or something argparse will refuse with its own message)
    return words[0], dict(GROUPS)[words[0]], bool(rest)


def _command_names() -> set[str]:
    return {c for _, module in GROUPS for c in group_commands(module)}


def _group_help(name: str, module: ModuleType) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._get_subactions()}
    formatter = parser._get_formatter()
    formatter.add_usage(f"cxr [{name}] COMMAND ...", [], [])
    formatter.start_section(module.TITLE)
    formatter.add_arguments([argparse.Action([], dest=cmd, help=helps[cmd], metavar=cmd)
                             for cmd in group_commands(module)])
    formatter.end_section()
    formatter.add_text(f"`cxr {name} COMMAND --help` (or `cxr COMMAND --help`) tells a command's options.")
    return formatter.format_help()


def _main(argv: list[str]) -> int:
    from cxr.core.security import RedactingFilter

    asked = _group_asked(argv)
    if asked is not None:  # a group's own listing; without --help it is a usage error (no command given)
        name, module, wants_help = asked
        print(_group_help(name, module), end="", file=sys.stdout if wants_help else sys.stderr)
        if not wants_help:
            print(f"cxr {name}: error: choose one of its commands", file=sys.stderr)
        return ExitCode.OK if wants_help else ExitCode.USAGE
    argv = _ungrouped(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["cxr", *argv])  # for the cards and run logs of the commands that build a model
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # no URL credentials in any log line
        handler.addFilter(RedactingFilter())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place where every error leaves: one line, a non-zero code
        if args.verbose and exit_code_of(exc) == ExitCode.INTERNAL:
            raise
        return _error_line(args.command, exc)


#: The extra that installs each optional top-level module a command may import (``pip install 'cxr-triton[EXTRA]'``).
EXTRA_OF_MODULE: dict[str, str] = {
    "tensorflow": "train", "keras": "train", "tf2onnx": "train", "onnx": "train",
    "tritonclient": "client", "onnxruntime": "client", "pydicom": "client", "pylibjpeg": "client",
    "pytriton": "serve",
    "locust": "loadtest", "psutil": "loadtest",
    "gradio": "ui",
    "pynetdicom": "hospital", "highdicom": "hospital", "dicomweb_client": "hospital", "fhir": "hospital",
    "prometheus_client": "hospital", "scipy": "hospital", "matplotlib": "hospital",
    "ray": "ray", "pyarrow": "ray",
}


def exit_code_of(exc: BaseException) -> int:
    """The exit code ``cxr`` ends with when ``exc`` ends a command: a :class:`CxrError`'s own code, 2 for a file or
    folder that cannot be used (``OSError``) and for a missing extra, 1 for anything else (a bug)."""
    if isinstance(exc, CxrError):
        return int(type(exc).exit_code)
    if isinstance(exc, ModuleNotFoundError) and _missing_extra(exc):
        return ExitCode.USAGE
    if isinstance(exc, OSError):
        return ExitCode.USAGE
    return ExitCode.INTERNAL


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra whose package ``exc`` did not find, or None when it is no optional package of ours."""
    return EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])


def _error_line(command: str, exc: BaseException) -> int:
    """Print one line on stderr for ``exc`` (URL credentials redacted) and return its exit code."""
    from cxr.core.security import redact_url

    text = " ".join(str(exc).split()) or type(exc).__name__
    rc = exit_code_of(exc)
    if isinstance(exc, CxrError):
        # the project's own messages (some list failures on further lines)
        what = f"{text} (temporary: rerun later)" if rc == ExitCode.TEMPFAIL else str(exc)
    elif isinstance(exc, ModuleNotFoundError) and rc == ExitCode.USAGE:
        extra = _missing_extra(exc)
        what = f"this needs the '{extra}' extra: pip install 'cxr-triton[{extra}]' (no module named {exc.name!r})"
    elif rc == ExitCode.USAGE:
        what = f"{type(exc).__name__}: {text}"
    else:
        what = f"unexpected {type(exc).__name__}: {text} (run with -v for the traceback)"
    print(f"cxr {command}: error: {redact_url(what)}", file=sys.stderr)
    return rc

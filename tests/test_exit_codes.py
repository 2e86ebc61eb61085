"""One exit-code table (cxr.core.errors.ExitCode): every CxrError states its code, main() maps every error through
it in one place, and each code means one thing."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import cxr.cli
from cxr.cli import build_parser, main
from cxr.cli import site as site_cli
from cxr.core import errors
from cxr.core.audit_trail import AuditChainError, AuditLog, AuditTrailUnreadable
from cxr.core.errors import EXIT_CODES, CxrError, ExitCode
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the 3.10 floor
    import tomli as tomllib

SRC = REPO / "src" / "cxr"


def _error_classes() -> dict[str, tuple[Path, ast.ClassDef]]:
    """Every class of src/cxr that derives, by name, from CxrError (found in the source, imported or not)."""
    classes: dict[str, tuple[Path, ast.ClassDef]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (path, node)
    bases = {name: {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
             for name, (_, node) in classes.items()}
    found, grew = {"CxrError"}, True
    while grew:
        more = {n for n, b in bases.items() if b & found} - found
        found |= more
        grew = bool(more)
    return {n: classes[n] for n in sorted(found)}


def test_no_cxr_error_class_lacks_its_own_exit_code() -> None:
    found = _error_classes()
    assert {"CxrError", "ServerError", "RetryableServerError", "AuditChainError", "FhirError"} <= set(found)
    lacking = []
    for name, (path, node) in found.items():
        assigned = {t.id for stmt in node.body if isinstance(stmt, (ast.Assign, ast.AnnAssign))
                    for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]) if isinstance(t, ast.Name)}
        if "exit_code" not in assigned:
            lacking.append(f"{path.relative_to(REPO)}: {name}")
    assert not lacking, lacking


def test_every_code_is_in_the_table_and_the_help() -> None:
    codes = {int(c) for c in ExitCode}
    assert codes == {0, 1, 2, 3, 75, 130}
    help_text = build_parser().format_help()
    for code in codes:
        assert f"\n  {code:<4}" in EXIT_CODES and f"\n  {code:<4}" in help_text, code
    imported = [c for c in _all_subclasses(CxrError)]
    assert imported and all(c.exit_code in codes for c in imported)


def _all_subclasses(cls: type) -> list[type]:
    return [s for c in cls.__subclasses__() for s in [c, *_all_subclasses(c)]]


def _raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make `cxr audit-log verify` raise ``exc`` (the command is looked up when the parser is built)."""
    def boom(a):  # type: ignore[no-untyped-def]
        raise exc
    monkeypatch.setattr(site_cli, "_cmd_audit_verify", boom)


def _trail(path: Path) -> None:
    with AuditLog(path, component="test") as log:
        for _ in range(3):
            log.event("started", actor="process:test:1")


def test_0_ok(tmp_path: Path) -> None:
    _trail(tmp_path / "a.jsonl")
    assert main(["audit-log", "verify", str(tmp_path / "a.jsonl")]) == ExitCode.OK == 0


def test_1_a_plain_value_error_is_a_bug(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, ValueError("int() of a typo"))
    assert main(["audit-log", "verify", "x"]) == ExitCode.INTERNAL == 1
    assert "unexpected ValueError" in capsys.readouterr().err
    _raising(monkeypatch, ModuleNotFoundError("No module named 'nonesuch'", name="nonesuch"))  # no extra of ours
    assert main(["audit-log", "verify", "x"]) == 1


def test_2_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as ex:  # argparse's own usage errors
        main(["audit-log", "verify"])
    assert ex.value.code == ExitCode.USAGE == 2
    assert main(["audit-log", "verify", str(tmp_path / "missing.jsonl")]) == 2  # AuditTrailUnreadable
    assert AuditTrailUnreadable.exit_code == 2 and issubclass(AuditTrailUnreadable, AuditChainError)
    for exc in (CxrError("bad"), errors.DataError("no data"), errors.InvalidInputError("bad film"),
                FileNotFoundError(2, "No such file", "x")):
        _raising(monkeypatch, exc)
        assert main(["audit-log", "verify", "x"]) == 2, exc
    capsys.readouterr()


def test_2_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for module, extra in (("tensorflow", "train"), ("pynetdicom", "hospital"), ("tritonclient.grpc", "client"),
                          ("fhir.resources", "hospital"), ("gradio", "ui")):
        _raising(monkeypatch, ModuleNotFoundError(f"No module named '{module}'", name=module))
        assert main(["audit-log", "verify", "x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pip install 'cxr-triton[{extra}]'" in err[0] and "unexpected" not in err[0], err


def test_every_extra_named_is_one_of_pyproject() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(cxr.cli.EXTRA_OF_MODULE.values()) <= set(extras)


def test_3_a_check_said_no(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.jsonl"
    _trail(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")  # the first record deleted
    assert main(["audit-log", "verify", str(path)]) == ExitCode.CHECK_FAILED == 3
    assert main(["audit-log", "export", str(path), "--fhir-out", str(tmp_path / "ae.json")]) == 3
    from cxr.site.site_audit import NO_GO
    assert NO_GO == 3
    for exc in (errors.ModelIntegrityError("sha256 differs"), errors.ExportValidationError(["parity"]),
                AuditChainError("broken")):
        _raising(monkeypatch, exc)
        assert main(["audit-log", "verify", "x"]) == 3, exc
    capsys.readouterr()


def test_75_try_again_later(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, errors.RetryableServerError("server unavailable"))
    assert main(["audit-log", "verify", "x"]) == ExitCode.TEMPFAIL == 75
    assert "rerun later" in capsys.readouterr().err


def test_the_cli_returns_no_literal_codes_but_0() -> None:
    """Exit codes in the CLI's modules are ExitCode members (the go/no-go 3 is one constant, not a literal)."""
    for path in sorted((SRC / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Return) and node.value is not None:
                values = [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
                lits = [v.value for v in values if isinstance(v, ast.Constant) and type(v.value) is int and v.value]
                assert not lits, f"{path.name}:{node.lineno} returns a literal exit code {lits}"



"""The Python floor (``requires-python >= 3.10``) holds for every module, script and test, though the suite runs on a
newer Python: 3.10's grammar, and no 3.11+ standard-library name without a fallback. (mypy checks the package's
stdlib use at ``python_version = "3.10"``; this covers the scripts and tests as well, and the tools' settings.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

FLOOR = (3, 10)

#: Standard-library modules that are newer than the floor.
NEW_MODULES = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}
#: Standard-library names that are newer than the floor, by module.
NEW_NAMES = {
    "typing": {"Self", "Never", "LiteralString", "assert_never", "assert_type", "reveal_type", "NotRequired",
               "Required", "TypeVarTuple", "Unpack", "dataclass_transform", "override", "TypeAliasType", "get_overloads"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "ReprEnum", "verify", "EnumCheck", "member", "nonmember", "global_enum"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "hashlib": {"file_digest"},
    "contextlib": {"chdir"},
    "itertools": {"batched"},
    "math": {"cbrt", "exp2"},
    "operator": {"call"},
}
#: Builtins that are newer than the floor.
NEW_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _python_files() -> list[Path]:
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "scripts").glob("*.py"), *(REPO / "tests").rglob("*.py"),
             *(REPO / "model_repository").glob("*/*/model.py"), REPO / "setup.py"]
    return sorted(p for p in files if ".venv" not in p.parts)


def _guarded(tree: ast.Module) -> set[int]:
    """Ids of the nodes under a version guard (``if sys.version_info >= ...``) or an ``ImportError`` fallback."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        body: list[ast.stmt] = []
        if isinstance(node, ast.If) and "version_info" in ast.unparse(node.test):
            body = [*node.body, *node.orelse]
        elif isinstance(node, ast.Try) and any(
                h.type is not None and re.search(r"\b(ImportError|ModuleNotFoundError|AttributeError)\b",
                                                 ast.unparse(h.type)) for h in node.handlers):
            body = node.body
        for stmt in body:
            inside.update(id(n) for n in ast.walk(stmt))
    return inside


def newer_than_floor(text: str) -> list[str]:
    """What a module uses of Python after the floor: its grammar, and unguarded stdlib names (empty: none)."""
    try:
        tree = ast.parse(text, feature_version=FLOOR)
    except SyntaxError as exc:
        return [f"{exc.lineno}: syntax newer than {FLOOR}: {exc.msg}"]
    guarded = _guarded(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name in NEW_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in NEW_MODULES:
                found.append(f"{node.lineno}: from {node.module}")
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in NEW_NAMES.get(node.module, ())]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in NEW_NAMES.get(node.value.id, ()):
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
            found.append(f"{node.lineno}: {node.id}")
    return found


def test_every_module_script_and_test_runs_on_the_floor() -> None:
    offenders = {str(p.relative_to(REPO)): newer_than_floor(p.read_text()) for p in _python_files()}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("code", [
    "import tomllib\n",
    "from datetime import UTC\n",
    "import datetime\nnow = datetime.datetime.now(datetime.UTC)\n",
    "from typing import Self\n",
    "try:\n    pass\nexcept* ValueError:\n    pass\n",
    "raise ExceptionGroup('x', [ValueError()])\n",
    "from enum import StrEnum\n",
])
def test_the_floor_check_sees_what_it_forbids(code: str) -> None:
    assert newer_than_floor(code)


def test_the_floor_check_accepts_guarded_fallbacks() -> None:
    assert newer_than_floor("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n"
                            "    import tomli as tomllib\n") == []
    assert newer_than_floor("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n") == []
    assert newer_than_floor("match x:\n    case 1:\n        pass\n") == []  # 3.10 syntax is the floor's


def test_the_tools_check_at_the_floor() -> None:
    """requires-python, ruff's target and mypy's python_version name the same floor."""
    text = (REPO / "pyproject.toml").read_text()
    floor = ".".join(map(str, FLOOR))
    assert re.search(rf'^requires-python = ">={re.escape(floor)}"', text, re.M)
    assert re.search(rf'^target-version = "py{FLOOR[0]}{FLOOR[1]}"', text, re.M)
    assert re.search(rf'^python_version = "{re.escape(floor)}"', text, re.M)

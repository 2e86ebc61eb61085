"""The import structure: folders are layers (import-linter), no private import across modules, no cycle."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "check_imports.py"


def _load(name: str, path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _load("check_imports", SCRIPT)
contracts = _load("import_contracts", REPO / "scripts" / "import_contracts.py")


@pytest.mark.parametrize(("line", "names"), [
    ("from cxr.core.contract import _array_to_gray_u8", ["_array_to_gray_u8"]),
    ("    from cxr.client.batch import _row, file_sha256", ["_row"]),
    ("from m import (a, _b as b)", ["_b"]),
    ("from m import a, b as _c", []),  # a private alias of a public name takes nothing private
    ("from m import __version__", []),
    ("import cxr.core.contract", []),
    ("from m import (\n    a,\n    _b,\n    c as _c,\n    _d as d,\n)", ["_b", "_d"]),  # a multi-line import, whole
    ("try:\n    from m import a\nexcept ImportError:\n    from m import (\n        _b)", ["_b"]),
])
def test_private_names_of_an_import_statement(line: str, names: list[str]) -> None:
    assert contracts.private_names(line) == names


def test_a_multi_line_private_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract reads the parsed module: a private name on the third line of an import is found, with the
    statement's line; relative imports are resolved; a private name of a third-party package is not ours."""
    pkg = tmp_path / "privpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def a():\n    pass\n\n\ndef _hidden():\n    pass\n")
    (pkg / "high.py").write_text("import os\n\nfrom privpkg.low import (\n    a,\n    _hidden,\n)\n")
    (pkg / "sub" / "rel.py").write_text("def f():\n    from ..low import _hidden as h\n    from os import _exit\n")
    (pkg / "clean.py").write_text("from privpkg.low import a\n")
    modules = ["privpkg", "privpkg.low", "privpkg.high", "privpkg.sub", "privpkg.sub.rel", "privpkg.clean"]
    found = contracts.find_private_imports(modules, ("privpkg",),
                                           lambda m: contracts.module_file(m, [str(tmp_path)]))
    assert found == ["privpkg.high:3 imports privpkg.low._hidden", "privpkg.sub.rel:2 imports privpkg.low._hidden"]
    assert contracts.find_private_imports(["privpkg.clean"], ("privpkg",),
                                          lambda m: contracts.module_file(m, [str(tmp_path)])) == []


def test_cycle_finder_finds_every_cycle_and_nothing_else() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    comps = check.strongly_connected(set(edges), edges)
    assert sorted(comps) == [["a", "b", "c"], ["e", "f"]]
    assert check.one_cycle("a", {"a", "b", "c"}, edges) == ["a", "b", "c", "a"]
    assert check.strongly_connected({"x", "y"}, {"x": {"y"}}) == []


def test_cycles_are_reported_between_modules_and_folders(tmp_path: Path) -> None:
    """A package laid out like ours, with one module cycle inside a folder and one cycle between folders."""
    pkg = tmp_path / "cyclepkg"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from cyclepkg.low import b\n")
    (pkg / "low" / "b.py").write_text("from cyclepkg.low import a\nfrom cyclepkg.high import c\n")
    (pkg / "high" / "c.py").write_text("def f():\n    from cyclepkg.low import a\n")
    found = check.cycles(tmp_path, package="cyclepkg")
    assert any(line.startswith("cycle between folders: cyclepkg.high -> cyclepkg.low -> cyclepkg.high")
               or line.startswith("cycle between folders: cyclepkg.low -> cyclepkg.high -> cyclepkg.low") for line in found)
    assert any("cycle between modules:" in line and "cyclepkg.low.a" in line for line in found)


def test_the_project_keeps_its_layers_and_has_no_cycle() -> None:
    """What `.ci/run` checks: the import-linter contracts of pyproject.toml and grimp's graph, on src/cxr."""
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 10 kept, 0 broken." in r.stdout and "import cycles: 0" in r.stdout
    # the two homes of the hospital's code: the doors below train/ and export/, the site tools above export/
    out = " ".join(r.stdout.split())  # lint-imports wraps long contract names
    assert "cli > ui | site/ > loadtest/ > export/ > train/ > doors/ > client/ | serving/ > core/ KEPT" in out
    assert "The doors (doors/) import neither export/, train/ nor the site tools (site/) KEPT" in out


def test_the_readme_architecture_picture_is_the_contract() -> None:
    arch = _load("architecture", REPO / "scripts" / "architecture.py")
    readme = (REPO / "README.md").read_text()
    assert arch.block() in readme, "run python scripts/architecture.py --write"
    # every layer of the contract is in the picture, in order, top first
    drawn = [line.split()[0] for line in arch.picture().splitlines()[1:-1] if not line.lstrip().startswith("▼")]
    assert drawn == [arch.FOLDERS[m] for layer in arch.layers() for m in layer]
    assert drawn[0] == "src/cxr/cli/" and drawn[-1] == "src/cxr/core/"


def test_importing_the_client_does_not_load_tensorflow() -> None:
    """The client runs where TensorFlow is not installed; where it is (this environment), importing the client
    must still not load it (the forbidden contract checks the code; this checks what a fresh interpreter loads)."""
    assert importlib.util.find_spec("tensorflow") is not None, "TensorFlow must be installed for this test to mean anything"
    code = ("import importlib, pkgutil, sys\nimport cxr.client\n"
            "for m in pkgutil.iter_modules(cxr.client.__path__):\n    importlib.import_module('cxr.client.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout[-2000:]

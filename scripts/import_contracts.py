"""An import-linter contract type of this project: no module imports another module's private name.

``from cxr.core.contract import _helper`` ties a module to another's internals; a name two modules share is public.
The check reads each module's parsed source (``ast``), so an import spread over several lines
(``from m import (\\n    a,\\n    _b,\\n)``) is seen whole, and relative imports are resolved. Imports inside one
module's own package ``__init__`` are not special-cased.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

import grimp
from importlinter import Contract, ContractCheck, fields, output


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str, module: str = "", *, is_package: bool = False) -> list[tuple[int, str, str]]:
    """Every private name ``source`` imports with ``from ... import``: ``(line, module imported from, name)``.

    ``module`` (the importing module's dotted name) resolves relative imports; ``is_package`` says it is a
    package's ``__init__``. ``from m import b as _b`` takes nothing private (the alias is the importer's own)."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        found += [(node.lineno, target, a.name) for a in node.names if _is_private(a.name)]
    return sorted(found)


def private_names(source: str) -> list[str]:
    """The private names an import statement (or any source) takes (``from m import _a, b as _b`` -> ``['_a']``)."""
    return [name for _, _, name in private_imports(textwrap.dedent(source))]


def module_file(module: str, path: Iterable[str] | None = None) -> Path | None:
    """The source file of ``module`` on ``path`` (``sys.path`` by default), found without importing anything."""
    parts = module.split(".")
    for entry in sys.path if path is None else path:
        base = Path(entry or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def find_private_imports(modules: Iterable[str], roots: tuple[str, ...],
                         source_of: Callable[[str], Path | None] = module_file) -> list[str]:
    """``importer:line imports module.name`` for every private name a module under ``roots`` takes from another
    module under ``roots`` (third-party packages are their own business)."""

    def ours(m: str) -> bool:
        return any(m == r or m.startswith(r + ".") for r in roots)

    found = []
    for importer in sorted(m for m in modules if ours(m)):
        f = source_of(importer)
        if f is None:
            continue
        for line, target, name in private_imports(f.read_text(), importer, is_package=f.name == "__init__.py"):
            if target != importer and ours(target):
                found.append(f"{importer}:{line} imports {target}.{name}")
    return found


class NoPrivateImportsContract(Contract):
    """No module in ``containers`` imports a private (``_name``) name from another module."""

    type_name = "no_private_imports"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        found = find_private_imports(graph.modules, tuple(self.containers))  # type: ignore[arg-type]
        return ContractCheck(kept=not found, warnings=[], metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["found"]:
            output.print_error(f"- {line}")

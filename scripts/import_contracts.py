"""An import-linter contract type of this project: no module imports another module's private name.

``from cxr.core.contract import _helper`` (or ``module._helper``) ties a module to another's internals; a name
two modules share is public. Imports inside one module's own package ``__init__`` are not special-cased.
"""

from __future__ import annotations

import re

import grimp
from importlinter import Contract, ContractCheck, fields, output

_PRIVATE_FROM = re.compile(r"^\s*from\s+\S+\s+import\s+\(?(?P<names>[^#)]*)")


def private_names(line: str) -> list[str]:
    """The private names an import line takes (``from m import _a, b as _b`` -> ``['_a']``)."""
    m = _PRIVATE_FROM.match(line)
    if not m:
        return []
    names = [n.strip().split(" as ")[0].strip() for n in m.group("names").split(",")]
    return [n for n in names if n.startswith("_") and not n.startswith("__")]


class NoPrivateImportsContract(Contract):
    """No module in ``containers`` imports a private (``_name``) name from another module."""

    type_name = "no_private_imports"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        found = []
        roots = tuple(self.containers)  # type: ignore[arg-type]
        for importer in sorted(graph.modules):
            if not importer.startswith(roots):
                continue
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if imported == importer:
                    continue
                for d in graph.get_import_details(importer=importer, imported=imported):
                    for name in private_names(d["line_contents"]):
                        found.append(f"{importer}:{d['line_number']} imports {imported}.{name}")
        return ContractCheck(kept=not found, warnings=[], metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["found"]:
            output.print_error(f"- {line}")

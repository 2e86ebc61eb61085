#!/usr/bin/env python3
"""Check the import structure: the import-linter contracts of pyproject.toml, then no import cycle anywhere.

The package is one tree, ``src/cxr/``, laid out in the checkout as it is installed. This script:

1. runs ``lint-imports`` on it (the layers and no-private-imports contracts of ``[tool.importlinter]``);
2. builds grimp's import graph and prints every import cycle, between folders and between modules.

Exit 0 when both are clean, 1 otherwise.   Usage: python scripts/check_imports.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (each holds at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def one_cycle(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through ``start`` inside one component (breadth-first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ()) & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def cycles(src: Path, package: str = "cxr") -> list[str]:
    """Every import cycle of ``package`` (found in ``src``), as printable lines: between its folders
    (``<package>.<folder>``), then between modules."""
    sys.path.insert(0, str(src))
    import grimp

    graph = grimp.build_graph(package, include_external_packages=False)
    modules = {m for m in graph.modules if m != package}
    module_edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d != package} for m in modules}

    def folder(m: str) -> str:
        return ".".join(m.split(".")[:2])

    folder_edges: dict[str, set[str]] = {}
    for m, ds in module_edges.items():
        folder_edges.setdefault(folder(m), set()).update(folder(d) for d in ds if folder(d) != folder(m))
    lines = []
    for kind, nodes, edges in (("folders", set(folder_edges), folder_edges), ("modules", modules, module_edges)):
        for comp in strongly_connected(nodes, edges):
            lines.append(f"cycle between {kind}: " + " -> ".join(one_cycle(comp[0], set(comp), edges))
                         + (f"   (component: {', '.join(comp)})" if len(comp) > 2 else ""))
    return lines


def main() -> int:
    src = ROOT / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(src), str(ROOT)))}  # ROOT: scripts.import_contracts
    lint = Path(sys.executable).parent / "lint-imports"
    rc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env).returncode
    found = cycles(src)
    for line in found:
        print(line)
    print(f"import cycles: {len(found)}")
    return 1 if rc or found else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Mutation check of the core with mutmut: the contract and its decision rules, the journal and the results codec.

mutmut copies the code into ``mutants/`` and imports it from there; this project's folders install as
``cxr.<folder>`` through an editable finder that would shadow that copy. So the package is laid out as it is
installed (``core/...``, the ``scripts/check_imports.py`` staging) in ``out/mutation/``, with the tests, the
examples and the shipped model beside it, and mutmut runs there. Results: ``docs/tests/mutation.md`` (score and
every surviving mutant's diff) and ``docs/tests/mutation.json``.

    python scripts/mutation.py [--max-children N] [--report-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "out" / "mutation"
#: What is mutated (installed paths), and the fast tests that guard it.
TARGETS = ("src/cxr/core/contract.py", "src/cxr/core/durable.py", "src/cxr/client/results.py", "src/cxr/client/batch.py")
TESTS = ("tests/test_contract.py", "tests/test_not_assessable.py", "tests/test_results.py", "tests/test_csv_columns.py",
         "tests/test_robustness.py", "tests/test_audit_monitor.py", "tests/test_client.py", "tests/test_predict_inprocess.py",
         "tests/test_audit_trail.py")


def _stage() -> None:
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shutil.rmtree(STAGE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    mod.stage(STAGE)
    shutil.copytree(ROOT / "core" / "data", STAGE / "cxr" / "core" / "data")
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    for d in ("examples", "model_repository"):
        # beside the tests (their REPO) and inside the package (the product's REPO_ROOT is core/'s parent's parent,
        # which in the installed layout is cxr/)
        for where in (STAGE, STAGE / "cxr"):
            shutil.copytree(ROOT / d, where / d, ignore=shutil.ignore_patterns("__pycache__"))
    tests = ", ".join(f'"{t}"' for t in TESTS)
    targets = ", ".join(f'"{t}"' for t in TARGETS)
    (STAGE / "pyproject.toml").write_text(f'''[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["slow: trains, exports or starts servers (minutes); run in CI"]
filterwarnings = ["ignore::DeprecationWarning"]

[tool.mutmut]
source_paths = ["cxr"]
only_mutate = [{targets}]
also_copy = ["examples", "model_repository"]
pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = [{tests}]
''')


def _pretty(name: str) -> str:
    """mutmut's trampoline name of a function as its dotted name (``cxr.m.xǁCǁf`` -> ``cxr.m.C.f``, ``x_f`` -> ``f``)."""
    name = name.replace("xǁ", "").replace("ǁ", ".")
    head, _, last = name.rpartition(".")
    return f"{head}.{last[2:] if last.startswith('x_') else last}"


def _mutmut(*args: str, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mutmut"
    return subprocess.run([str(exe), *args], cwd=STAGE, env=env, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the last run's results")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if a.report_only:  # the run took from the staging (its pyproject) to mutmut's stats, written at its end
        seconds = ((STAGE / "mutants" / "mutmut-cicd-stats.json").stat().st_mtime
                   - (STAGE / "pyproject.toml").stat().st_mtime)
    else:
        _stage()
        t0 = time.monotonic()
        run = _mutmut("run", "--max-children", str(a.max_children), env=env)
        seconds = time.monotonic() - t0
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        _mutmut("export-cicd-stats", env=env)
    stats = json.loads((STAGE / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = _mutmut("results", "--all", "true", env=env).stdout
    survivors = [line.split(":")[0].strip() for line in listing.splitlines() if line.strip().endswith(": survived")]
    uncovered: dict[str, int] = {}
    for line in listing.splitlines():
        if line.strip().endswith(": no tests"):
            fn = _pretty(line.split(":")[0].strip().rsplit("__mutmut_", 1)[0])
            uncovered[fn] = uncovered.get(fn, 0) + 1
    by_function: dict[str, list[str]] = {}
    for name in survivors:
        by_function.setdefault(name.rsplit("__mutmut_", 1)[0], []).append(name)
    shown = [names[0] for names in by_function.values()]  # one diff per function: the rest are listed by name
    diffs = {name: _mutmut("show", name, env=env).stdout.strip() for name in shown}
    judged = stats["killed"] + stats["survived"]
    score = stats["killed"] / judged if judged else 0.0
    overall = stats["killed"] / stats["total"] if stats["total"] else 0.0
    report = {"targets": list(TARGETS), "tests": list(TESTS), "seconds": round(seconds), **stats,
              "score": round(score, 4), "score_of_all": round(overall, 4), "survivors": survivors,
              "uncovered_functions": uncovered}
    out = ROOT / "docs" / "tests"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Mutation check of the core",
        "",
        "Made by `python scripts/mutation.py` (mutmut " + _mutmut("--version", env=env).stdout.strip().split()[-1]
        + f", {round(seconds)} s on this machine's 2 cores).",
        "",
        "Mutated: " + ", ".join(f"`{t.removeprefix('cxr/')}`" for t in TARGETS) + " (the contract and its decision "
        "rules, durable writes and the append-only journal, the results codec, `cxr predict`'s batch logic).",
        "Tests run against each mutant: " + ", ".join(f"`{t}`" for t in TESTS) + " (their fast part).",
        "",
        f"**Score: {stats['killed']} of the {judged} mutants that a test runs killed ({score:.1%}); "
        f"{stats['killed']} of all {stats['total']} ({overall:.1%}).** {stats['survived']} survived; "
        f"{stats.get('no_tests', 0)} are in code that no fast test runs in-process (below; slow tests and tests "
        f"that run the CLI in a subprocess reach some of it, which mutmut cannot see); {stats.get('timeout', 0)} timed out; "
        f"{stats.get('suspicious', 0)} were suspicious; {stats.get('skipped', 0)} skipped.",
        "",
        "## Functions no fast in-process test runs",
        "",
        "| function | mutants |",
        "|---|---|",
        *[f"| `{fn}` | {n} |" for fn, n in sorted(uncovered.items(), key=lambda kv: -kv[1])],
        "",
        "## Surviving mutants",
        "",
        "By function (the first of each shown as a diff below; `mutmut show NAME` in `out/mutation/` shows any):",
        "",
        "| function | survived |",
        "|---|---|",
        *[f"| `{_pretty(fn)}` | {len(n)} |" for fn, n in
          sorted(by_function.items(), key=lambda kv: -len(kv[1]))],
        "",
    ]
    for name in shown:
        lines += [f"### `{name}`", "", "```diff", diffs[name], "```", ""]
    (out / "mutation.md").write_text("\n".join(lines) + "\n")
    print(f"mutation score {score:.1%}: {stats['killed']} killed, {stats['survived']} survived "
          f"(docs/tests/mutation.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

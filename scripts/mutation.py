#!/usr/bin/env python3
"""Mutation check of the safety modules with mutmut: the audit chain, the refusal rules, the threshold choice,
the go/no-go, the CSV codec, the contract and the durable writes.

mutmut copies the code into ``mutants/`` and imports it from there. The checkout's ``src/cxr`` is staged as
``out/mutation/src/cxr`` (one tree, no links) with the tests, ``examples/``, ``model_repository/`` and a
``pyproject.toml`` that configures mutmut beside it; mutmut copies those into ``out/mutation/mutants/`` and puts
``mutants/src`` first on the path, so the tests import the mutated copy (the editable install's ``/.../src`` comes
later), and :mod:`cxr.core.paths` finds ``mutants/`` as the checkout (``src/cxr`` beside a ``pyproject.toml``), so the
product reads the staged ``model_repository/``. In modules of which only some functions are decisions
(:data:`FUNCTIONS`), the others are marked ``# pragma: no mutate block`` in the staged copy only.

Results: ``docs/tests/mutation.md`` (score per module, every survivor with its reason from
``docs/tests/mutation_reasons.json``) and ``docs/tests/mutation.json``.

    python scripts/mutation.py [--max-children N] [--survivors | --report-only]

``--survivors`` reruns, after tests were added, only the mutants the last run left alive (mutmut keeps every other
result); the staged tests are refreshed first, the staged code is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import libcst as cst

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "out" / "mutation"
REASONS = ROOT / "docs" / "tests" / "mutation_reasons.json"
#: What is mutated, by group: the safety modules.
GROUPS = {
    "audit chain": ("src/cxr/core/audit_trail.py",),
    "refusal rules": ("src/cxr/core/eligibility.py", "src/cxr/core/pixels.py"),
    "threshold choice": ("src/cxr/train/evaluate.py",),
    "go/no-go": ("src/cxr/site/site_audit.py",),
    "CSV codec": ("src/cxr/client/results.py",),
    "contract": ("src/cxr/core/contract.py",),
    "durable writes": ("src/cxr/core/durable.py",),
}
TARGETS = tuple(t for ts in GROUPS.values() for t in ts)
#: Modules of which only these top-level functions and classes are mutated (the decisions, not the reading of
#: data, the model or the rendering of reports).
FUNCTIONS = {
    "src/cxr/train/evaluate.py": ("sensitivity_lower_bound", "choose_threshold", "operating_point"),
    "src/cxr/site/site_audit.py": ("Targets", "Screened", "clopper_pearson", "lower_bound", "upper_bound", "Needs",
                               "_smallest_n", "films_needed", "check_sample", "_rate", "audit"),
}
#: The fast tests that guard them (mutmut runs, for each mutant, those of them that reach its function).
TESTS = ("tests/test_audit_trail.py", "tests/test_not_assessable.py", "tests/test_dicom.py", "tests/test_robustness.py",
         "tests/test_contract.py", "tests/test_operating_point.py", "tests/test_metrics.py",
         "tests/test_audit_monitor.py", "tests/test_site_tools.py", "tests/test_site_sample.py",
         "tests/test_results.py", "tests/test_csv_columns.py", "tests/test_durable.py", "tests/test_eligibility.py",
         "tests/test_pixels.py", "tests/test_site_audit.py")


class _OnlyThese(cst.CSTTransformer):
    """Mark every top-level function and class not in ``keep`` ``# pragma: no mutate block``."""

    def __init__(self, keep: tuple[str, ...]) -> None:
        self.keep, self.depth = set(keep), 0

    def _mark(self, node):  # type: ignore[no-untyped-def]
        if node.name.value in self.keep or not isinstance(node.body, cst.IndentedBlock):
            return node
        header = node.body.header.with_changes(whitespace=cst.SimpleWhitespace("  "),
                                               comment=cst.Comment("# pragma: no mutate block"))
        return node.with_changes(body=node.body.with_changes(header=header))

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.depth += 1
        return False

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):  # type: ignore[no-untyped-def]
        self.depth -= 1
        return self._mark(updated) if self.depth == 0 else updated

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.depth += 1
        return False

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):  # type: ignore[no-untyped-def]
        self.depth -= 1
        return self._mark(updated) if self.depth == 0 else updated


def _stage() -> None:
    shutil.rmtree(STAGE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc")
    shutil.copytree(ROOT / "src" / "cxr", STAGE / "src" / "cxr", ignore=skip)
    for rel, keep in FUNCTIONS.items():
        module = cst.parse_module((ROOT / rel).read_text())
        missing = set(keep) - {getattr(getattr(s, "name", None), "value", None) for s in module.body}
        if missing:
            raise SystemExit(f"{rel}: no top-level {', '.join(sorted(missing))} (update FUNCTIONS)")
        (STAGE / rel).write_text(module.visit(_OnlyThese(keep)).code)
    for d in ("tests", "examples", "model_repository"):
        shutil.copytree(ROOT / d, STAGE / d, ignore=skip)
    tests = ", ".join(f'"{t}"' for t in TESTS)
    targets = ", ".join(f'"{t}"' for t in TARGETS)
    (STAGE / "pyproject.toml").write_text(f'''[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["slow: trains, exports or starts servers (minutes); run in CI"]
filterwarnings = ["ignore::DeprecationWarning"]

[tool.mutmut]
source_paths = ["src"]
only_mutate = [{targets}]
also_copy = ["examples", "model_repository"]
pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = [{tests}]
''')


def _module_of(name: str) -> str:
    """The source file of a mutant (``cxr.core.pixels.x_resize__mutmut_3`` -> ``src/cxr/core/pixels.py``)."""
    dotted = name.split("__mutmut_")[0]
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        rel = "src/" + "/".join(parts[:i]) + ".py"
        if rel in TARGETS:
            return rel
    raise ValueError(f"mutant {name} is in no target module")


def _mutmut(*args: str, env: dict) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mutmut"
    return subprocess.run([str(exe), *args], cwd=STAGE, env=env, capture_output=True, text=True)


def _score(counts: dict[str, int]) -> float:
    """Killed share of the mutants that are not equivalent (a mutant no test reaches counts as not killed)."""
    judged = counts["total"] - counts["equivalent"]
    return counts["killed"] / judged if judged else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="rewrite the report from the last run's results")
    mode.add_argument("--survivors", action="store_true",
                      help="rerun only the mutants the last run did not kill, against the current tests")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    rerun_seconds = None
    if a.report_only:  # the timings are the last report's
        previous = json.loads((ROOT / "docs" / "tests" / "mutation.json").read_text())
        seconds, rerun_seconds = previous["seconds"], previous.get("survivors_rerun_seconds")
    elif a.survivors:
        previous = json.loads((ROOT / "docs" / "tests" / "mutation.json").read_text())
        names = [n for m in previous["modules"].values() for n, v in m["not_killed"].items() if v["status"] != "timeout"]
        shutil.rmtree(STAGE / "tests")
        shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        t0 = time.monotonic()
        run = _mutmut("run", "--max-children", str(a.max_children), *names, env=env)
        seconds, rerun_seconds = previous["seconds"], time.monotonic() - t0
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        _mutmut("export-cicd-stats", env=env)
    else:
        _stage()
        t0 = time.monotonic()
        run = _mutmut("run", "--max-children", str(a.max_children), env=env)
        seconds = time.monotonic() - t0
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        _mutmut("export-cicd-stats", env=env)
    listing = _mutmut("results", "--all", "true", env=env).stdout
    status: dict[str, str] = {}
    for line in listing.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            status[name] = state
    reasons: dict[str, str] = json.loads(REASONS.read_text()) if REASONS.exists() else {}
    modules: dict[str, dict] = {t: {"total": 0, "killed": 0, "equivalent": 0, "not_killed": {}} for t in TARGETS}
    for name, state in sorted(status.items()):
        m = modules[_module_of(name)]
        m["total"] += 1
        if state in ("killed", "timeout"):  # a mutant that hangs the tests is caught too
            m["killed"] += 1
            continue
        reason = reasons.get(name, "")
        m["equivalent"] += reason.startswith("equivalent")
        m["not_killed"][name] = {"status": state, "reason": reason}
    groups = {}
    for group, targets in GROUPS.items():
        counts = {k: sum(modules[t][k] for t in targets) for k in ("total", "killed", "equivalent")}
        groups[group] = {"modules": list(targets), **counts, "score": round(_score(counts), 4)}
    for m in modules.values():
        m["score"] = round(_score(m), 4)
    unexplained = [n for m in modules.values() for n, v in m["not_killed"].items() if not v["reason"]]
    counts = {k: sum(m[k] for m in modules.values()) for k in ("total", "killed", "equivalent")}
    version = _mutmut("--version", env=env).stdout.strip().split()[-1]
    report = {"mutmut": version, "seconds": round(seconds),
              "survivors_rerun_seconds": None if rerun_seconds is None else round(rerun_seconds), "tests": list(TESTS), "functions": FUNCTIONS,
              **counts, "score": round(_score(counts), 4), "groups": groups, "modules": modules,
              "unexplained": unexplained}
    out = ROOT / "docs" / "tests"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    lines = [
        "# Mutation check of the safety modules",
        "",
        f"Made by `python scripts/mutation.py --max-children {a.max_children}` (mutmut {version}, "
        f"{round(seconds)} s on this machine's 2 shared cores"
        + ("" if rerun_seconds is None else f"; then `--survivors` after tests were added, {round(rerun_seconds)} s")
        + "). Each mutant runs against those of the fast tests below that reach "
        "its function.",
        "",
        "Tests: " + ", ".join(f"`{t}`" for t in TESTS) + " (their fast part).",
        "",
        "Score = killed / (mutants - equivalent ones), a mutant that makes the tests time out counting as killed: a mutant that survives for a stated reason other than "
        "equivalence, or that no fast test reaches, counts as not killed. Every mutant not killed is listed below "
        "with its reason (`docs/tests/mutation_reasons.json`; `mutmut show NAME` in `out/mutation/` shows its diff).",
        "",
        f"**All: {counts['killed']} of {counts['total']} killed, {counts['equivalent']} equivalent: "
        f"score {_score(counts):.1%}** ({counts['killed'] / counts['total']:.1%} of all, counting the equivalent ones "
        "as not killed).",
        "",
        "| group | module | mutants | killed | equivalent | not killed, other | score |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, targets in GROUPS.items():
        for t in targets:
            m = modules[t]
            only = f" ({', '.join(FUNCTIONS[t])} only)" if t in FUNCTIONS else ""
            lines.append(f"| {group} | `{t}`{only} | {m['total']} | {m['killed']} | {m['equivalent']} | "
                         f"{len(m['not_killed']) - m['equivalent']} | {m['score']:.1%} |")
        if len(targets) > 1:
            g = groups[group]
            lines.append(f"| {group} | all | {g['total']} | {g['killed']} | {g['equivalent']} | "
                         f"{g['total'] - g['killed'] - g['equivalent']} | {g['score']:.1%} |")
    lines += ["", "## Mutants not killed", ""]
    for t in TARGETS:
        if not modules[t]["not_killed"]:
            continue
        lines += [f"### `{t}`", "", "| mutant | status | reason |", "|---|---|---|"]
        for name, v in modules[t]["not_killed"].items():
            lines.append(f"| `{name}` | {v['status']} | {v['reason'] or '**no reason given**'} |")
        lines.append("")
    (out / "mutation.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"mutation score {_score(counts):.1%}: {counts['killed']} killed of {counts['total']}, "
          f"{counts['equivalent']} equivalent, {len(unexplained)} without a reason (docs/tests/mutation.md)")
    for group, g in groups.items():
        print(f"  {group}: {g['score']:.1%} ({g['killed']}/{g['total'] - g['equivalent']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

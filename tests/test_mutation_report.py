"""The committed mutation report (``python scripts/mutation.py`` writes it; this test does not rerun mutmut): every
safety module's mutants are at least 85% killed, and every mutant not killed has its reason."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

REPORT = REPO / "docs" / "tests" / "mutation.json"
SAFETY = ("audit chain", "refusal rules", "threshold choice", "go/no-go", "CSV codec", "contract", "durable writes")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(REPORT.read_text())


def test_every_safety_group_was_mutated_and_is_at_least_85_percent_killed(report: dict) -> None:
    assert set(SAFETY) <= set(report["groups"])
    low = {g: report["groups"][g]["score"] for g in SAFETY if report["groups"][g]["score"] < 0.85}
    assert not low, f"mutation score below 0.85: {low}"
    for g in SAFETY:
        assert report["groups"][g]["total"] > 0, g
    for module, m in report["modules"].items():
        assert m["score"] >= 0.85, module
        assert not module.startswith("/") and ".." not in module  # paths in the report are relative


def test_every_mutant_not_killed_has_its_reason(report: dict) -> None:
    assert report["unexplained"] == []
    for m in report["modules"].values():
        assert all(v["reason"].strip() for v in m["not_killed"].values())
        # the counts add up: killed + not killed = all
        assert m["killed"] + len(m["not_killed"]) == m["total"]


def test_the_report_names_the_code_as_it_is(report: dict) -> None:
    """A module moved or renamed, or a mutated function gone, makes the report stale: rerun scripts/mutation.py.
    (Every module and function the report scores exists where it says; every not-killed mutant's function too.)"""
    import ast

    root = REPORT.parent.parent.parent
    for group in report["groups"].values():
        for module in group["modules"]:
            assert (root / module).is_file(), f"{module}: not in the tree (rerun python scripts/mutation.py)"
    for module, functions in report["functions"].items():
        tree = ast.parse((root / module).read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert set(functions) <= defined, f"{module}: {sorted(set(functions) - defined)} gone (rerun the check)"
    dotted = {m.removeprefix("src/").removesuffix(".py").replace("/", "."): m for m in report["modules"]}
    for m in report["modules"].values():
        for name in m["not_killed"]:
            assert name.rsplit(".", 1)[0] in dotted, name

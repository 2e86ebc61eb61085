"""Committed reports carry no machine's absolute paths, and what the docs quote is what the reports hold."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO

REPORTS = sorted(
    p for pattern in ("docs/**/*.json", "docs/**/*.md", "bench/*.json", "bench/*.md", "model_repository/*/*.json",
                      "model_repository/*/*.md")
    for p in REPO.glob(pattern)
)


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_in_committed_reports_are_relative(path) -> None:  # type: ignore[no-untyped-def]
    text = path.read_text()
    assert str(REPO) not in text
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp)/", text), "absolute path in a committed report"


def test_readme_quotes_the_shipped_operating_point() -> None:
    card = json.loads((REPO / "model_repository" / "pneumonia" / "model_card.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert f"{card['calibration']['threshold']:.4f}" in readme
    assert f"{card['ood']['threshold']:.2f}" in readme
    ood = json.loads((REPO / "docs" / "model" / "ood.json").read_text())
    assert ood["model_sha256"] == card["sha256"], "docs/model/ood.md is of another model: rerun `cxr ood-eval`"
    assert f"{ood['refused_rate_all']:.1%}" in readme

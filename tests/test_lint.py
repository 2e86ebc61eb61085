"""ruff and mypy, as configured in pyproject.toml, are part of the suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

#: Static checks, marked apart from the unit tests (`pytest -m "not lint"` leaves them out; CI runs them once).
pytestmark = pytest.mark.lint


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_mypy() -> None:
    # the one package tree, src/cxr (installed in editable mode), with typed imports
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]

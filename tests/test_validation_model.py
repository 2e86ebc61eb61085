"""The onboarding's model in service, ``validation/model_repository/pneumonia_without_siim`` (issue 33): built by the
shipped recipe on the adult lock less SIIM, so that a SIIM sample meets it as a new hospital meets the product. It
is evidence, not a product: it never enters the wheel (``tests/test_package.py`` reads the wheel's file list)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from cxr.core.model_dir import ModelDir, model_dirs, read_provenance
from cxr.train import data as data_mod
from tests.conftest import REPO

VALIDATION = REPO / "validation" / "model_repository"
FOLDER = VALIDATION / "pneumonia_without_siim"
LOCK = REPO / "docs" / "model" / "adult_lock" / "split.json"


def _where(path: str | Path) -> Path:
    return (REPO / path).resolve()


def test_it_never_saw_siim_and_lists_every_other_film_of_the_lock_in_its_role() -> None:
    card = json.loads((FOLDER / "model_card.json").read_text())
    assert card["training"]["config"]["leave_out"] == ["siim"]
    rows = read_provenance(FOLDER / card["provenance"]["file"])
    assert not [r for r in rows if r["source"] == "siim" or "chest_xray_adult_siim" in r["path"]]
    lock = data_mod.Split.load(LOCK)
    assert "siim" in lock.sources()  # the lock has SIIM; the model's provenance has none of it
    for role, side in (("train", "train"), ("select", "select"), ("test", "test")):
        listed = Counter(_where(r["path"]) for r in rows if r["role"] == role)
        expected = {s.path.resolve() for s in lock.samples(side) if s.source != "siim"}
        assert set(listed) == expected and set(listed.values()) == {1}, role
    # nothing of SIIM chose its points or is claimed on
    assert card["operating_points"]["adult"]["chosen_on"]["sources"] == ["nih"]
    claims = json.loads((FOLDER / "claims.json").read_text())
    assert claims["claims"] and not [c for c in claims["claims"] if c["source"] == "siim"]


def test_it_reads_as_a_model_folder_and_its_graph_is_the_card_s() -> None:
    assert [d.name for d in model_dirs(VALIDATION)] == ["pneumonia_without_siim"]
    folder = ModelDir(FOLDER)
    assert folder.verify() == FOLDER / folder.card().file
    assert folder.reference() is not None

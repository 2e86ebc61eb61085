"""The shipped model's provenance: every file that trained, chose or tested it is listed once with its role,
source, patient and sha256; a test film has no other role; the new hospital's onboarding sample is in no role."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cxr.core.model_dir import read_provenance
from cxr.train import data as data_mod
from tests.conftest import REPO, SHIPPED_MODELS, SHIPPED_REPOSITORY

MODELS = SHIPPED_MODELS


def _where(path: str | Path) -> Path:  # the file itself, however the data folder is reached (copy or link)
    return (REPO / path).resolve()


@pytest.mark.parametrize("model", MODELS)
def test_every_file_of_the_locked_split_is_listed_once_in_its_role(model: str) -> None:
    card = json.loads((SHIPPED_REPOSITORY / model / "model_card.json").read_text())
    rows = read_provenance(SHIPPED_REPOSITORY / model / card["provenance"]["file"])
    split = data_mod.Split.load(REPO / card["ood"]["fitted_on"]["split"])
    assert split.locked
    for role, side in (("train", "train"), ("select", "select"), ("test", "test")):
        listed = Counter(_where(r["path"]) for r in rows if r["role"] == role)
        expected = {s.path.resolve() for s in split.samples(side)}
        missing, extra = expected - set(listed), set(listed) - expected
        assert not missing and not extra, (role, len(missing), sorted(missing)[:3], len(extra), sorted(extra)[:3])
        assert set(listed.values()) == {1}, role
    by_path = {(r["role"], _where(r["path"])): r for r in rows}
    for s in split.samples("test"):
        r = by_path[("test", s.path.resolve())]
        assert (r["source"], r["label"]) == (s.source, ("Normal", "Pneumonia")[s.label])
        assert r["patient"].startswith(f"{s.source}:")
    assert all(len(r["sha256"]) == 64 for r in rows)
    assert card["provenance"]["summary"] == json.loads(json.dumps(data_mod.provenance_summary(rows)))


@pytest.mark.parametrize("model", MODELS)
def test_a_test_film_or_patient_has_no_other_role(model: str) -> None:
    rows = read_provenance(SHIPPED_REPOSITORY / model / "provenance.csv")
    test_files = {r["sha256"] for r in rows if r["role"] == "test"}
    test_patients = {r["patient"] for r in rows if r["role"] == "test"}
    assert test_files and test_patients
    others = [r for r in rows if r["role"] != "test"]
    assert not test_files & {r["sha256"] for r in others}, "a test film also trained, chose or calibrated"
    assert not test_patients & {r["patient"] for r in others}, "a test patient also trained, chose or calibrated"
    train = {r["patient"] for r in rows if r["role"] == "train"}
    assert not train & {r["patient"] for r in rows if r["role"] == "select"}


def test_claims_are_of_the_shipped_file_and_on_test_patients_only() -> None:
    from cxr.core.claims import Claims

    for model in MODELS:
        card = json.loads((SHIPPED_REPOSITORY / model / "model_card.json").read_text())
        claims = Claims.load(SHIPPED_REPOSITORY / model / "claims.json")
        assert claims.model_sha256 == card["sha256"]
        assert not any(c.in_sample for c in claims.claims)
        rows = read_provenance(SHIPPED_REPOSITORY / model / "provenance.csv")
        tested = Counter(r["source"] for r in rows if r["role"] == "test")
        for c in claims.claims:
            assert c.films == tested[c.source], (c.source, c.films, tested[c.source])

"""The shipped model's provenance: every file that trained or validated it is listed once, with its source,
patient and sha256, and the card's summary is the file's."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from cxr.core.model_dir import read_provenance
from cxr.train import data as data_mod
from tests.conftest import REPO, SHIPPED_REPOSITORY


def test_every_training_and_validation_file_is_listed_once() -> None:
    card = json.loads((SHIPPED_REPOSITORY / "pneumonia" / "model_card.json").read_text())
    rows = read_provenance(SHIPPED_REPOSITORY / "pneumonia" / card["provenance"]["file"])
    split = data_mod.Split.load(REPO / card["ood"]["fitted_on"]["split"])
    def where(path: str | Path) -> Path:  # the file itself, however the data folder is reached (copy or link)
        return (REPO / path).resolve()

    for role, side in (("train", "train"), ("validation", "val")):
        listed = Counter(where(r["path"]) for r in rows if r["role"] == role)
        expected = {s.path.resolve() for s in split.samples(side)}
        missing, extra = expected - set(listed), set(listed) - expected
        assert not missing and not extra, (role, len(missing), sorted(missing)[:3], len(extra), sorted(extra)[:3])
        assert set(listed.values()) == {1}, role
    by_path = {(r["role"], where(r["path"])): r for r in rows}
    for s in split.samples("val"):
        r = by_path[("validation", s.path.resolve())]
        assert (r["source"], r["label"]) == (s.source, ("Normal", "Pneumonia")[s.label])
        assert r["patient"].startswith(f"{s.source}:")
    assert all(len(r["sha256"]) == 64 for r in rows)
    assert {r["source"] for r in rows if r["role"] == "train"} == {"kaggle", "nih", "covid"}
    assert card["provenance"]["summary"] == json.loads(json.dumps(data_mod.provenance_summary(rows)))
    # no patient on both sides of the split, within any source
    train_p = {r["patient"] for r in rows if r["role"] == "train"}
    assert not train_p & {r["patient"] for r in rows if r["role"] == "validation"}


def test_calibration_files_are_listed_with_their_hashes() -> None:
    rows = read_provenance(SHIPPED_REPOSITORY / "pneumonia" / "provenance.csv")
    calib = [r for r in rows if r["role"] == "calibration"]
    assert calib and len({r["path"] for r in calib}) == len(calib)

"""Several training sources: patients from manifests, per-source patient splits, sampling masses, provenance."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cxr.core.errors import DataError
from cxr.core.model_dir import read_provenance, write_provenance
from cxr.train import data as data_mod
from tests.conftest import make_dataset, synthetic_xray


def _adult_source(root: Path, *, normals: int, pneumonias: int, films_per_patient: int = 2) -> Path:
    """A source laid out like chest_xray_adult_site: PNG films, MANIFEST.csv with a patient column."""
    rows = []
    for label, cls, n in ((0, "NORMAL", normals), (1, "PNEUMONIA", pneumonias)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            name = f"{label}{i:05d}.png"
            synthetic_xray(7000 + label * 1000 + i, pneumonia=bool(label)).save(root / cls / name)
            rows.append({"label": cls, "file_name": name, "patient": f"P{label}{i // films_per_patient:04d}"})
    data_mod.write_manifest(root, rows)
    return root


def test_patients_come_from_the_manifest_and_are_namespaced(tmp_path: Path) -> None:
    root = _adult_source(tmp_path / "nih", normals=6, pneumonias=4)
    samples = data_mod.source_samples(data_mod.Source("nih", root))
    assert {s.source for s in samples} == {"nih"}
    assert Counter(s.patient for s in samples) == Counter({f"nih:P0{i:04d}": 2 for i in range(3)}
                                                          | {f"nih:P1{i:04d}": 2 for i in range(2)})


def test_notes_patient_field_is_read(tmp_path: Path) -> None:
    (tmp_path / "PNEUMONIA").mkdir()
    synthetic_xray(1, pneumonia=True).save(tmp_path / "PNEUMONIA" / "a.png")
    (tmp_path / "MANIFEST.csv").write_text('label,file_name,notes\nPNEUMONIA,a.png,"exam 3 d; patient=ab12cd; modality=DX"\n')
    assert data_mod.manifest_patients(tmp_path) == {"a.png": "ab12cd"}


def test_source_split_keeps_patients_whole_and_each_source_stratified(tmp_path: Path) -> None:
    kaggle = data_mod.Source("kaggle", make_dataset(tmp_path / "k", n_per_class=20) / "train")
    nih = data_mod.Source("nih", _adult_source(tmp_path / "nih", normals=20, pneumonias=10))
    per = [(s, data_mod.source_samples(s)) for s in (kaggle, nih)]
    split = data_mod.make_source_split(per, val_fraction=0.15, val_fractions={"nih": 0.3}, seed=1)
    tr, va = split.samples("train"), split.samples("val")
    assert len(tr) + len(va) == sum(len(s) for _, s in per)
    assert not {s.patient for s in tr} & {s.patient for s in va}
    for name, frac in (("kaggle", 0.15), ("nih", 0.3)):
        for label in (0, 1):
            n_all = sum(1 for s in tr + va if (s.source, s.label) == (name, label))
            n_val = sum(1 for s in va if (s.source, s.label) == (name, label))
            assert frac * n_all <= n_val <= frac * n_all + 2  # whole patients (2 films each) overshoot by < 2
    # saved and read back, entries resolve to the same files
    split.save(tmp_path / "split.json")
    again = data_mod.Split.load(tmp_path / "split.json")
    assert again == split and [s.path for s in again.samples("val")] == [s.path for s in va]


def test_legacy_split_without_roots_reads_as_kaggle(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "k", n_per_class=8)
    entries = tuple(sorted(str(s.path.relative_to(root / "train")) for s in data_mod.list_samples(root / "train")))
    legacy = data_mod.Split(0, 0.15, entries[2:], entries[:2])  # as written before sources: CLASS/FILE, no roots
    got = legacy.samples("train", root)
    assert {s.source for s in got} == {"kaggle"} and all(s.path.is_file() for s in got)
    with pytest.raises(DataError, match="no source roots"):
        legacy.samples("train")


def test_cell_masses_give_each_class_half_split_among_its_sources() -> None:
    s = [data_mod.Sample(Path(f"{src}{lab}{i}"), lab, f"{src}:{i}", src)
         for src, lab, n in (("kaggle", 0, 10), ("kaggle", 1, 30), ("nih", 0, 20), ("nih", 1, 5), ("covid", 1, 7))
         for i in range(n)]
    m = data_mod.cell_masses(s)
    assert m == {("kaggle", 0): 0.25, ("nih", 0): 0.25, ("kaggle", 1): pytest.approx(1 / 6),
                 ("nih", 1): pytest.approx(1 / 6), ("covid", 1): pytest.approx(1 / 6)}
    assert sum(v for (src, lab), v in m.items() if lab == 1) == pytest.approx(0.5)
    with pytest.raises(DataError, match="Normal"):
        data_mod.cell_masses([x for x in s if x.label == 1])


def test_provenance_lists_every_file_once_per_role_with_its_sha256(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "k", n_per_class=6)
    samples = data_mod.source_samples(data_mod.Source("kaggle", root / "train"))
    path = tmp_path / "provenance.csv"
    write_provenance(path, data_mod.provenance_rows("train", samples[:8]) + data_mod.provenance_rows("validation", samples[8:]))
    write_provenance(path, data_mod.provenance_rows("calibration", samples[:2]), replace_roles=("calibration",))
    write_provenance(path, data_mod.provenance_rows("calibration", samples[:3]), replace_roles=("calibration",))
    rows = read_provenance(path)
    by_role = Counter(r["role"] for r in rows)
    assert by_role == {"train": 8, "validation": 4, "calibration": 3}
    for r in rows:
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == r["sha256"]
    summary = data_mod.provenance_summary(rows)
    assert summary["train"]["kaggle"]["images"] == 8 and summary["calibration"]["kaggle"]["patients"] >= 1
    # rewriting one role keeps the file's order: roles in PROVENANCE_ROLES' order, whatever was written last
    before = path.read_text()
    write_provenance(path, data_mod.provenance_rows("train", samples[:8]), replace_roles=("train",))
    assert path.read_text() == before
    assert [r["role"] for r in read_provenance(path)] == ["train"] * 8 + ["validation"] * 4 + ["calibration"] * 3


def test_source_names_are_checked() -> None:
    with pytest.raises(DataError, match="NAME=PATH"):
        data_mod.Source.parse("nih")
    with pytest.raises(DataError, match="lower-case"):
        data_mod.Source.parse("NIH Site=/x")
    assert data_mod.Source.parse("nih=/data/nih") == data_mod.Source("nih", Path("/data/nih"))


def test_ood_moments_weight_sources() -> None:
    from cxr.export import ood_head

    rng = np.random.default_rng(0)
    big, small = rng.normal(0, 1, (900, 3)), rng.normal(5, 1, (100, 3))
    x = np.concatenate([big, small])
    w = np.r_[np.full(900, 1 / 900), np.full(100, 1 / 100)]
    mean, cov = ood_head.moments(x, w)
    assert mean == pytest.approx((big.mean(0) + small.mean(0)) / 2)
    plain_mean, plain_cov = ood_head.moments(x)
    assert plain_mean == pytest.approx(x.mean(0)) and plain_cov == pytest.approx(np.cov(x, rowvar=False, bias=True))

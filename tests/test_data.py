"""Patient ids and the patient-grouped, stratified, seeded split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cxr.core.errors import DataError
from cxr.train import data as data_mod
from tests.conftest import make_dataset


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0381-0001.jpeg", "NORMAL2-IM-0381"),
        ("odd_name.png", "odd_name"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert data_mod.patient_id(name) == patient


def test_im_and_normal2_series_are_separate_patients() -> None:
    assert data_mod.patient_id("IM-0381-0001.jpeg") != data_mod.patient_id("NORMAL2-IM-0381-0001.jpeg")


def test_split_has_no_patient_in_two_sides(train_data) -> None:  # type: ignore[no-untyped-def]
    src = data_mod.Source("kaggle", data_mod.split_dir(train_data, "train"))
    samples = data_mod.source_samples(src)
    split = data_mod.make_source_split([(src, samples)], val_fraction=0.15, seed=0)
    train_p = {s.patient for s in split.samples("train")}
    val_p = {s.patient for s in split.samples("val")}
    assert train_p and val_p and not (train_p & val_p)
    assert len(split.train) + len(split.val) == len(samples)
    # stratified: each class's validation share is near the fraction
    by_class = Counter(r.split("/")[1] for r in split.val)
    totals = Counter(s.path.parent.name for s in samples)
    for cls, n in totals.items():
        assert 0.10 <= by_class[cls] / n <= 0.30, (cls, by_class[cls], n)


def test_split_is_reproducible_and_seeded(tmp_path, train_data) -> None:  # type: ignore[no-untyped-def]
    src = data_mod.Source("kaggle", data_mod.split_dir(train_data, "train"))
    per = [(src, data_mod.source_samples(src))]
    a = data_mod.make_source_split(per, seed=3)
    a.save(tmp_path / "split.json")
    assert data_mod.Split.load(tmp_path / "split.json") == a
    assert data_mod.make_source_split(per, seed=3) == a
    assert data_mod.make_source_split(per, seed=4).val != a.val


def test_layout_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="Kaggle layout"):
        data_mod.list_samples(tmp_path)
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(DataError, match="no images"):
        data_mod.list_samples(tmp_path)


def test_load_images_caches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = make_dataset(tmp_path / "d", n_per_class=3)
    paths = [s.path for s in data_mod.list_samples(root / "train")]
    a = data_mod.load_images(paths, cache_dir=tmp_path / "cache")
    assert a.shape == (6, 224, 224, 1) and a.dtype.name == "uint8"
    (cached,) = (tmp_path / "cache").glob("*.npy")
    assert (np.load(cached) == a).all()
    marker = np.full_like(a, 7)
    np.save(cached, marker)  # a second load must come from the cache, not from decoding the files again
    assert (data_mod.load_images(paths, cache_dir=tmp_path / "cache") == marker).all()
    paths[0].touch()  # a changed file invalidates the key: decoded again
    assert (data_mod.load_images(paths, cache_dir=tmp_path / "cache") == a).all()

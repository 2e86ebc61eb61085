"""Locked patients and named operating points: the split keeps each patient on one side, the client answers each
input at its population's point, the body-part check is computed by the graph as by its reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr.client.client import PneumoniaClient
from cxr.client.transport import ModelInfo, Scores, Transport
from cxr.core import contract
from cxr.core.errors import CxrError
from cxr.train import data as data_mod
from tests.conftest import REPO, SHIPPED_REPOSITORY, make_dataset


def _sources(tmp_path: Path) -> list:
    make_dataset(tmp_path / "a", n_per_class=20, split=None, seed=1)
    make_dataset(tmp_path / "b", n_per_class=12, split=None, seed=2)
    out = []
    for name, shares in (("a", data_mod.LockShares(0.2, 0.25)), ("site", data_mod.LockShares(0.5, 0.5))):
        src = data_mod.Source(name, tmp_path / ("a" if name == "a" else "b"))
        out.append((src, data_mod.source_samples(src), shares))
    return out


def test_a_locked_split_keeps_every_patient_on_one_side(tmp_path: Path) -> None:
    split = data_mod.make_locked_split(_sources(tmp_path), seed=3)
    path = tmp_path / "split.json"
    split.save(path)
    back = data_mod.Split.load(path)
    assert back == split and back.locked
    sides = {side: back.samples(side) for side in ("train", "select", "test")}
    patients = {side: {s.patient for s in ss} for side, ss in sides.items()}
    assert not patients["train"] & patients["select"]
    assert not patients["train"] & patients["test"]
    assert not patients["select"] & patients["test"]
    assert all(sides[k] for k in sides)
    # the site sample never trains; both its classes are on the test side
    assert not [s for s in sides["train"] if s.source == "site"]
    assert {s.label for s in sides["test"] if s.source == "site"} == {0, 1}
    # the draw is the seed's
    assert data_mod.make_locked_split(_sources(tmp_path), seed=3) == split
    assert data_mod.make_locked_split(_sources(tmp_path), seed=4).test != split.test


def test_a_split_refuses_a_film_on_two_sides() -> None:
    with pytest.raises(ValueError, match="two sides"):
        data_mod.Split(0, 0.2, ("a/NORMAL/x.png",), ("b/NORMAL/y.png",), test=("a/NORMAL/x.png",))


@pytest.mark.parametrize("select,test", [(0.0, 0.0), (-0.1, 0.2), (0.5, 1.0)])
def test_lock_shares_are_validated(select: float, test: float) -> None:
    with pytest.raises(ValueError):
        data_mod.LockShares(select, test)


class _Fixed(Transport):
    """Answers p = 0.3 for every image: Pneumonia at a 0.2 threshold, Normal at 0.4."""

    def __init__(self) -> None:
        self.info = ModelInfo("m", "1", 8, 0.2, contract.LABELS, "", None, "",
                              operating_points=(("adult", 0.4), ("pediatric", 0.2)), default_operating_point="pediatric")

    def infer(self, batch: np.ndarray, *, timeout_s: float, priority: int = 0) -> Scores:
        return Scores(np.full(len(batch), 0.3, np.float32))

    def ready(self) -> bool:
        return True


def test_each_input_is_answered_at_its_population_point(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def dx(name: str, **tags: str) -> Path:
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        for k, v in tags.items():
            setattr(ds, k, v)
        rng = np.random.default_rng(0)
        ds.Rows = ds.Columns = 256
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.clip(rng.normal(120, 40, (256, 256)), 0, 255).astype(np.uint8).tobytes()
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    child = dx("child.dcm", PatientAge="006Y")
    adult = dx("adult.dcm", PatientBirthDate="19600101", StudyDate="20261201")
    unknown = dx("unknown.dcm")
    with PneumoniaClient(transport=_Fixed()) as c:
        got = {Path(p.source).name: (p.operating_point, p.threshold, p.label) for p in c.predict([child, adult, unknown])}
    assert got == {"child.dcm": ("pediatric", 0.2, "Pneumonia"), "adult.dcm": ("adult", 0.4, "Normal"),
                   "unknown.dcm": ("pediatric", 0.2, "Pneumonia")}
    with PneumoniaClient(transport=_Fixed(), operating_point="adult") as c:  # a named point wins over the age
        assert {p.operating_point for p in c.predict([child, adult, unknown])} == {"adult"}


def test_an_unknown_operating_point_fails_before_anything_is_sent() -> None:
    with pytest.raises(CxrError, match="adult, pediatric"):
        PneumoniaClient(transport=_Fixed(), operating_point="neonatal")


@pytest.mark.parametrize("tags,age", [({"PatientAge": "045Y"}, 45.0), ({"PatientAge": "006M"}, 0.5),
                                      ({"PatientAge": "bad"}, None), ({"PatientBirthDate": "20200615",
                                                                       "StudyDate": "20260615"}, 6.0),
                                      ({"PatientBirthDate": "20300101", "StudyDate": "20260101"}, None), ({}, None)])
def test_patient_age_from_the_header(tags: dict, age: float | None) -> None:
    pydicom = pytest.importorskip("pydicom")
    from cxr.core.dicom import patient_age_years

    ds = pydicom.Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    got = patient_age_years(ds)
    assert (got is None) == (age is None)
    if age is not None:
        assert got == pytest.approx(age, abs=0.01)


def test_the_graph_computes_the_body_part_check_as_its_reference() -> None:
    """ood_score = max(distance, T * exp(clip(features @ w + b - z0))), in the graph and in float64."""
    pytest.importorskip("onnx")
    from cxr.core.ort_session import make_session
    from cxr.export import ood_head
    from cxr.export.body_part import BodyPartHead

    base = ood_head.strip(SHIPPED_REPOSITORY / "pneumonia" / "1" / "model.onnx")
    taps = ood_head.find_taps(base)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, *contract.IMAGE_SHAPE), dtype=np.uint8)
    f = ood_head.FeatureExtractor(base, taps)(x)
    p = f.shape[1]
    fit = ood_head.OodFit(taps, f.mean(axis=0), np.eye(p) * 0.5, 0.1, 12)
    w = rng.normal(0, 1, p)
    logits = f @ w
    # a cut in the middle of the logits: some inputs are refused by the body-part part, the rest by distance
    head = BodyPartHead(w, 0.0, float(np.median(logits)), float(np.median(fit.distance(f))))
    fit = ood_head.OodFit(taps, fit.mean, fit.chol, 0.1, 12, body=head)
    model = ood_head.attach(base, fit)
    got = make_session(model.SerializeToString()).run([contract.OOD_OUTPUT_NAME], {contract.INPUT_NAME: x})[0][:, 0]
    ref = fit.score(f)
    assert np.allclose(got, ref, rtol=1e-4)
    assert (head.score(f) > fit.distance(f)).any() and (head.score(f) < fit.distance(f)).any()
    # refused exactly when the distance exceeds T or the logit exceeds z0
    assert np.array_equal(ref > head.scale, (fit.distance(f) > head.scale) | (logits > head.z0))


def test_the_body_part_fit_separates_what_it_was_shown() -> None:
    from cxr.export import body_part

    rng = np.random.default_rng(1)
    chest = rng.normal(0, 1, (300, 6))
    other = rng.normal(0, 1, (200, 6)) + np.array([6, 0, 0, 0, 0, 0])
    head = body_part.fit(chest[:200], np.ones(200), other[:100], {"a": chest[200:250], "b": chest[250:]}, scale=10.0)
    assert np.mean(head.logit(chest[200:]) > head.z0) <= 0.01  # the chest pass rate holds on the select films
    assert np.mean(head.logit(other[100:]) > head.z0) > 0.9  # and held-out other parts are refused


def test_the_source_probe_sees_a_hospital_only_where_there_is_one() -> None:
    from cxr.train.trials import probe_sources

    rng = np.random.default_rng(0)
    n = 120
    same = rng.normal(0, 1, (2 * n, 8))
    apart = np.r_[rng.normal(0, 1, (n, 8)), rng.normal(0, 1, (n, 8)) + np.r_[2.0, np.zeros(7)]]
    sources = ["a"] * n + ["b"] * n
    patients = [f"{s}{i // 3}" for i, s in enumerate(sources)]  # three films a patient, kept in one fold
    assert probe_sources(apart, sources, patients)["a vs b"]["auc"] > 0.85
    assert abs(probe_sources(same, sources, patients)["a vs b"]["auc"] - 0.5) < 0.15


def test_group_folds_keep_a_patient_in_one_fold() -> None:
    from cxr.train.linear import group_folds

    groups = [f"p{i // 4}" for i in range(40)]
    folds = group_folds(groups, 5)
    assert sorted(np.concatenate(folds).tolist()) == list(range(40))
    for f in folds:
        inside = {groups[i] for i in f}
        assert not inside & {groups[i] for g in folds if g is not f for i in g}


def test_a_site_sets_its_default_operating_point(tmp_path: Path) -> None:
    import shutil

    from cxr.cli import main
    from cxr.core.model_dir import ModelDir

    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED_REPOSITORY / "pneumonia", repo / "pneumonia")
    folder = ModelDir(repo / "pneumonia")
    points = folder.card().operating_points
    other = next(n for n in points if n != folder.card().default_operating_point)
    assert main(["configs", "--repository", str(repo), "--name", "pneumonia", "--default-operating-point", other,
                 "--overwrite"]) == 0
    served = folder.served_params()
    assert served.threshold_for(None) == (other, points[other]["threshold"])
    assert main(["configs", "--repository", str(repo), "--name", "pneumonia", "--default-operating-point",
                 "neonatal", "--overwrite"]) != 0


def test_no_example_film_is_a_locked_test_film() -> None:
    """examples/ is read by the tests and shown in the README: a film of a locked test patient there would be a
    test film read again and again. Checked against every committed lock (NIH examples carry an ``nih_`` prefix)."""
    import json

    repo = REPO
    locks = [p for p in (repo / "docs" / "model").rglob("split.json") if json.loads(p.read_text()).get("test")]
    assert locks, "no committed lock found"
    examples = {(p.parent.name, p.name.removeprefix("nih_")) for p in (repo / "examples").glob("*/*")
                if p.parent.name in contract.CLASS_DIRS}
    assert len(examples) >= 8
    for lock in locks:
        test_films = {tuple(e.split("/")[1:]) for e in json.loads(lock.read_text())["test"]}
        assert not examples & test_films, f"{lock.relative_to(repo)}: examples on its test side: {examples & test_films}"


def test_an_operating_point_rule_pools_or_holds_on_each_source() -> None:
    from cxr.export.claims_report import PointRule

    pooled = PointRule.parse("adult=siim+nih:sensitivity:0.9")
    each = PointRule.parse("adult=siim,nih:sensitivity:0.85")
    assert (pooled.sources, pooled.each) == (("siim", "nih"), False)
    assert (each.sources, each.each, each.target) == (("siim", "nih"), True, 0.85)
    with pytest.raises(CxrError, match="expected NAME="):
        PointRule.parse("adult=siim+nih,covid:sensitivity")


def test_a_lock_puts_identical_films_under_one_patient(tmp_path: Path) -> None:
    """SIIM holds one image under two studies: a lock must not put its two copies on two sides."""
    import shutil

    root = make_dataset(tmp_path / "src", n_per_class=40, split=None, seed=3)
    films = sorted((root / "PNEUMONIA").glob("*.jpeg"))
    for i in range(10):  # ten films copied under a new patient each
        shutil.copy(films[i], root / "PNEUMONIA" / f"person{900 + i}_bacteria_{900 + i}.jpeg")
    src = data_mod.Source("s", root)
    for seed in range(5):
        split = data_mod.make_locked_split([(src, data_mod.source_samples(src), data_mod.LockShares(0.25, 0.25))],
                                           seed=seed)
        side_of = {}
        for side in ("train", "select", "test"):
            for digest in data_mod.content_hashes(split.samples(side)):
                assert side_of.setdefault(digest, side) == side, f"seed {seed}: one image on {side_of[digest]} and {side}"
        assert data_mod.without_duplicated_tests(split)[1] == []


def test_duplicated_test_films_are_taken_off_an_old_lock(tmp_path: Path) -> None:
    import shutil

    root = make_dataset(tmp_path / "src", n_per_class=20, split=None, seed=4)
    src = data_mod.Source("s", root)
    split = data_mod.make_locked_split([(src, data_mod.source_samples(src), data_mod.LockShares(0.25, 0.25))])
    test_entry = split.test[0]
    train_entry = split.train[0]
    shutil.copy(root / Path(*Path(train_entry).parts[1:]), root / Path(*Path(test_entry).parts[1:]))  # a leak
    amended, removed = data_mod.without_duplicated_tests(split)
    assert removed == [test_entry] and test_entry not in amended.test and len(amended.test) == len(split.test) - 1

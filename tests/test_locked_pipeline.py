"""The locked pipeline end to end, as `scripts/build_locked_model.sh` runs it, on two generated sources:
lock-split -> train --split -> calibrate on select -> export --split -> operating-points -> claims -> predict at a
point. What each step wrote is read back through the product's own types."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core import contract
from cxr.core.claims import CLAIMS_FILE, Claims
from cxr.core.model_dir import ModelDir
from cxr.train import data as data_mod
from tests.conftest import REPO, cxr, make_dataset

pytestmark = pytest.mark.slow

BLANK = "person999_bacteria_9999.jpeg"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locked")
    # two hospitals: 40 films per class each, two films per patient (make_dataset's names)
    a = make_dataset(root / "site_a", n_per_class=40, split=None, seed=11)
    b = make_dataset(root / "site_b", n_per_class=40, split=None, seed=12)
    split = root / "split.json"
    cxr("lock-split", str(split), "--source", f"a={a}:0.25:0.25", "--source", f"b={b}:0.25:0.25", ok=True, timeout=900)
    # a real archive holds films the pixel rules refuse: one blank film of a patient of its own, on the train side
    Image.new("L", (256, 256), 128).save(a / "PNEUMONIA" / BLANK)
    s = data_mod.Split.load(split)
    data_mod.Split(s.seed, s.val_fraction, tuple(sorted((*s.train, f"a/PNEUMONIA/{BLANK}"))), s.val, s.roots,
                   s.val_fractions, s.test).save(split)
    run = root / "run"
    cache = root / "cache"
    cxr("train", "--split", str(split), "--out", str(run), "--epochs", "2", "--batch-size", "16",
        "--cache-dir", str(cache), ok=True, timeout=900)
    select = root / "select"
    subprocess.run([sys.executable, "scripts/split_side.py", str(split), str(select), "--side", "select",
                    "--source", "a", "--source", "b"], check=True, capture_output=True, timeout=300,
                   cwd=REPO)
    cxr("calibrate", "--model", str(run / "model.keras"), "--data", str(select), "--rule", "youden",
        "--scaling", "none", ok=True, timeout=900)
    repo = root / "repository"
    cxr("export", "--model", str(run / "model.keras"), "--repository", str(repo), "--split", str(split),
        "--no-int8", ok=True, timeout=900)
    cxr("operating-points", "--repository", str(repo), "--name", "pneumonia", "--split", str(split),
        "--point", "strict=a:sensitivity:0.8", "--point", "lenient=b:youden", "--default", "strict", "--overwrite",
        ok=True, timeout=900)
    cxr("claims", "--repository", str(repo), "--name", "pneumonia", "--split", str(split),
        "--population", "a=strict", "--population", "b=lenient", "--overwrite", ok=True, timeout=900)
    return {"split": split, "run": run, "repo": repo, "a": a, "b": b}


def test_the_split_locks_patients_to_one_side(locked: dict[str, Path]) -> None:
    split = data_mod.Split.load(locked["split"])
    assert split.locked and split.test
    sides = {"train": split.train, "select": split.val, "test": split.test}
    patients = {}
    for side, entries in sides.items():
        for e in entries:
            source, _, name = e.split("/")
            patient = (source, data_mod.patient_id(name))
            assert patients.setdefault(patient, side) == side, f"{patient} on {patients[patient]} and {side}"
    assert {e.split("/")[0] for e in split.test} == {"a", "b"}


def test_the_model_folder_knows_its_points_and_its_claims(locked: dict[str, Path]) -> None:
    folder = ModelDir(locked["repo"] / "pneumonia")
    card = folder.card()
    points = card.operating_points
    assert set(points) == {"strict", "lenient"} and card.default_operating_point == "strict"
    assert card.threshold == pytest.approx(points["strict"]["threshold"])
    assert all(0.0 < p["threshold"] < 1.0 for p in points.values())
    # provenance: every test film is listed as test and as nothing else (test chose nothing)
    split = data_mod.Split.load(locked["split"])
    test_names = {e.split("/")[-1] for e in split.test}
    roles: dict[str, set[str]] = {}
    for row in folder.provenance():
        roles.setdefault(Path(row["path"]).name, set()).add(row["role"])
    assert test_names and all(roles.get(n, {"test"}) <= {"test"} for n in test_names)
    claims = Claims.load(locked["repo"] / "pneumonia" / CLAIMS_FILE)
    by = {(c.source, c.operating_point): c for c in claims.claims}
    assert {("a", "strict"), ("b", "lenient")} <= set(by)
    for (source, _), c in by.items():
        n_test = sum(1 for e in split.test if e.startswith(source + "/"))
        assert c.films == n_test and c.patients <= c.films
        for interval in (c.auc, c.sensitivity, c.specificity):
            if interval is not None:
                assert interval.lower <= interval.point <= interval.upper


def test_predict_answers_at_the_named_point(locked: dict[str, Path], tmp_path: Path) -> None:
    films = sorted((locked["a"] / "PNEUMONIA").glob("*.jpeg"))[:4]
    rows = {}
    for point in ("strict", "lenient"):
        r = cxr("predict", *map(str, films), "--protocol", "embedded", "--url", str(locked["repo"]),
                "--operating-point", point, "--format", "json", ok=True, timeout=900)
        rows[point] = json.loads(r.stdout)
    card = ModelDir(locked["repo"] / "pneumonia").card()
    for point, answered in rows.items():
        thr = card.operating_points[point]["threshold"]
        for row in answered:
            assert row["operating_point"] == point and row["threshold"] == pytest.approx(thr, rel=1e-6)
            if row["status"] == "ok":
                assert row["label"] == contract.label_for(row["probability"], thr)


def test_a_refused_training_film_is_skipped_named_and_counted(locked: dict[str, Path]) -> None:
    refused = json.loads((locked["run"] / "history.json").read_text())["refused"]
    assert refused["train"]["per_source"] == {"a": 1}
    (film,) = refused["train"]["films"]
    assert film["path"].endswith(BLANK) and film["source"] == "a"
    assert film["status"] == "not_assessable" and film["rule"] == "blank_image"
    assert refused["select"] == {"per_source": {}, "films": []}


def test_trials_never_read_the_test_side(locked: dict[str, Path], tmp_path: Path) -> None:
    """The same split with every test entry pointing at a film that does not exist: trials still run, so they
    never opened one."""
    from cxr.train.trials import Trial, run

    s = data_mod.Split.load(locked["split"])
    ghost = tuple(f"{e.split('/')[0]}/{e.split('/')[1]}/missing-{i}.jpeg" for i, e in enumerate(s.test))
    split = tmp_path / "split.json"
    data_mod.Split(s.seed, s.val_fraction, s.train, s.val, s.roots, s.val_fractions, ghost).save(split)
    report = run([Trial("t", locked["run"], "the run")], split, tmp_path / "trials", n_boot=50, point_source="a",
                 speed=lambda paths: [123.0] * len(paths))
    row = report["trials"]["t"]
    assert report["side"] == "select" and set(row["auc"]) == {"a", "b"}
    assert row["films_per_s"] == 123.0 and row["parameters"] > 0 and row["gflop_per_film"] > 0
    assert "select side only" in (tmp_path / "trials" / "trials.md").read_text()


def test_a_second_read_of_the_test_side_shows(locked: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from cxr.export.claims_render import claims_markdown

    repo = tmp_path / "repository"
    shutil.copytree(locked["repo"], repo)
    first = Claims.load(repo / "pneumonia" / CLAIMS_FILE)
    assert first.reads == 1 and first.test_reads[0]["split"].endswith("split.json")
    assert claims_markdown(first).startswith("Measured once")
    cxr("claims", "--repository", str(repo), "--name", "pneumonia", "--split", str(locked["split"]),
        "--population", "a=strict", "--population", "b=lenient", "--overwrite", ok=True, timeout=900)
    second = Claims.load(repo / "pneumonia" / CLAIMS_FILE)
    assert second.reads == 2 and second.test_reads[0] == first.test_reads[0]
    assert "read **2 times**" in claims_markdown(second)


def test_a_student_learns_the_labels_mixed_with_the_teachers_probabilities(locked: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from cxr.train.scoring import KerasScorer
    from cxr.train.trainer import TrainConfig, _distilled_targets

    samples = data_mod.Split.load(locked["split"]).samples("select")[:12]
    x = data_mod.load_images([s.path for s in samples])
    y = np.array([s.label for s in samples], np.float32)
    teacher = locked["run"] / "model.keras"
    cfg = TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "student", split_file=locked["split"], teacher=teacher,
                      teacher_weight=0.25)
    p = 1 / (1 + np.exp(-KerasScorer(teacher).logits(x).astype(np.float64)))
    np.testing.assert_allclose(_distilled_targets(cfg, x, y), 0.75 * y + 0.25 * p, rtol=1e-6)
    with pytest.raises(ValueError, match="teacher_weight"):
        TrainConfig(data_dir=tmp_path, out_dir=tmp_path, teacher=teacher, teacher_weight=1.5)


def test_a_point_chosen_on_each_source_meets_its_target_on_each(locked: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from cxr.export.claims_report import PointRule, choose_points

    repo = tmp_path / "repository"
    shutil.copytree(locked["repo"], repo)
    res = choose_points([repo / "pneumonia"], locked["split"], [PointRule.parse("both=a,b:sensitivity:0.9")])
    pt = res["points"]["both"]
    assert pt["chosen_on"]["each_source"] is True
    by_source = pt["select_figures_in_sample_by_source"]
    assert set(by_source) == {"a", "b"} and all(f["sensitivity"] >= 0.9 for f in by_source.values())
    assert ModelDir(repo / "pneumonia").card().operating_points["both"]["threshold"] == pt["threshold"]

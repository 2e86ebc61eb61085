"""The locked pipeline end to end, as `scripts/build_locked_model.sh` runs it, on two generated sources:
lock-split -> train --split -> calibrate on select -> export --split -> operating-points -> claims -> predict at a
point. What each step wrote is read back through the product's own types."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.core import contract
from cxr.core.claims import CLAIMS_FILE, Claims
from cxr.core.model_dir import ModelDir
from cxr.train import data as data_mod
from tests.conftest import make_dataset

pytestmark = pytest.mark.slow


def cxr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cxr.cli", *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    assert r.returncode == 0, f"cxr {args[0]}: {r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locked")
    # two hospitals: 40 films per class each, two films per patient (make_dataset's names)
    a = make_dataset(root / "site_a", n_per_class=40, split=None, seed=11)
    b = make_dataset(root / "site_b", n_per_class=40, split=None, seed=12)
    split = root / "split.json"
    cxr("lock-split", str(split), "--source", f"a={a}:0.25:0.25", "--source", f"b={b}:0.25:0.25")
    run = root / "run"
    cache = root / "cache"
    cxr("train", "--split", str(split), "--out", str(run), "--epochs", "2", "--batch-size", "16",
        "--cache-dir", str(cache))
    select = root / "select"
    subprocess.run([sys.executable, "scripts/split_side.py", str(split), str(select), "--side", "select",
                    "--source", "a", "--source", "b"], check=True, capture_output=True, timeout=300,
                   cwd=Path(__file__).resolve().parent.parent)
    cxr("calibrate", "--model", str(run / "model.keras"), "--data", str(select), "--rule", "youden",
        "--scaling", "none")
    repo = root / "repository"
    cxr("export", "--model", str(run / "model.keras"), "--repository", str(repo), "--split", str(split),
        "--no-int8")
    cxr("operating-points", "--repository", str(repo), "--name", "pneumonia", "--split", str(split),
        "--point", "strict=a:sensitivity:0.8", "--point", "lenient=b:youden", "--default", "strict", "--overwrite")
    cxr("claims", "--repository", str(repo), "--name", "pneumonia", "--split", str(split),
        "--population", "a=strict", "--population", "b=lenient", "--overwrite")
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
                "--operating-point", point, "--format", "json")
        rows[point] = json.loads(r.stdout)
    card = ModelDir(locked["repo"] / "pneumonia").card()
    for point, answered in rows.items():
        thr = card.operating_points[point]["threshold"]
        for row in answered:
            assert row["operating_point"] == point and row["threshold"] == pytest.approx(thr, rel=1e-6)
            if row["status"] == "ok":
                assert row["label"] == contract.label_for(row["probability"], thr)

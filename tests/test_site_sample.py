"""The site tools' view of a hospital's sample: patients (manifest or file names, NIH-style names grouped), films
the model's provenance lists set aside."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cxr.site import site_audit as audit
from cxr.train import data as data_mod
from tests.conftest import synthetic_xray


@pytest.mark.parametrize(("name", "patient"), [
    ("00001299_003.png", "00001299"), ("00001299_000.png", "00001299"), ("00030805_000.png", "00030805"),
    ("person1000_bacteria_2931.jpeg", "person1000"), ("IM-0115-0001.jpeg", "IM-0115"),
    ("nih_00001299_000.png", "nih_00001299_000"), ("1299_3.png", "1299_3"),
])
def test_nih_style_names_group_by_patient(name: str, patient: str) -> None:
    assert data_mod.patient_id(name) == patient


def _folder(root: Path, names: dict[str, list[str]], *, manifest: dict[str, str] | None = None) -> Path:
    for i, (cls, files) in enumerate(names.items()):
        (root / cls).mkdir(parents=True)
        for j, f in enumerate(files):
            synthetic_xray(100 * i + j, pneumonia=cls == "PNEUMONIA").save(root / cls / f)
    if manifest is not None:
        data_mod.write_manifest(root, [{"label": cls, "file_name": f, "patient": manifest[f]}
                                       for cls, files in names.items() for f in files])
    return root


def test_site_sample_patients_from_names_and_the_warning(tmp_path: Path) -> None:
    names = {"NORMAL": ["00000001_000.png", "00000001_001.png", "00000002_000.png"],
             "PNEUMONIA": ["00000003_000.png", "00000003_004.png"]}
    s = audit.site_sample(_folder(tmp_path / "a", names), [])
    assert not s.patients_known and len({f.patient for f in s.films}) == 3
    assert "intervals too narrow" in audit.NO_PATIENTS_WARNING and "two parts" in audit.NO_PATIENTS_WARNING
    m = audit.site_sample(_folder(tmp_path / "b", names, manifest={f: f"p{i % 2}" for i, f in
                                                                   enumerate(sum(names.values(), []))}), [])
    assert m.patients_known and len({f.patient for f in m.films}) == 2


def test_site_sample_sets_aside_the_films_the_model_lists(tmp_path: Path) -> None:
    root = _folder(tmp_path / "a", {"NORMAL": ["n1.png", "n2.png"], "PNEUMONIA": ["p1.png", "p2.png", "p3.png"]})
    listed = hashlib.sha256((root / "PNEUMONIA" / "p2.png").read_bytes()).hexdigest()
    prov = [{"role": "train", "sha256": listed}, {"role": "validation", "sha256": "0" * 64}]
    s = audit.site_sample(root, prov)
    assert [f.path.name for f in s.set_aside] == ["p2.png"] and (s.n_pos, s.n_neg) == (2, 2)
    assert s.set_aside_by_role(prov) == {"train": 1}

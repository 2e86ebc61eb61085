"""DICOM SR results (highdicom): content, deterministic UIDs, placement in the source's study, minimal patient data."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from cxr.client.client import Prediction
from cxr.core import contract
from cxr.doors.dicom.sr import build_heatmap_sc, build_sr, check_result, read_sr, result_uids
from tests.conftest import prediction
from tests.test_dicom import _ramp, make_dicom

SHA = "ab" * 32


def _ok(label: str, p: float, model: str = "pneumonia", sha: str = SHA) -> Prediction:
    return prediction(source="x.dcm", label=label, probability=p, threshold=0.4, model_name=model, model_version="1", model_sha256=sha)


def _source() -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(_ramp())))
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "S1", "ACC42", "20261129", "101500"
    ds.PatientBirthDate, ds.PatientSex, ds.InstitutionName = "19700101", "F", "General Hospital"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    return ds


def _roundtrip(ds) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize(("p", "finding"), [(0.83, "Present"), (0.12, "Absent")])
def test_sr_carries_finding_probability_threshold_and_algorithm(p: float, finding: str) -> None:
    src = _source()
    label = contract.label_for(p, 0.4)
    sr = _roundtrip(build_sr(src, _ok(label, p)))
    assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    content = read_sr(sr)
    assert content["finding"] == finding and content["probability"] == pytest.approx(p)
    assert content["threshold"] == pytest.approx(0.4) and content["not_assessable"] is None
    assert content["sha256"] == SHA  # algorithm parameters (TID 4019)
    assert "233604007" in str(sr)  # the SNOMED CT finding
    refs = [r.ReferencedSOPInstanceUID for r in sr.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0].ReferencedSOPSequence]
    assert refs == [src.SOPInstanceUID]


def test_not_assessable_sr_has_no_finding() -> None:
    src = _source()
    exc = contract.not_assessable("x", "out_of_distribution", "ood_score 90.25 > 35.07", value=90.25, limit=35.07)
    res = prediction("not_assessable", source="x.dcm", threshold=0.4, model_version="1", reason=str(exc),
                     ood_score=90.25, ood_threshold=35.07, refusal=contract.Refusal.of(exc), model_sha256=SHA)
    content = read_sr(_roundtrip(build_sr(src, res)))
    assert content["not_assessable"] == "out_of_distribution"
    assert content["finding"] is None and content["probability"] is None
    # the refusal travels as numbers: what was measured and the limit it broke
    assert (content["refusal_value"], content["refusal_limit"]) == (90.25, 35.07)


def test_result_uids_are_deterministic_per_source_and_model() -> None:
    src = _source()
    a, b = result_uids(src, SHA), result_uids(src, SHA)
    assert a == b
    assert result_uids(src, "cd" * 32)["sr_instance"] != a["sr_instance"]  # another model: another result
    other = _source()
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    assert result_uids(other, SHA)["sr_instance"] != a["sr_instance"]
    assert result_uids(other, SHA)["sr_series"] == a["sr_series"]  # one results series per study and model
    res = _ok("Normal", 0.1)
    assert build_sr(src, res).SOPInstanceUID == build_sr(src, res).SOPInstanceUID == a["sr_instance"]


def test_only_placement_attributes_are_copied() -> None:
    sr = _roundtrip(build_sr(_source(), _ok("Normal", 0.1, "m")))
    assert sr.PatientBirthDate == "" and sr.PatientSex == ""
    assert "InstitutionName" not in sr or sr.InstitutionName != "General Hospital"
    assert sr.AccessionNumber == "ACC42"


def test_heatmap_secondary_capture_is_burned_in_and_placed() -> None:
    src = _source()
    res = _ok("Pneumonia", 0.9)
    rgb = np.zeros((300, 260, 3), np.uint8)
    sc = _roundtrip(build_heatmap_sc(src, res, rgb))
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
    assert sc.SOPInstanceUID == result_uids(src, SHA)["sc_instance"]
    assert sc.pixel_array.shape == (300, 260, 3) and sc.pixel_array[:20].max() > 0  # the banner


def test_result_validation() -> None:
    err = prediction("error", source="x.dcm", threshold=0.4, model_name="m", model_version="1", reason="x.dcm: unreadable", model_sha256=SHA)
    with pytest.raises(ValueError, match="ok and not_assessable"):
        check_result(err)  # an unreadable input gets no SR
    with pytest.raises(ValueError, match="sha256"):
        check_result(_ok("Normal", 0.1, "m", sha=""))
    with pytest.raises(ValueError):
        Prediction(source="x.dcm", status=contract.Status.OK, label=None, probability=None, threshold=0.4, model_name="m", model_version="1", model_sha256=SHA)  # ok without a label
    with pytest.raises(ValueError):
        contract.Refusal("nope")
    assert check_result(_ok("Normal", 0.1)).label == "Normal"


def _film(n: int, view: str) -> pydicom.Dataset:
    ds = _source()
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{n}"
    ds.InstanceNumber, ds.ViewPosition = n, view
    return ds


def _lateral() -> Prediction:
    refusal = contract.Refusal("dicom_view_position", "LL", "PA, AP")
    return prediction("not_assessable", source="l.dcm", threshold=0.4, model_version="1", reason="lateral",
                      refusal=refusal, model_sha256=SHA)


def test_one_study_answer_by_the_stated_rule() -> None:
    from cxr.doors.dicom.study import combine

    pa, ap = _ok("Normal", 0.2), _ok("Pneumonia", 0.7)
    assert combine([("1", pa), ("2", _lateral())]).label == "Normal"
    both = combine([("1", pa), ("2", ap), ("3", _lateral())])
    assert (both.label, both.probability, both.frontal) == ("Pneumonia", 0.7, ("1", "2"))  # any Pneumonia wins
    only_lateral = combine([("3", _lateral())])
    assert only_lateral.status is contract.Status.NOT_ASSESSABLE and only_lateral.why == "no_frontal"
    refusal = contract.Refusal("out_of_distribution", 99.0, 50.0)
    ood = prediction("not_assessable", source="o.dcm", threshold=0.4, model_version="1", reason="ood",
                     refusal=refusal, model_sha256=SHA)
    assert combine([("1", ood), ("3", _lateral())]).why == "all_frontal_refused"


def test_a_study_sr_carries_the_study_answer_and_each_frontal_films() -> None:
    from cxr.doors.dicom.sr import build_study_sr, read_study_sr
    from cxr.doors.dicom.study import combine

    films = [_film(1, "PA"), _film(2, "LL"), _film(3, "AP")]
    results = [_ok("Normal", 0.2), _lateral(), _ok("Pneumonia", 0.83)]
    study = combine([(str(f.SOPInstanceUID), r) for f, r in zip(films, results)])
    sr = _roundtrip(build_study_sr(films, results, study))
    got = read_study_sr(sr)
    assert got["study"]["finding"] == "Present" and got["study"]["probability"] == pytest.approx(0.83)
    assert sorted(got["study"]["instance_uids"]) == sorted(str(films[i].SOPInstanceUID) for i in (0, 2))
    assert [(f["instance_uid"], f["finding"]) for f in got["films"]] == [
        (str(films[0].SOPInstanceUID), "Absent"), (str(films[2].SOPInstanceUID), "Present")]  # no lateral answer
    assert sr.StudyInstanceUID == films[0].StudyInstanceUID and sr.Modality == "SR"
    again = build_study_sr(films, results, study)
    assert again.SOPInstanceUID == sr.SOPInstanceUID  # deterministic: a resend replaces


def test_an_instance_sr_is_numbered_as_its_film() -> None:
    film = _film(7, "PA")
    assert build_sr(film, _ok("Normal", 0.1)).InstanceNumber == 7


def test_sr_says_which_operating_point_answered() -> None:
    pred = prediction(source="x.dcm", label="Pneumonia", probability=0.5, threshold=0.4, model_version="1", model_sha256=SHA,
                      operating_point="adult")
    content = read_sr(_roundtrip(build_sr(_source(), pred)))
    assert content["operating_point"] == "adult" and content["threshold"] == 0.4

"""Screening results as DICOM: a Comprehensive SR (TID 1500) per input, and the Grad-CAM overlay as Secondary Capture.

The SR goes into the source's study and patient, in a series of its own
(Modality SR), and references the source image. Its one measurement group
(TID 1501) carries:

* the algorithm (TID 4019: name, version, and as parameters the model's
  sha256, 64 hex digits alone since a parameter holds at most 64 characters,
  and the decision threshold);
* for an answer: the finding, Pneumonia (SNOMED CT 233604007), Present or
  Absent at the stored threshold, the calibrated probability and the threshold
  as numeric measurements;
* for a not-assessable input: no finding, and an evaluation "Not assessable"
  whose value names the rule.

UIDs are derived from the source SOP Instance UID and the model's sha256
(``pydicom.uid.generate_uid`` with those as entropy), so a resend never makes a
duplicate in the PACS. Patient and study attributes are copied only as far as
filing the SR in the right study needs (identifiers, name, study date and
time, accession number); birth date and sex stay empty.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cxr.client.client import Prediction
from cxr.core import contract

#: Coding scheme of this project's own concepts (no standard code exists for them).
LOCAL_SCHEME = "99CXR"
SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
DEVICE_NAME = "cxr-triton"
#: Copied from the source, and nothing else of the patient or study.
PLACEMENT_ATTRIBUTES = (
    "PatientID", "PatientName", "IssuerOfPatientID", "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName",
)


def check_result(result: Prediction) -> Prediction:
    """The prediction, if an SR can be made of it: ``ok`` or ``not_assessable`` (an unreadable input gets no SR),
    by a model whose sha256 is known (it makes the result UIDs).

    Raises:
        ValueError: It cannot.
    """
    if result.status not in (contract.Status.OK, contract.Status.NOT_ASSESSABLE):
        raise ValueError("an SR is made for ok and not_assessable results only")
    if not result.model_sha256:
        raise ValueError("the model's sha256 is needed (it makes the result UIDs)")
    return result


def result_uids(source: Dataset, model_sha256: str, operating_point: str = "") -> dict[str, str]:
    """Deterministic UIDs of the SR (and the heatmap SC) made for ``source`` by the model with ``model_sha256`` at
    ``operating_point``: a result's key (SOP Instance UID, model sha256, operating point) is its identity, so a
    result made again after a crash is the same instance at the PACS."""
    sop = str(source.SOPInstanceUID)
    study = str(source.StudyInstanceUID)
    point = [operating_point] if operating_point else []  # results of models without points keep their UIDs
    return {
        "sr_series": generate_uid(entropy_srcs=[study, model_sha256, "cxr-sr-series"]),
        "sr_instance": generate_uid(entropy_srcs=[sop, model_sha256, *point, "cxr-sr"]),
        "sc_series": generate_uid(entropy_srcs=[study, model_sha256, "cxr-sc-series"]),
        "sc_instance": generate_uid(entropy_srcs=[sop, model_sha256, *point, "cxr-sc"]),
    }


def _dated(ds: Dataset, at: dt.datetime | None) -> Dataset:
    """The object's content and creation date and time set to ``at`` (when its answer was made), so the same
    answer makes the same bytes; unchanged when ``at`` is ``None``."""
    if at is not None:
        local = at.astimezone(dt.timezone.utc)
        day, clock = local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f")
        ds.InstanceCreationDate = day
        ds.InstanceCreationTime = clock
        if "ContentDate" in ds or ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.7":
            ds.ContentDate = day
            ds.ContentTime = clock
        for item in ds.get("ContributingEquipmentSequence", None) or []:
            if "ContributionDateTime" in item:
                item.ContributionDateTime = day + clock
    return ds


def placement_evidence(source: Dataset) -> Dataset:
    """The source reduced to what places the SR in its study and references the image (no pixels, no more PHI)."""
    ev = Dataset()
    for kw in (*PLACEMENT_ATTRIBUTES, "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
        if kw in source:
            setattr(ev, kw, source[kw].value)
    for kw in ("PatientName", "PatientID", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime"):
        if kw not in ev:
            setattr(ev, kw, "")
    ev.PatientBirthDate = ""
    ev.PatientSex = ""
    return ev


def _code(value: str, meaning: str, scheme: str = LOCAL_SCHEME):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


#: (value, meaning, scheme) of the SNOMED CT concepts used.
PNEUMONIA = ("233604007", "Pneumonia", "SCT")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("2667000", "Absent", "SCT")
CHEST_XRAY = ("399208008", "Plain chest X-ray", "SCT")


def _instance_number(source: Dataset) -> int:
    """The source's Instance Number (so the SRs of a study's films are numbered as the films are), else 1."""
    try:
        n = int(source.get("InstanceNumber", None) or 1)
    except (TypeError, ValueError):
        return 1
    return n if 0 < n < 2**31 else 1


def _context(result: Prediction):
    """The algorithm (TID 4019) and the observer device of a model's results."""
    import highdicom as hd

    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{DEVICE_NAME} pneumonia screening",
        version=f"{result.model_name} v{result.model_version}",
        # Algorithm parameters are LO (64 characters): the first is the model's sha256 (64 hex digits) alone.
        parameters=[result.model_sha256, f"threshold={result.threshold!r}"]
        + ([f"operating_point={result.operating_point}"] if result.operating_point else []),
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[result.model_sha256, "cxr-device"]), name=DEVICE_NAME,
            manufacturer_name=DEVICE_NAME, model_name=result.model_name),
    )
    return algorithm, observer


def _evaluations(result: Prediction) -> tuple[list, list]:
    """The qualitative evaluations and measurements of one answer."""
    import highdicom as hd

    qualitative, measurements = [], []
    unit = _code("1", "no units", "UCUM")
    if result.status is contract.Status.OK:
        present = contract.is_positive(float(result.probability), result.threshold)  # type: ignore[arg-type]
        qualitative.append(hd.sr.QualitativeEvaluation(name=_code(*PNEUMONIA), value=_code(*(PRESENT if present else ABSENT))))
        measurements.append(hd.sr.Measurement(name=_code("CXR-P", "P(pneumonia), calibrated probability"),
                                              value=float(result.probability), unit=unit))  # type: ignore[arg-type]
        measurements.append(hd.sr.Measurement(name=_code("CXR-T", "Decision threshold"), value=float(result.threshold),
                                              unit=unit))
    else:
        qualitative.append(hd.sr.QualitativeEvaluation(
            name=_code("CXR-NA", "Not assessable: route to a human reader"),
            value=_code(str(result.rule), f"{result.rule}: {contract.RULES[str(result.rule)]}")))
        r = result.refusal
        if r is not None and isinstance(r.value, (int, float)) and isinstance(r.limit, (int, float)):
            # what the rule measured, and the limit it broke, as numbers (ood_score, grey-level std, chroma ...)
            measurements.append(hd.sr.Measurement(name=_code("CXR-RV", f"{r.rule}: measured value"),
                                                  value=float(r.value), unit=unit))
            measurements.append(hd.sr.Measurement(name=_code("CXR-RL", f"{r.rule}: limit"), value=float(r.limit),
                                                  unit=unit))
    return qualitative, measurements


def _group(algorithm, sources: list[Dataset], qualitative: list, measurements: list, uid: str,
           identifier: str):
    import highdicom as hd

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[uid, "group"]),
                                                      identifier=identifier),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(s.SOPClassUID), str(s.SOPInstanceUID)) for s in sources],
        qualitative_evaluations=qualitative,
        measurements=measurements or None,
    )


def build_sr(source: Dataset, result: Prediction, *, at: dt.datetime | None = None):
    """A ``highdicom.sr.ComprehensiveSR`` for one screened instance (dated ``at``, when given)."""
    import highdicom as hd

    check_result(result)
    uids = result_uids(source, result.model_sha256, result.operating_point or "")
    evidence = placement_evidence(source)
    algorithm, observer = _context(result)
    qualitative, measurements = _evaluations(result)
    group = _group(algorithm, [source], qualitative, measurements, uids["sr_instance"], "pneumonia screening")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(*CHEST_XRAY),
        imaging_measurements=[group],
    )
    return _dated(hd.sr.ComprehensiveSR(
        evidence=[evidence], content=report, series_instance_uid=uids["sr_series"], series_number=SERIES_NUMBER,
        sop_instance_uid=uids["sr_instance"], instance_number=_instance_number(source), manufacturer=DEVICE_NAME,
        is_complete=True, is_final=False,
        series_description="AI pneumonia screening (screening aid, not for diagnosis)",
    ), at)


#: Tracking identifier of a study SR's study-answer group (the films' groups are "pneumonia screening: film N").
STUDY_GROUP = "pneumonia screening: study"
#: Why a study is not assessable, as local codes.
STUDY_NOT_ASSESSABLE = {
    "all_frontal_refused": "every frontal film was not assessable",
    "no_frontal": "no frontal film in the study",
}


def study_sr_uid(study_uid: str, model_sha256: str, instances: list[str]) -> str:
    """The study SR's UID: from the study, the model and the instances it answers (a later film makes another)."""
    return generate_uid(entropy_srcs=[study_uid, model_sha256, *sorted(instances), "cxr-study-sr"])


def build_study_sr(sources: list[Dataset], results: list[Prediction], study, *, at: dt.datetime | None = None,
                   instance_number: int = 1, predecessor: dict | None = None):
    """One ``ComprehensiveSR`` for a study (:mod:`cxr.doors.dicom.study`): a group with the study answer, then a group per
    frontal film with its own answer. ``sources`` and ``results`` pair up; ``study`` is the
    :class:`cxr.doors.dicom.study.StudyResult`. An amended study answer (a film came after the study was
    answered) takes the next ``instance_number`` and names the SR it replaces, ``predecessor`` (its
    ``study_instance_uid``, ``series_instance_uid``, ``sop_class_uid``, ``sop_instance_uid``), in the Predecessor
    Documents Sequence."""
    import highdicom as hd

    for r in results:
        check_result(r)
    model = results[0]
    by_uid = {str(s.SOPInstanceUID): (s, r) for s, r in zip(sources, results)}
    frontal = [by_uid[u] for u in study.frontal]
    study_uid = str(sources[0].StudyInstanceUID)
    sr_uid = study_sr_uid(study_uid, model.model_sha256, list(by_uid))
    algorithm, observer = _context(model)
    unit = _code("1", "no units", "UCUM")
    if study.status is contract.Status.OK:
        present = study.label == contract.LABELS[1]
        qualitative = [hd.sr.QualitativeEvaluation(name=_code(*PNEUMONIA), value=_code(*(PRESENT if present else ABSENT)))]
        measurements = [hd.sr.Measurement(name=_code("CXR-P", "P(pneumonia), highest of the frontal films"),
                                          value=float(study.probability), unit=unit),
                        hd.sr.Measurement(name=_code("CXR-T", "Decision threshold"), value=float(study.threshold),
                                          unit=unit)]
    else:
        qualitative = [hd.sr.QualitativeEvaluation(
            name=_code("CXR-NA", "Not assessable: route to a human reader"),
            value=_code(f"CXR-{study.why}", STUDY_NOT_ASSESSABLE[study.why]))]
        measurements = []
    groups = [_group(algorithm, [s for s, _ in frontal] or sources, qualitative, measurements, sr_uid, STUDY_GROUP)]
    for n, (source, result) in enumerate(frontal, 1):
        q, m = _evaluations(result)
        groups.append(_group(algorithm, [source], q, m, f"{sr_uid}.{n}", f"pneumonia screening: film {n}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(*CHEST_XRAY),
        imaging_measurements=groups,
    )
    previous = None
    if predecessor is not None:
        pre = Dataset()
        pre.StudyInstanceUID = predecessor["study_instance_uid"]
        pre.SeriesInstanceUID = predecessor["series_instance_uid"]
        pre.SOPClassUID = predecessor["sop_class_uid"]
        pre.SOPInstanceUID = predecessor["sop_instance_uid"]
        previous = [pre]
    return _dated(hd.sr.ComprehensiveSR(
        evidence=[placement_evidence(s) for s in sources], content=report,
        series_instance_uid=result_uids(sources[0], model.model_sha256)["sr_series"], series_number=SERIES_NUMBER,
        sop_instance_uid=sr_uid, instance_number=instance_number, manufacturer=DEVICE_NAME, is_complete=True,
        is_final=False, previous_versions=previous,
        series_description="AI pneumonia screening (screening aid, not for diagnosis)",
    ), at)


#: The SR's numeric measurements, by code.
NUMBERS = {"CXR-P": "probability", "CXR-T": "threshold", "CXR-RV": "refusal_value", "CXR-RL": "refusal_limit"}


def read_study_sr(ds: Dataset) -> dict:
    """A study SR made by :func:`build_study_sr`: ``{"study": {...}, "films": [{...}, ...]}``, each as
    :func:`read_sr` reads a group (the films' with ``instance_uid``, the film each answers)."""
    out: dict = {"study": None, "films": []}
    for item in ds.ContentSequence:
        if item.ValueType != "CONTAINER" or "ContentSequence" not in item:
            continue
        for group in item.ContentSequence:
            if group.ValueType != "CONTAINER" or "ContentSequence" not in group:
                continue
            tracking = [str(i.TextValue) for i in group.ContentSequence
                        if i.ValueType == "TEXT" and "TextValue" in i and str(i.TextValue).startswith("pneumonia screening")]
            if not tracking:
                continue
            holder = Dataset()
            holder.ContentSequence = group.ContentSequence
            content = read_sr(holder)
            refs = [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in group.ContentSequence
                    if i.ValueType == "IMAGE"]
            if tracking[0] == STUDY_GROUP:
                out["study"] = {**content, "instance_uids": refs}
            else:
                out["films"].append({**content, "instance_uid": refs[0] if refs else None})
    return out


def read_sr(ds: Dataset) -> dict:
    """The screening content of an SR made by :func:`build_sr` (for tests and for sites checking what arrived)."""
    out: dict = {"finding": None, "probability": None, "threshold": None, "not_assessable": None, "sha256": None,
                 "refusal_value": None, "refusal_limit": None, "operating_point": None}

    def value(code: Dataset) -> str:  # codes over 16 characters go to LongCodeValue
        return str(code.get("CodeValue") or code.get("LongCodeValue") or "")

    def walk(items) -> None:
        for it in items:
            name = value(it.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in it else None
            if it.ValueType == "CODE" and name == PNEUMONIA[0]:
                out["finding"] = it.ConceptCodeSequence[0].CodeMeaning
            elif it.ValueType == "CODE" and name == "CXR-NA":
                out["not_assessable"] = value(it.ConceptCodeSequence[0])
            elif it.ValueType == "NUM" and name in NUMBERS:
                out[NUMBERS[name]] = float(it.MeasuredValueSequence[0].NumericValue)
            elif it.ValueType == "TEXT" and name == "111002" and re.fullmatch(r"[0-9a-f]{64}", str(it.TextValue)):
                out["sha256"] = str(it.TextValue)
            elif it.ValueType == "TEXT" and name == "111002" and str(it.TextValue).startswith("operating_point="):
                out["operating_point"] = str(it.TextValue).split("=", 1)[1]
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


def build_heatmap_sc(source: Dataset, result: Prediction, overlay_rgb: np.ndarray, *,
                     unverified: bool = False, at: dt.datetime | None = None):
    """The Grad-CAM overlay as a Secondary Capture in the source's study, with "screening aid, not for diagnosis"
    burned in; ``unverified`` (the map failed the model-randomisation check, ``GradCam.passes_check``) burns in
    that warning too."""
    import highdicom as hd
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.asarray(overlay_rgb, dtype=np.uint8))
    d = ImageDraw.Draw(img)
    text = "SCREENING AID, NOT FOR DIAGNOSIS" + ("; MAP FAILED THE RANDOMISATION CHECK" if unverified else "")
    d.rectangle([0, 0, img.width, 22], fill=(0, 0, 0))
    d.text((6, 5), text, fill=(255, 255, 0))
    uids = result_uids(source, result.model_sha256, result.operating_point or "")
    ev = placement_evidence(source)
    # The overlay is drawn as the film is displayed; a frontal chest film is shown with the patient's left on the
    # viewer's right (columns towards the patient's left, rows towards the feet) unless the source says otherwise.
    orientation = tuple(source.get("PatientOrientation", None) or ("L", "F"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ev, pixel_array=np.asarray(img), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orientation,
        series_instance_uid=uids["sc_series"], sop_instance_uid=uids["sc_instance"],
        series_number=SC_SERIES_NUMBER, instance_number=1, manufacturer=DEVICE_NAME,
        series_description="AI pneumonia heatmap (screening aid, not for diagnosis)",
    )
    sc.BurnedInAnnotation = "YES"
    return _dated(sc, at)

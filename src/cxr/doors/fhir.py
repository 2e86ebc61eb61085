"""Screening results as FHIR R4: a DiagnosticReport and an Observation per input, the model as a Device.

For every screened input (IHE AI Results in spirit):

* **Observation** ``code`` SNOMED CT 233604007 *Pneumonia*; ``valueCodeableConcept`` SNOMED CT 52101004
  *Present* or 2667000 *Absent* at the served threshold; components: P(pneumonia) and the threshold (and the
  ``ood_score``) as quantities. A not-assessable input has no value: ``dataAbsentReason`` *not-performed*, and
  components naming the refusal rule, what it measured and its limit. Status ``preliminary``: a screening aid
  whose answer a reader confirms.
* **DiagnosticReport** (category RAD, LOINC 18748-4 *Diagnostic imaging study*) with the Observation as its
  result, and the ImagingStudy referenced by Study Instance UID (``urn:dicom:uid`` identifier), as is the
  patient when the DICOM header names one (``PatientID`` as an identifier, no other demographics).
* **Device**: the model (name, version, and its sha256 as an identifier), referenced by both.

Resources are built and validated with ``fhir.resources`` (its R4B models: R4's technical correction, identical
for these resources), gathered in one ``transaction`` Bundle, and written to a file (``--fhir-out``) or POSTed to
a FHIR server's base URL (``--fhir-url``): by :class:`FhirDelivery` after a ``cxr predict`` run, by the listener's
FHIR outbox (:mod:`cxr.doors.dicom.outbox`) for ``cxr listen``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.client.client import Prediction
from cxr.core import contract
from cxr.core.errors import CxrError, ExitCode, RetryableServerError

if TYPE_CHECKING:
    from cxr.client.batch import Delivered
    from cxr.core.audit_trail import AuditLog

#: How several films of a study make one answer (:func:`cxr.doors.dicom.study.combine`, given by the caller:
#: this module sits below the DICOM listener): ``(SOP Instance UID, prediction)`` pairs -> a study answer.
StudyRule = Callable[[Sequence[tuple[str, Prediction]]], Any]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
#: This project's own codes (no standard code exists for them).
LOCAL = "urn:cxr-triton:codes"
REFUSAL_RULES = "urn:cxr-triton:refusal-rule"
MODEL_SHA256 = "urn:cxr-triton:model-sha256"
DICOM_UID = "urn:dicom:uid"
#: Identifier system of this project's results: the value derives from the study, the instance (or the input's
#: name) and the model's sha256, so a rerun finds what an earlier run created (conditional create).
RESULT_ID = "urn:cxr-triton:result"
PNEUMONIA = ("233604007", "Pneumonia")
PRESENT = ("52101004", "Present")
ABSENT = ("2667000", "Absent")
REPORT_CODE = ("18748-4", "Diagnostic imaging study")


class FhirError(CxrError):
    """A FHIR resource failed validation, or a FHIR server refused the results."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class StudyRef:
    """Where a result belongs: the DICOM study and instance (empty for files that are not DICOM).

    Attributes:
        study_uid: Study Instance UID.
        instance_uid: SOP Instance UID.
        patient_id: The header's PatientID (an identifier for the EHR to match; no other demographics).
        patient_issuer: The header's IssuerOfPatientID.
        accession: The header's AccessionNumber.
    """

    study_uid: str = ""
    instance_uid: str = ""
    patient_id: str = ""
    patient_issuer: str = ""
    accession: str = ""

    @classmethod
    def of_file(cls, path: str | Path) -> StudyRef:
        """The study of a DICOM file (an empty reference for anything else)."""
        try:
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - not DICOM, or unreadable: the result stands without a study
            return cls()
        return cls(str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or ""),
                   str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""),
                   str(ds.get("AccessionNumber", "") or ""))


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _quantity(value: float) -> dict:
    return {"value": float(value), "unit": "1", "system": UCUM, "code": "1"}


def _component(code: str, display: str, value: float | str | None) -> dict | None:
    if value is None:
        return None
    c: dict = {"code": _cc(LOCAL, code, display)}
    if isinstance(value, (int, float)):
        c["valueQuantity"] = _quantity(value)
    else:
        c["valueString"] = str(value)
    return c


def device(pred: Prediction, *, full_url: str) -> dict:
    """The served model as a Device (name, version, sha256)."""
    return {
        "fullUrl": full_url,
        "resource": {
            "resourceType": "Device",
            "identifier": [{"system": MODEL_SHA256, "value": pred.model_sha256 or "unknown"}],
            "deviceName": [{"name": f"cxr-triton {pred.model_name}", "type": "model-name"}],
            "version": [{"value": pred.model_version}],
            "type": _cc(LOCAL, "screening-model", "Chest X-ray pneumonia screening model"),
        },
        "request": {"method": "POST", "url": "Device",
                    "ifNoneExist": f"identifier={MODEL_SHA256}|{pred.model_sha256 or 'unknown'}"},
    }


def result_id(pred: Prediction, study: StudyRef, kind: str) -> str:
    """The stable identifier value of one input's ``kind`` (``observation`` or ``report``): a UUID derived from
    the study, the instance (the input's name when it is not DICOM) and the model's sha256."""
    source = study.instance_uid or Path(str(pred.source)).name
    point = f"|{pred.operating_point}" if pred.operating_point else ""  # another point's answer is another result
    return str(uuid.uuid5(uuid.NAMESPACE_URL,
                          f"{RESULT_ID}|{study.study_uid}|{source}|{pred.model_sha256}{point}|{kind}"))


def _conditional(resource_type: str, value: str) -> dict:
    """A transaction request that creates the resource only when none carries the identifier yet."""
    return {"method": "POST", "url": resource_type, "ifNoneExist": f"identifier={RESULT_ID}|{value}"}


def patient_system(issuer: str, site_system: str | None = None) -> str | None:
    """The identifier system of a patient ID: the DICOM header's IssuerOfPatientID where it names one (an OID
    becomes ``urn:oid:...``, a URI stays as it is), else the site's ``--patient-id-system`` (``None``: neither)."""
    issuer = issuer.strip()
    if issuer and re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        return f"urn:oid:{issuer}"
    if issuer and re.match(r"^(urn:|https?://)", issuer):
        return issuer
    return site_system or None


def subject(study: StudyRef, site_system: str | None = None) -> dict | None:
    """The Patient a result is about, as a typed logical reference (``type: Patient``, the header's PatientID in
    the system :func:`patient_system` says; an IssuerOfPatientID that is not a system is kept as the assigner's
    name); ``None`` without a PatientID."""
    if not study.patient_id:
        return None
    ident: dict = {"value": study.patient_id}
    system = patient_system(study.patient_issuer, site_system)
    if system:
        ident["system"] = system
    if study.patient_issuer and system != patient_system(study.patient_issuer):
        ident["assigner"] = {"display": study.patient_issuer}
    return {"type": "Patient", "identifier": ident}


def result_entries(pred: Prediction, study: StudyRef, *, device_url: str, issued: str,
                   patient_id_system: str | None = None) -> list[dict]:
    """The Observation and the DiagnosticReport of one answered input (``ok`` or ``not_assessable``), each created
    conditionally on its stable identifier (:func:`result_id`): sending them twice leaves one of each."""
    if pred.status is contract.Status.ERROR:
        raise ValueError(f"{pred.source}: an unreadable input or a failed request gets no FHIR result")
    obs_id, rep_id = result_id(pred, study, "observation"), result_id(pred, study, "report")
    obs_url, rep_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    patient = subject(study, patient_id_system)
    imaging = ({"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study.study_uid}"}}
               if study.study_uid else None)
    components = [
        _component("probability", "P(pneumonia), calibrated probability", pred.probability),
        _component("threshold", "Decision threshold", pred.threshold),
        _component("ood-score", "Out-of-distribution score", pred.ood_score),
        _component("operating-point", "Operating point (named threshold) that answered", pred.operating_point or None),
    ]
    obs: dict = {
        "resourceType": "Observation",
        "identifier": [{"system": RESULT_ID, "value": obs_id}],
        "status": "preliminary",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "imaging", "Imaging")],
        "code": _cc(SNOMED, *PNEUMONIA),
        "issued": issued,
        "device": {"reference": device_url},
        "note": [{"text": "Screening aid, not a diagnosis: a reader confirms."}],
    }
    positive = pred.ok and bool(contract.is_positive(float(pred.probability), pred.threshold))  # type: ignore[arg-type]
    if pred.ok:
        obs["valueCodeableConcept"] = _cc(SNOMED, *(PRESENT if positive else ABSENT))
    else:
        r = pred.refusal
        assert r is not None
        obs["dataAbsentReason"] = _cc("http://terminology.hl7.org/CodeSystem/data-absent-reason", "not-performed",
                                      "Not Performed")
        components += [{"code": _cc(LOCAL, "refusal-rule", "Not assessable: route to a human reader"),
                        "valueCodeableConcept": _cc(REFUSAL_RULES, r.rule, r.description)},
                       _component("refusal-value", f"{r.rule}: measured value", r.value),
                       _component("refusal-limit", f"{r.rule}: limit", r.limit)]
    obs["component"] = [c for c in components if c is not None]
    if patient:
        obs["subject"] = patient
    if imaging:
        obs["derivedFrom"] = [imaging]
    if pred.ok:
        conclusion = f"Pneumonia {'present' if positive else 'absent'} (AI screening aid, preliminary)"
    else:
        conclusion = f"Not assessable ({pred.rule}): route to a human reader"
    rep: dict = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": _cc(LOINC, *REPORT_CODE),
        "issued": issued,
        "result": [{"reference": obs_url}],
        "conclusion": conclusion,
    }
    if positive:
        rep["conclusionCode"] = [_cc(SNOMED, *PNEUMONIA)]
    rep["identifier"] = [{"system": RESULT_ID, "value": rep_id}]
    if study.accession:
        rep["identifier"].insert(0, {"type": _cc("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN",
                                                 "Accession ID"), "value": study.accession})
    if patient:
        rep["subject"] = patient
    if imaging:
        rep["imagingStudy"] = [imaging]
    return [{"fullUrl": obs_url, "resource": obs, "request": _conditional("Observation", obs_id)},
            {"fullUrl": rep_url, "resource": rep, "request": _conditional("DiagnosticReport", rep_id)}]


def bundle(results: Sequence[tuple[Prediction, StudyRef]], *, patient_id_system: str | None = None,
           study_rule: StudyRule | None = None) -> dict:
    """One ``transaction`` Bundle for the answered inputs (errors are left out), validated; patients identified in
    ``patient_id_system`` where the header names no issuer (:func:`subject`). With ``study_rule`` (the listener's,
    :func:`cxr.doors.dicom.study.combine`), the DICOM films of one study and model make one DiagnosticReport with
    the study answer (:func:`study_entries`), as ``cxr listen --study-quiet-s`` does; other inputs one each.

    Raises:
        FhirError: A resource does not validate.
    """
    issued = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entries: list[dict] = []
    devices: dict[str, str] = {}
    studies: dict[tuple[str, str], list[tuple[Prediction, StudyRef]]] = {}
    for pred, study in results:
        if pred.status is contract.Status.ERROR:
            continue
        key = f"{pred.model_name}|{pred.model_version}|{pred.model_sha256}"
        if key not in devices:
            devices[key] = f"urn:uuid:{uuid.uuid4()}"
            entries.append(device(pred, full_url=devices[key]))
        if study_rule is not None and study.study_uid and study.instance_uid:
            group = studies.setdefault((study.study_uid, key), [])
            if not group:
                entries.append({"study": group})  # where the study's entries go, in input order
            group.append((pred, study))
            continue
        entries += result_entries(pred, study, device_url=devices[key], issued=issued,
                                  patient_id_system=patient_id_system)
    if study_rule is not None:
        expanded: list[dict] = []
        for e in entries:
            if "study" not in e:
                expanded.append(e)
                continue
            items = e["study"]
            key = f"{items[0][0].model_name}|{items[0][0].model_version}|{items[0][0].model_sha256}"
            answer = study_rule([(ref.instance_uid, pred) for pred, ref in items])
            expanded += study_entries(items, answer, device_url=devices[key], issued=issued,
                                      patient_id_system=patient_id_system)
        entries = expanded
    out = {"resourceType": "Bundle", "type": "transaction", "timestamp": issued, "entry": entries}
    validate(out)
    return out


def study_report_id(study_uid: str, model_sha256: str) -> str:
    """The stable identifier value of a study's DiagnosticReport: one per study and model, whatever films it
    answers (a film that comes later amends it in place)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{RESULT_ID}|{study_uid}|{model_sha256}|study-report"))


def study_bundle(items: Sequence[tuple[Prediction, StudyRef]], study, *, amended: bool = False,
                 patient_id_system: str | None = None) -> dict:
    """One ``transaction`` Bundle for a whole study (:mod:`cxr.doors.dicom.study`): an Observation per frontal film and
    one DiagnosticReport with the study answer (``study``, a :class:`cxr.doors.dicom.study.StudyResult`) whose results are
    those Observations; laterals get nothing of their own. Created conditionally on identifiers, like
    :func:`bundle`; ``amended`` (a film came after the study was answered, and ``items`` are all its films) updates
    the study's DiagnosticReport in place, by its identifier (a conditional update), with status ``amended``.

    Raises:
        FhirError: A resource does not validate.
    """
    issued = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    device_url = f"urn:uuid:{uuid.uuid4()}"
    entries = [device(items[0][0], full_url=device_url)]
    entries += study_entries(items, study, device_url=device_url, issued=issued, amended=amended,
                             patient_id_system=patient_id_system)
    out = {"resourceType": "Bundle", "type": "transaction", "timestamp": issued, "entry": entries}
    validate(out)
    return out


def study_entries(items: Sequence[tuple[Prediction, StudyRef]], study, *, device_url: str, issued: str,
                  amended: bool = False, patient_id_system: str | None = None) -> list[dict]:
    """The entries of :func:`study_bundle` but its Device (referenced as ``device_url``)."""
    model, ref0 = items[0]
    entries: list[dict] = []
    frontal = set(study.frontal)
    observations = []
    for pred, ref in items:
        if ref.instance_uid in frontal:
            observations.append(result_entries(pred, ref, device_url=device_url, issued=issued,
                                               patient_id_system=patient_id_system)[0])
    rep_id = study_report_id(ref0.study_uid, model.model_sha256)
    if study.status is contract.Status.OK:
        positive = study.label == contract.LABELS[1]
        conclusion = (f"Pneumonia {'present' if positive else 'absent'} in the study (AI screening aid, preliminary; "
                      f"highest P(pneumonia) of {len(frontal)} frontal film(s) {study.probability:.3f})")
    else:
        positive = False
        conclusion = f"Not assessable ({study.why.replace('_', ' ')}): route to a human reader"
    rep: dict = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": RESULT_ID, "value": rep_id}],
        "status": "amended" if amended else "preliminary",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": _cc(LOINC, *REPORT_CODE),
        "issued": issued,
        "conclusion": conclusion,
    }
    if observations:
        rep["result"] = [{"reference": o["fullUrl"]} for o in observations]
    if positive:
        rep["conclusionCode"] = [_cc(SNOMED, *PNEUMONIA)]
    if ref0.accession:
        rep["identifier"].insert(0, {"type": _cc("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN",
                                                 "Accession ID"), "value": ref0.accession})
    if ref0.patient_id:
        rep["subject"] = subject(ref0, patient_id_system)
    if ref0.study_uid:
        rep["imagingStudy"] = [{"type": "ImagingStudy", "identifier": {"system": DICOM_UID,
                                                                       "value": f"urn:oid:{ref0.study_uid}"}}]
    entries += observations
    request = ({"method": "PUT", "url": f"DiagnosticReport?identifier={RESULT_ID}|{rep_id}"} if amended
               else _conditional("DiagnosticReport", rep_id))
    entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": rep, "request": request})
    return entries


def validate(resource: dict) -> None:
    """Validate a resource (a Bundle: each entry too) with ``fhir.resources``.

    Raises:
        FhirError: One line naming the first problem.
    """
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        for e in resource.get("entry") or []:
            get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError and KeyError alike
        first = str(exc).splitlines()
        raise FhirError(f"FHIR validation failed: {' '.join(first[:3])}") from None


def write_bundle(path: Path, results: Sequence[tuple[Prediction, StudyRef]]) -> dict:
    """Write the Bundle durably as JSON; returns it."""
    from cxr.core.durable import write_durably

    b = bundle(results)
    write_durably(Path(path), (json.dumps(b, indent=1) + "\n").encode())
    return b


def split_transaction(bundle_: dict) -> list[dict]:
    """A transaction Bundle of :func:`bundle` as one transaction per input (its Observation and DiagnosticReport,
    with the Device they reference): each input's results are atomic, and a transaction of conditional creates
    stays small (some servers serialize those and cap their size)."""
    devices = {e["fullUrl"]: e for e in bundle_.get("entry", []) if e["resource"]["resourceType"] == "Device"}
    groups: list[list[dict]] = []
    current: list[dict] = []
    for e in bundle_.get("entry", []):
        if e["resource"]["resourceType"] == "Device":
            continue
        current.append(e)
        if e["resource"]["resourceType"] == "DiagnosticReport":
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    out = []
    for g in groups:
        text = json.dumps(g)
        used = [d for url, d in devices.items() if url in text]
        out.append({**{k: v for k, v in bundle_.items() if k != "entry"}, "entry": used + g})
    return out or [bundle_]


def post_bundle(base_url: str, bundle_: dict, *, timeout_s: float = 30.0, auth=None) -> dict:
    """POST a transaction Bundle to a FHIR server's base URL, one transaction per input
    (:func:`split_transaction`); returns one transaction-response Bundle with every entry's response. Results are
    created conditionally on their identifiers, so sending the same results again adds nothing.

    Raises:
        RetryableServerError: The server is unreachable or answered 429/5xx (send again later).
        FhirError: The server refused the Bundle (4xx), with its OperationOutcome's first issue.
    """
    import base64

    from cxr.core.security import split_url_credentials

    base_url, credentials = split_url_credentials(base_url)  # messages below show the URL without them
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    context = None
    if auth is not None:  # a cxr.core.security.HttpAuth: bearer token, client certificate, CA
        headers.update(auth.headers())
        context = auth.ssl_context() if base_url.lower().startswith("https:") else None
    if bundle_.get("type") == "transaction" and len(bundle_.get("entry", [])) > 3:
        parts = split_transaction(bundle_)
        if len(parts) > 1:
            responses = [_post(base_url, part, headers, timeout_s, context) for part in parts]
            return {"resourceType": "Bundle", "type": "transaction-response",
                    "entry": [e for r in responses for e in r.get("entry", [])]}
    return _post(base_url, bundle_, headers, timeout_s, context)


def _post(base_url: str, bundle_: dict, headers: dict, timeout_s: float, context=None) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/", data=json.dumps(bundle_).encode(), method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:  # noqa: S310 - the site's FHIR endpoint
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        if exc.code == 429 or exc.code >= 500:
            raise RetryableServerError(f"FHIR {base_url}: HTTP {exc.code}") from None
        try:
            issue = json.loads(body)["issue"][0]
            why = issue.get("diagnostics") or issue.get("details", {}).get("text") or issue.get("code")
        except (ValueError, KeyError, IndexError, TypeError):
            why = body[:200]
        raise FhirError(f"FHIR {base_url}: HTTP {exc.code}: {why}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RetryableServerError(f"FHIR {base_url}: {getattr(exc, 'reason', exc)}") from None


#: Audit events as FHIR AuditEvent types (DICOM's audit message IDs where one fits, this project's otherwise).
AUDIT_TYPES = {
    "received": ("http://dicom.nema.org/resources/ontology/DCM", "110107", "Import"),
    "screened": ("http://dicom.nema.org/resources/ontology/DCM", "110112", "Query"),
    "result_delivered": ("http://dicom.nema.org/resources/ontology/DCM", "110106", "Export"),
    "delivery_failed": ("http://dicom.nema.org/resources/ontology/DCM", "110106", "Export"),
    "model_changed": ("http://dicom.nema.org/resources/ontology/DCM", "110131", "Software Configuration"),
    "dropped": ("http://dicom.nema.org/resources/ontology/DCM", "110107", "Import"),
    "refused": ("http://dicom.nema.org/resources/ontology/DCM", "110126", "Node Authentication"),
    "admin_api": ("http://dicom.nema.org/resources/ontology/DCM", "110113", "Security Alert"),
    "started": ("http://dicom.nema.org/resources/ontology/DCM", "110120", "Application Start"),
    "stopped": ("http://dicom.nema.org/resources/ontology/DCM", "110121", "Application Stop"),
}


def audit_events(records: Sequence[dict]) -> dict:
    """The audit trail's records as a FHIR R4 ``collection`` Bundle of AuditEvents (validated).

    Each AuditEvent names the event (type), the time (recorded), the outcome (0 success, 8 serious failure), the
    actor (agent ``who.display``), and as entities the study and instance UIDs, the model's sha256 and the
    record itself (its hash and sequence number, with its details), so the export matches the trail line for line.
    """
    entries = []
    for rec in records:
        system, code, display = AUDIT_TYPES[rec["event"]]
        entities: list[dict] = [{"what": {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{uid}"}}, "name": kind}
                    for kind, uid in (("study", rec.get("study_uid")), ("instance", rec.get("instance_uid")))
                    if uid and not str(uid).startswith("sha256:")]
        if rec.get("instance_uid", "").startswith("sha256:"):
            entities.append({"what": {"identifier": {"system": "urn:ietf:rfc:6920", "value": rec["instance_uid"]}},
                             "name": "input"})
        if rec.get("model_sha256"):
            entities.append({"what": {"identifier": {"system": MODEL_SHA256, "value": rec["model_sha256"]}},
                             "name": "model"})
        entities.append({"what": {"identifier": {"system": "urn:cxr-triton:audit-record", "value": rec["hash"]}},
                         "name": f"record {rec['seq']}",
                         "detail": [{"type": k, "valueString": json.dumps(v)} for k, v in sorted(rec["detail"].items())
                                    if v is not None]})
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {
            "resourceType": "AuditEvent",
            "type": {"system": system, "code": code, "display": display},
            "subtype": [{"system": "urn:cxr-triton:audit-event", "code": rec["event"], "display": rec["event"]}],
            "recorded": rec["time"],
            "outcome": "0" if rec["outcome"] == "success" else "8",
            "agent": [{"who": {"display": rec["actor"]}, "requestor": True}],
            "source": {"observer": {"display": rec["component"]}},
            "entity": entities,
        }})
    out = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    validate(out)
    return out


@dataclass(frozen=True)
class FhirDelivery:
    """``cxr predict --fhir-out FILE`` and/or ``--fhir-url URL``: once the run is over, the answered inputs' results
    as one transaction Bundle, written to ``out`` and/or POSTed to ``url`` (the ``delivery`` of
    :func:`cxr.doors.predict.run_predict`).

    Attributes:
        out: The Bundle's file (JSON).
        url: A FHIR server's base URL.
        timeout_s: The POST's deadline.
        patient_id_system: The site's patient identifier system (a URI: its MRN system), for patients whose header
            names no IssuerOfPatientID.
        tries: POSTs before the results are left for a rerun, when the server is unreachable or answers 429/5xx.
        backoff_s: The wait after the first failed try; it doubles after each.
        study_rule: How a study's films make one answer (:func:`cxr.doors.dicom.study.combine`): the DICOM films
            of one study get one DiagnosticReport (``None``: one per film).
    """

    out: Path | None = None
    url: str | None = None
    timeout_s: float = 30.0
    patient_id_system: str | None = None
    tries: int = 4
    backoff_s: float = 1.0
    study_rule: StudyRule | None = None

    def __post_init__(self) -> None:
        if self.out is None and self.url is None:
            raise ValueError("FHIR delivery: give a file, a server's URL, or both")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if not 1 <= self.tries <= 20:
            raise ValueError("FHIR delivery: tries must be in 1..20")
        if not 0 <= self.backoff_s <= 600:
            raise ValueError("FHIR delivery: backoff_s must be in 0..600 seconds")
        if self.patient_id_system is not None and not re.match(r"^(urn:[a-z0-9][a-z0-9-]*:\S+|https?://\S+)$",
                                                               self.patient_id_system, re.I):
            raise ValueError(f"--patient-id-system must be a URI (urn:oid:..., http(s)://...), got "
                             f"{self.patient_id_system!r}")

    def _post(self, b: dict) -> dict:
        """POST with retries: an unreachable server or a 429/5xx answer is tried again after a growing wait (bounded
        by :attr:`tries`), a refusal (4xx) is not.

        Raises:
            RetryableServerError: Every try failed for now.
            FhirError: The server refused the results.
        """
        assert self.url is not None
        wait = self.backoff_s
        for attempt in range(1, self.tries + 1):
            try:
                return post_bundle(self.url, b, timeout_s=self.timeout_s)
            except RetryableServerError as exc:
                if attempt == self.tries:
                    raise
                print(f"FHIR: try {attempt} of {self.tries} failed ({exc}); trying again in {wait:.0f} s",
                      file=sys.stderr)
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def deliver(self, rows: list[dict], files: Mapping[str, Path], audit: AuditLog | None, actor: str) -> Delivered:
        """Write and/or POST the FHIR results of the answered ``rows`` (``files``: each row's ``path`` -> its file,
        whose DICOM header names the study), each delivery audited as ``actor``; how many results were not
        delivered, and whether a rerun can deliver them (the server was unreachable or failing for now)."""
        from cxr.client.batch import Delivered
        from cxr.client.results import from_row
        from cxr.core.durable import write_durably

        results, shas = [], []
        for r in rows:
            pred, sha = from_row(r)
            if pred.status is not contract.Status.ERROR:
                path = files.get(r["path"])
                results.append((pred, StudyRef.of_file(path) if path is not None else StudyRef()))
                shas.append(sha)
        b = bundle(results, patient_id_system=self.patient_id_system, study_rule=self.study_rule)
        if self.out is not None:
            write_durably(self.out, (json.dumps(b, indent=1) + "\n").encode())
            print(f"FHIR: {len(results)} results written to {self.out}", file=sys.stderr)
        failed, retryable = False, False
        if self.url is not None and results:
            try:
                resp = self._post(b)
                print(f"FHIR: {len(results)} results posted to {self.url} ({resp.get('type')})", file=sys.stderr)
            except RetryableServerError as exc:
                print(f"error: {exc}: {len(results)} results not delivered; rerun to deliver them", file=sys.stderr)
                failed, retryable = True, True
            except CxrError as exc:
                print(f"error: {exc}: {len(results)} results refused", file=sys.stderr)
                failed = True
        if audit is not None:
            dests = ([("fhir-file", False)] if self.out is not None else []) + (
                [("fhir-server", failed)] if self.url is not None else [])
            for (pred, study), sha in zip(results, shas):
                for dest, bad in dests:
                    audit.event("delivery_failed" if bad else "result_delivered", actor=actor,
                                outcome="failure" if bad else "success", study_uid=study.study_uid,
                                instance_uid=study.instance_uid or f"sha256:{sha}", model_sha256=pred.model_sha256,
                                destination=dest, **({"retry": retryable} if bad else {}))
        return Delivered(len(results) if failed else 0, retryable)

"""Amended study results (``cxr listen --study-quiet-s``): a film that arrives after its study was answered makes
the study answered again over all its films; the new SR names the earlier one in its Predecessor Documents Sequence
and takes the next Instance Number; the FHIR DiagnosticReport keeps its identifier and becomes `amended`. Against
Debian's Orthanc, the PACS the listener sends to."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pydicom
import pytest

from cxr.doors import fhir
from cxr.doors.dicom.sr import read_study_sr
from tests.conftest import wait_until
from tests.test_pacs import Orthanc, chest_dx, pacs, spool_idle, start_listener

pytestmark = pytest.mark.slow
assert pacs  # the fixture


def _films(study: str, n: int) -> list[bytes]:
    """``n`` frontal films of one study, Instance Numbers 1..n."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(io.BytesIO(chest_dx(120 + i, study=study)))
        ds.InstanceNumber = i + 1
        ds.AccessionNumber = "ACC-AMEND"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_a_late_film_amends_its_study_result(pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    from cxr.core.audit_trail import read

    orthanc, port = pacs
    audit, ndjson = tmp_path / "audit.jsonl", tmp_path / "fhir.ndjson"
    spool = tmp_path / "spool"
    study = pydicom.uid.generate_uid(entropy_srcs=["amended-study"])
    films = _films(study, 4)
    uids = [str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID) for f in films]
    ids = [orthanc.upload(f) for f in films]
    extra = ("--study-quiet-s", "1", "--audit-log", str(audit), "--fhir-out", str(ndjson))
    listener = start_listener(tmp_path, orthanc, port, extra=extra)
    try:
        orthanc.store_to_listener(ids[:3])
        wait_until(lambda: len(orthanc.srs_in_study(study)) == 1 and spool_idle(spool))
        (first,) = orthanc.srs_in_study(study)
        assert sorted(read_study_sr(first)["study"]["instance_uids"]) == sorted(uids[:3])
        assert int(first.InstanceNumber) == 1 and "PredecessorDocumentsSequence" not in first
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    # the fourth film comes after the quiet period, to a restarted listener: the study is answered again
    listener = start_listener(tmp_path, orthanc, port, extra=extra)
    try:
        orthanc.store_to_listener([ids[3]])
        wait_until(lambda: len(orthanc.srs_in_study(study)) == 2 and spool_idle(spool))
        last = max(orthanc.srs_in_study(study), key=lambda s: int(s.InstanceNumber))
        assert int(last.InstanceNumber) == 2
        content = read_study_sr(last)
        assert sorted(content["study"]["instance_uids"]) == sorted(uids)  # all four films
        assert sorted(f["instance_uid"] for f in content["films"]) == sorted(uids)
        (pre,) = last.PredecessorDocumentsSequence
        ref = pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
        assert last.SOPInstanceUID != first.SOPInstanceUID and last.StudyInstanceUID == study
        orthanc.store_to_listener(ids)  # everything again: duplicates, acknowledged and skipped
        wait_until(lambda: spool_idle(spool))
        assert len(orthanc.srs_in_study(study)) == 2
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    reports = [e for line in ndjson.read_text().splitlines() for e in json.loads(line)["entry"]
               if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert [r["resource"]["status"] for r in reports] == ["preliminary", "amended"]
    ident = {i["value"] for r in reports for i in r["resource"]["identifier"] if i.get("system") == fhir.RESULT_ID}
    assert len(ident) == 1  # the same report, updated in place
    assert reports[1]["request"]["method"] == "PUT" and len(reports[1]["resource"]["result"]) == 4
    studies = [r for r in read(audit) if r["event"] == "screened" and r["detail"].get("level") == "study"]
    assert [(r["detail"]["instances"], r["detail"]["version"]) for r in studies] == [(3, 1), (4, 2)]
    assert studies[1]["detail"]["amends"] == str(first.SOPInstanceUID)

"""The listener's smaller traps, without a server: a truncated film's refusal says what was wrong and where the file
is now; the spool's markers are pruned after the retention period; spool files are readable by the owner only."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from cxr.core.dicom import read_dicom
from cxr.core.errors import InvalidInputError
from cxr.doors.dicom.config import ListenConfig
from cxr.doors.dicom.results import ResultBuilder
from cxr.doors.dicom.spool import Spool
from cxr.doors.dicom.telemetry import Telemetry
from cxr.doors.dicom.worker import ScreeningWorker, StudyTracker
from tests.conftest import prediction
from tests.test_pacs import chest_dx


def test_a_truncated_film_is_refused_saying_what_was_wrong() -> None:
    data = chest_dx(3)
    with pytest.raises(InvalidInputError, match=r"x.dcm: DICOM pixel data truncated: \d+ of 524288 bytes"):
        read_dicom(data[: len(data) // 2], name="x.dcm")


def test_a_set_aside_reason_names_the_file_where_it_is_now(tmp_path: Path) -> None:
    cfg = ListenConfig(spool=tmp_path / "spool")
    spool = Spool(cfg.spool)
    uid = "1.2.3.4"
    spool.receive(uid, chest_dx(3)[:2000])
    worker = ScreeningWorker(cfg, spool, ResultBuilder(cfg), Telemetry(), StudyTracker(None), threading.Event(),
                             on_results=lambda: None)
    src = spool.incoming / f"{uid}.dcm"
    worker._set_aside(uid, "unreadable", f"unreadable: {src}: DICOM pixel data truncated: 1 of 2 bytes")
    why = json.loads((spool.dead_letter / f"{uid}.why").read_text())["reason"]
    assert str(spool.dead_letter / f"{uid}.dcm") in why and str(src) not in why and "truncated" in why
    assert (spool.dead_letter / f"{uid}.dcm").exists() and not src.exists()


def test_markers_older_than_the_retention_period_are_pruned(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    old, new = time.time() - 40 * 86400, time.time()
    for uid, when in (("1.1", old), ("1.2", new)):
        spool.receive(uid, b"DICM")
        spool.finish(uid, [("dimse", f"sr-{uid}.dcm", b"sr")])
        spool.sent(spool.outbox / f"sr-{uid}.dcm")
        for m in (spool.done / uid, spool.delivered / "dimse" / f"sr-{uid}.dcm"):
            os.utime(m, (when, when))
    answered = spool.answered / "1.9"
    answered.mkdir(parents=True)
    (answered / "report.json").write_text("{}")
    os.utime(answered / "report.json", (old, old))
    assert spool.prune(30 * 86400) == 3
    assert not spool.is_done("1.1") and spool.is_done("1.2")
    assert not spool.was_delivered("dimse", "sr-1.1.dcm") and spool.was_delivered("dimse", "sr-1.2.dcm")
    assert not answered.exists()
    assert spool.receive("1.1", b"DICM")  # an instance sent again after the retention period is screened again
    with pytest.raises(ValueError, match="--retention-days"):
        ListenConfig(spool=tmp_path, retention_days=0)


def test_spool_files_and_folders_are_the_owners_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.receive("1.5", b"DICM", urgent=True)
    spool.record_screened("1.5", {"key": ["1.5", "", ""]})
    spool.finish("1.5", [("dimse", "sr.dcm", b"sr")], urgent=True)
    files = [p for p in spool.root.rglob("*")]
    assert files
    for p in files:
        assert p.stat().st_mode & 0o077 == 0, (p, oct(p.stat().st_mode))
    assert spool.root.stat().st_mode & 0o777 == 0o700


def test_the_listeners_fhir_results_name_the_patient_in_the_sites_system(tmp_path: Path) -> None:
    import pydicom

    film = tmp_path / "film.dcm"
    film.write_bytes(chest_dx(7))
    ndjson = tmp_path / "fhir.ndjson"
    cfg = ListenConfig(spool=tmp_path / "spool", fhir_out=ndjson, patient_id_system="https://hospital.example/mrn")
    pred = prediction(source=str(film), label="Normal", probability=0.01, threshold=0.13,
                      model_name="pneumonia", model_version="1", model_sha256="ab" * 32, operating_point="adult")
    builder = ResultBuilder(cfg)
    builder.for_instance(film, pred, pydicom.dcmread(film, stop_before_pixels=True))
    builder.close()
    (line,) = ndjson.read_text().splitlines()
    subjects = [e["resource"]["subject"] for e in json.loads(line)["entry"] if "subject" in e["resource"]]
    assert subjects and all(s == {"type": "Patient", "identifier": {"value": "PAT007",
                                                                    "system": "https://hospital.example/mrn"}}
                            for s in subjects)
    with pytest.raises(ValueError, match="--fhir-url or --fhir-out"):
        ListenConfig(spool=tmp_path / "spool", patient_id_system="https://hospital.example/mrn")

"""The listener's results for a screened instance or study: the DICOM SR (:mod:`cxr.doors.dicom.sr`), the
Grad-CAM Secondary Capture (``--heatmap``), the FHIR transaction Bundle (``--fhir-url``, ``--fhir-out``) and the
CSV row (``--out``, the columns of ``cxr predict``). Each result is ``(destination, file name, bytes)`` for the
outbox of that destination (:class:`cxr.doors.dicom.spool.Spool`)."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cxr.core import imaging
from cxr.core.durable import AppendOnlyCsv, AppendOnlyLines
from cxr.core.errors import CxrError
from cxr.doors.dicom.config import ListenConfig

if TYPE_CHECKING:
    from pydicom import Dataset

    from cxr.client.client import Prediction
    from cxr.client.explain import GradCam
    from cxr.doors.dicom.study import StudyResult

#: One result: (destination kind ``dimse``, ``stow`` or ``fhir``; file name in its outbox; content).
Result = tuple[str, str, bytes]
#: A screened film of a study: (SOP Instance UID, its answer, its header, its file).
Film = tuple[str, "Prediction", "Dataset", Path]


def encode(ds: Dataset) -> bytes:
    """A dataset as a DICOM file's bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class ResultBuilder:
    """Makes every result of an answer, appends its CSV row and NDJSON line; :meth:`close` at the end."""

    def __init__(self, cfg: ListenConfig) -> None:
        from cxr.client.results import CSV_COLUMNS

        self.csv = AppendOnlyCsv(cfg.out, CSV_COLUMNS) if cfg.out else None  # the columns of cxr predict
        #: The keys of the rows written (SOP Instance UID, model sha256, operating point): one row per key.
        self._rows = {self._key(r) for r in (self.csv.rows if self.csv is not None else [])}
        self.fhir_lines = AppendOnlyLines(cfg.fhir_out) if cfg.fhir_out is not None else None
        #: The Bundles in the NDJSON file already (by :meth:`_bundle_key`): one line per result, crashes or not.
        self._lines: set[str] = set()
        if cfg.fhir_out is not None:
            with open(cfg.fhir_out, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        self._lines.add(self._bundle_key(json.loads(line)))
                    except (ValueError, KeyError, TypeError):
                        continue
        self.fhir_post = bool(cfg.fhir_url)
        self.patient_id_system = cfg.patient_id_system
        self.gradcam: GradCam | None = None
        self.positive_label = ""

    def explain(self, model_dir: Path, served_sha256: str | None, positive_label: str) -> None:
        """Also make the Grad-CAM overlay of the model in ``model_dir`` (it must be the served one) for answers
        labelled ``positive_label``."""
        from cxr.client.explain import ExplanationUnavailable, GradCam

        try:
            self.gradcam = GradCam(model_dir, served_sha256=served_sha256)
        except ExplanationUnavailable as exc:
            raise CxrError(f"--heatmap: {exc}") from None
        self.positive_label = positive_label

    def _heatmap_sc(self, film: Path, source: Dataset, pred: Prediction,
                    at: dt.datetime | None = None) -> tuple[str, bytes] | None:
        """The overlay as a Secondary Capture, for an answer that shows the positive label; else ``None``."""
        if self.gradcam is None or not pred.ok or pred.label != self.positive_label:
            return None
        from cxr.client.explain import film_for_display, overlay
        from cxr.doors.dicom.sr import build_heatmap_sc

        shown = film_for_display(film)
        heat = self.gradcam.heatmap(imaging.preprocess(film), size=(shown.shape[1], shown.shape[0]))
        sc = build_heatmap_sc(source, pred, overlay(shown, heat), unverified=self.gradcam.passes_check is False, at=at)
        return f"{sc.SOPInstanceUID}.dcm", encode(sc)

    def for_instance(self, f: Path, pred: Prediction, source: Dataset, *,
                     at: dt.datetime | None = None) -> list[Result]:
        """One instance's results: its SR (and heatmap) for the DICOM outboxes, its FHIR Bundle. ``at`` (when it
        was screened) dates them, so that results made again after a crash are the same bytes."""
        from cxr.doors.dicom.sr import build_sr

        sr = build_sr(source, pred, at=at)
        encoded = [(f"{sr.SOPInstanceUID}.dcm", encode(sr))]
        sc = self._heatmap_sc(f, source, pred, at)
        if sc is not None:
            encoded.append(sc)
        results = [(kind, name, data) for kind in ("dimse", "stow") for name, data in encoded]
        if self.fhir_post or self.fhir_lines is not None:
            results += self._fhir_instance(f, pred, f.stem)
        return results

    @staticmethod
    def _bundle_key(b: dict) -> str:
        """A Bundle's identity: its results' identifiers (and their statuses: an amendment is another line)."""
        keys = []
        for e in b["entry"]:
            r = e["resource"]
            ids = [str(i.get("value")) for i in r.get("identifier", []) if "value" in i]
            if ids:
                keys.append(f"{r['resourceType']}:{'|'.join(ids)}:{r.get('status', '')}")
        return "\n".join(sorted(keys))

    def _append_line(self, b: dict) -> None:
        """``b`` as one NDJSON line, unless the same results are in the file already (written before a crash)."""
        if self.fhir_lines is None:
            return
        key = self._bundle_key(b)
        if key in self._lines:
            return
        self.fhir_lines.append(json.dumps(b, separators=(",", ":")))
        self._lines.add(key)

    def _fhir_instance(self, f: Path, pred: Prediction, uid: str) -> list[Result]:
        """The instance's FHIR results: a transaction Bundle for the FHIR outbox, and (``--fhir-out``) the same
        Bundle appended as one line of the NDJSON file (linear: nothing written before is read or rewritten)."""
        from cxr.doors import fhir

        b = fhir.bundle([(pred, fhir.StudyRef.of_file(f))], patient_id_system=self.patient_id_system)
        self._append_line(b)
        return [("fhir", f"{uid}.json", json.dumps(b).encode())] if self.fhir_post else []

    def for_study(self, films: Sequence[Film], study: StudyResult, *, at: dt.datetime | None = None,
                  version: int = 1, predecessor: dict | None = None,
                  new: set[str] | None = None) -> tuple[list[Result], dict]:
        """A study's results: one SR for the study (and a heatmap per positive frontal film among ``new``, the
        films not answered before; all when ``None``), one FHIR Bundle; and the SR's identity (for the next
        amendment). ``version`` > 1 amends the study's earlier result ``predecessor`` (its identity)."""
        from cxr.doors import fhir
        from cxr.doors.dicom.sr import build_study_sr

        sr = build_study_sr([src for _, _, src, _ in films], [pred for _, pred, _, _ in films], study, at=at,
                            instance_number=version, predecessor=predecessor)
        encoded = [(f"{sr.SOPInstanceUID}.dcm", encode(sr))]
        for uid, pred, src, film in films:
            if uid in study.frontal and (new is None or uid in new):
                sc = self._heatmap_sc(film, src, pred, at)
                if sc is not None:
                    encoded.append(sc)
        results = [(kind, name, data) for kind in ("dimse", "stow") for name, data in encoded]
        if self.fhir_post or self.fhir_lines is not None:
            b = fhir.study_bundle([(pred, fhir.StudyRef.of_file(film)) for _, pred, _, film in films], study,
                                  amended=version > 1, patient_id_system=self.patient_id_system)
            self._append_line(b)
            if self.fhir_post:
                results.append(("fhir", f"{sr.SOPInstanceUID}.json", json.dumps(b).encode()))
        identity = {"sop_instance_uid": str(sr.SOPInstanceUID), "sop_class_uid": str(sr.SOPClassUID),
                    "series_instance_uid": str(sr.SeriesInstanceUID), "study_instance_uid": str(sr.StudyInstanceUID),
                    "instance_number": int(sr.InstanceNumber)}
        return results, identity

    @staticmethod
    def _key(row: dict) -> tuple[str, str, str]:
        return (str(row.get("sop_instance_uid") or ""), str(row.get("model_sha256") or ""),
                str(row.get("operating_point") or ""))

    def row(self, f: Path, pred: Prediction) -> None:
        """The instance's CSV row (``--out``), its path ``dicom:<SOP Instance UID>``; once per key (a row written
        before a crash is not written again)."""
        if self.csv is None:
            return
        from cxr.client.batch import file_sha256
        from cxr.client.results import to_row

        uid = f.stem
        row = to_row(pred, file_sha256(f))
        row["path"] = f"dicom:{uid}"
        row["sop_instance_uid"] = uid
        key = self._key(row)
        if key in self._rows:
            return
        self.csv.append([row])
        self._rows.add(key)

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.fhir_lines is not None:
            self.fhir_lines.close()

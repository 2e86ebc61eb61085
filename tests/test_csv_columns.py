"""CSV columns in the order people read them, and resume across the column orders of earlier releases."""

from __future__ import annotations

import csv
from pathlib import Path

from cxr.client.results import CSV_COLUMNS, JOURNAL_COLUMNS
from cxr.core.durable import AppendOnlyCsv

OLD_ORDER = ("path", "label", "probability", "threshold", "model_name", "model_version", "error", "sha256",
             "sop_instance_uid", "status", "reason", "ood_score", "retryable")


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_people_read_path_status_label_probability_threshold_point_reason_first() -> None:
    assert CSV_COLUMNS[:7] == ("path", "status", "label", "probability", "threshold", "operating_point", "reason")


def test_a_journal_of_an_earlier_release_keeps_its_rows_when_appended_to(tmp_path: Path) -> None:
    j = tmp_path / "r.csv.journal"
    with j.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=OLD_ORDER, lineterminator="\n")
        w.writeheader()
        w.writerow({k: "" for k in OLD_ORDER} | {"path": "a.png", "status": "ok", "label": "Normal", "probability": "0.1"})
    log = AppendOnlyCsv(j, JOURNAL_COLUMNS)
    log.append([{k: "" for k in JOURNAL_COLUMNS} | {"path": "b.png", "status": "not_assessable", "reason": "r"}])
    log.close()
    rows = _read(j)
    assert [(r["path"], r["status"], r["label"], r["reason"]) for r in rows] == [
        ("a.png", "ok", "Normal", ""), ("b.png", "not_assessable", "", "r")]


def test_a_journal_with_other_columns_is_rewritten_with_the_current_ones(tmp_path: Path) -> None:
    j = tmp_path / "r.csv.journal"
    j.write_text("path,label,probability\na.png,Pneumonia,0.9\n")
    log = AppendOnlyCsv(j, JOURNAL_COLUMNS)
    log.append([{k: "" for k in JOURNAL_COLUMNS} | {"path": "b.png", "status": "ok"}])
    log.close()
    with j.open(newline="") as fh:
        assert tuple(next(csv.reader(fh))) == JOURNAL_COLUMNS
    rows = _read(j)
    assert rows[0]["path"] == "a.png" and rows[0]["probability"] == "0.9" and rows[1]["status"] == "ok"

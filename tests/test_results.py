"""One result type, one codec: a Prediction goes to the CSV and comes back as the same numbers and refusal."""

from __future__ import annotations

import json

import pytest

from cxr.client.client import Prediction
from cxr.client.results import CSV_COLUMNS, JOURNAL_COLUMNS, as_json, from_row, refusal_text, table, to_row
from cxr.core import contract
from cxr.core.errors import DataError
from tests.conftest import REPO, cxr, prediction

SHA = "ab" * 32
THRESHOLD = 0.029920369386672974  # what a served config now carries, every digit


def _preds() -> list[Prediction]:
    ood = contract.not_assessable("c.png", "out_of_distribution", "ood_score 90.12 > 35.07", value=90.123456789012,
                                  limit=35.067726135253906)
    hdr = contract.not_assessable("d.dcm", "dicom_modality", "Modality 'CT' not in CR/DX", value="CT", limit="CR/DX")
    return [
        prediction(source="a.png", label="Pneumonia", probability=0.12345678901234567, threshold=THRESHOLD, model_version="1",
                   ood_score=12.345678901234567, ood_threshold=35.07, model_sha256=SHA),
        prediction("error", source="b.png", threshold=THRESHOLD, model_version="1", reason="b.png: server down",
                   retryable=True, model_sha256=SHA),
        prediction("not_assessable", source="c.png", threshold=THRESHOLD, model_version="1", reason=str(ood),
                   ood_score=90.123456789012, ood_threshold=35.067726135253906, refusal=contract.Refusal.of(ood),
                   model_sha256=SHA),
        prediction("not_assessable", source="d.dcm", threshold=THRESHOLD, model_version="1", reason=str(hdr),
                   sop_instance_uid="1.2.3", refusal=contract.Refusal.of(hdr), model_sha256=SHA),
    ]


@pytest.mark.parametrize("i", range(4))
def test_a_row_reads_back_to_the_same_prediction(i: int) -> None:
    pred = _preds()[i]
    row = to_row(pred, "f" * 64)
    assert tuple(row) == JOURNAL_COLUMNS and set(CSV_COLUMNS) <= set(row)
    back, sha = from_row(row, ood_threshold=pred.ood_threshold)
    assert back == pred and sha == "f" * 64  # every digit, the refusal's number or text, retryable


def test_the_refusal_travels_in_its_own_columns_not_in_the_reason() -> None:
    ood, hdr = (to_row(p, "") for p in _preds()[2:])
    assert (ood["rule"], float(ood["rule_value"]), float(ood["rule_limit"])) == (
        "out_of_distribution", 90.123456789012, 35.067726135253906)
    assert (hdr["rule"], json.loads(hdr["rule_value"]), json.loads(hdr["rule_limit"])) == ("dicom_modality", "CT", "CR/DX")
    row = dict(ood, reason="some other words entirely")  # the reason is for people; nothing reads it back
    assert from_row(row)[0].refusal == _preds()[2].refusal


def test_rows_this_codec_did_not_write_are_refused_in_one_line() -> None:
    old = {k: "" for k in JOURNAL_COLUMNS} | {"path": "x.png", "status": "not_assessable", "threshold": "0.5",
                                              "reason": "x.png: not assessable (blank_image): flat"}
    with pytest.raises(DataError, match="without its rule"):
        from_row(old)
    with pytest.raises(DataError, match="not a predictions row"):
        from_row({"path": "x.png", "status": "ok", "threshold": "zero"})


def test_json_and_table_present_numbers() -> None:
    preds = _preds()
    out = [as_json(p, "") for p in preds]
    assert out[0]["probability"] == 0.12345678901234567 and out[0]["threshold"] == THRESHOLD
    assert out[2]["refusal"] == {"rule": "out_of_distribution", "value": 90.123456789012, "limit": 35.067726135253906,
                                 "detail": "ood_score 90.12 > 35.07"}
    text = table(preds)
    assert "0.0299" in text and "0.123" in text and "90.12 (limit 35.07)" in text and "CT (limit CR/DX)" in text


def test_predict_json_carries_every_digit_of_the_served_numbers() -> None:
    """`cxr predict --format json` on the embedded model: the probability is the graph's float, not 4 decimals."""
    from cxr.client import PneumoniaClient

    files = [str(REPO / "examples" / "NORMAL" / "IM-0117-0001.jpeg"), str(REPO / "examples" / "not_chest" / "camera.png")]
    r = cxr("predict", "--protocol", "embedded", "--format", "json", *files, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    with PneumoniaClient(protocol="embedded") as c:
        direct = c.predict(files)
    assert got[0]["probability"] == direct[0].probability and got[0]["threshold"] == direct[0].threshold
    assert got[1]["status"] == "not_assessable" and got[1]["refusal"]["rule"] == direct[1].rule
    assert got[1]["refusal"]["value"] == direct[1].refusal.value  # type: ignore[union-attr]


# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


def _ok(source: str = "a", **kw) -> Prediction:  # type: ignore[no-untyped-def]
    return prediction(source=source, label="Pneumonia", probability=0.9995, threshold=0.25, model_version="3", **kw)


def _refused(value: float | str | None = 2.5, detail: str = "std low") -> Prediction:
    return prediction("not_assessable", source="b.dcm", threshold=0.25, model_version="3", reason="blank", refusal=contract.Refusal("blank_image", value, 8.0 if value is not None else None, detail))


def _error() -> Prediction:
    return prediction("error", source="c", threshold=0.25, model_version="3", reason="server down", retryable=True)


# guards cxr.client.results: to_row: an ok row's refusal and error cells stay empty
def test_an_ok_row_leaves_the_refusal_and_error_columns_empty() -> None:
    row = to_row(_ok(), "f" * 64)
    assert {k: row[k] for k in ("rule", "rule_value", "rule_limit", "rule_detail", "error", "retryable")} == {
        "rule": "", "rule_value": "", "rule_limit": "", "rule_detail": "", "error": "", "retryable": "0"}


# guards cxr.client.results: to_row: an error row's error, reason and retryable cells
def test_an_error_row_carries_its_failure_and_retryability() -> None:
    row = to_row(_error(), "")
    assert (row["error"], row["reason"], row["retryable"], row["status"]) == ("server down", "server down", "1", "error")


# guards cxr.client.results: to_row/from_row: a refusal without a measure round-trips as None
def test_a_refusal_that_measured_nothing_writes_empty_cells_and_reads_back_none() -> None:
    pred = _refused(value=None, detail="Modality is missing")
    row = to_row(pred, "")
    assert (row["rule_value"], row["rule_limit"]) == ("", "")
    back, _ = from_row(row)
    assert back.refusal == contract.Refusal("blank_image", None, None, "Modality is missing")


# guards cxr.client.results: from_row: the newer columns default to empty in older rows
def test_a_minimal_row_reads_back_with_empty_defaults() -> None:
    """Rows of older releases lack the newer columns: each reads back as empty (never None, never a guess)."""
    ok, sha = from_row({"path": "a", "status": "ok", "label": "Normal", "probability": "0.1",
                                "threshold": "0.5"})
    assert (ok.model_name, ok.model_version, ok.model_sha256, ok.operating_point, sha) == ("", "", "", "", "")
    refused, _ = from_row({"path": "b", "status": "not_assessable", "threshold": "0.5", "reason": "blank",
                                   "rule": "blank_image"})
    assert refused.refusal == contract.Refusal("blank_image", None, None, "")


# guards cxr.client.results: from_row: the operating point and the file's sha256 come back
def test_the_operating_point_reads_back() -> None:
    back, sha = from_row(to_row(_ok(operating_point="high"), "e" * 64))
    assert (back.operating_point, sha) == ("high", "e" * 64)


# guards cxr.client.results: from_row: its DataError messages for foreign rows
def test_rows_the_codec_did_not_write_are_refused_in_one_line_naming_the_file() -> None:
    with pytest.raises(DataError, match=r"^b: a not_assessable row without its rule \(written by a release before "
                                        r"the refusal had its own columns\)$"):
        from_row({"path": "b", "status": "not_assessable", "threshold": "0.5", "reason": "blank"})
    with pytest.raises(DataError, match=r"^x: not a predictions row \(ValueError: 'bogus' is not a valid Status\)$"):
        from_row({"path": "x", "status": "bogus", "threshold": "0.5"})


# guards cxr.client.results: as_json: every key, absent values as null
def test_as_json_is_the_prediction_with_absent_values_as_null() -> None:
    assert as_json(_refused(), "") == {
        "path": "b.dcm", "status": "not_assessable", "label": None, "probability": None, "threshold": 0.25,
        "operating_point": None, "reason": "blank",
        "refusal": {"rule": "blank_image", "value": 2.5, "limit": 8.0, "detail": "std low"},
        "ood_score": None, "model_name": "pneumonia", "model_version": "3", "model_sha256": None,
        "sop_instance_uid": None, "sha256": None, "error": None}
    assert as_json(_ok())["sha256"] is None
    pred = _ok(operating_point="high", model_sha256="m" * 64, sop_instance_uid="1.2.3", ood_score=0.5)
    assert as_json(pred, "s" * 64) == {
        "path": "a", "status": "ok", "label": "Pneumonia", "probability": 0.9995, "threshold": 0.25,
        "operating_point": "high", "reason": None, "refusal": None, "ood_score": 0.5, "model_name": "pneumonia",
        "model_version": "3", "model_sha256": "m" * 64, "sop_instance_uid": "1.2.3", "sha256": "s" * 64,
        "error": None}


# guards cxr.client.results: refusal_text: measure and limit, else detail, else the rule's meaning
def test_refusal_text_shows_the_measure_and_limit_else_the_detail_else_the_meaning() -> None:
    assert refusal_text(contract.Refusal("aspect_ratio", 3.14159, 3.0, "x")) == \
        "extreme aspect ratio: 3.142 (limit 3)"
    assert refusal_text(contract.Refusal("dicom_modality", None, None, "Modality is missing")) == \
        "DICOM Modality is not a radiograph (CR, DX): Modality is missing"
    assert refusal_text(contract.Refusal("dicom_modality")) == "DICOM Modality is not a radiograph (CR, DX)"


# guards cxr.client.results: table: columns, widths and the > 0.999 / < 0.001 ends
def test_the_terminal_table() -> None:
    low = prediction(source="d", label="Normal", probability=0.0004, threshold=0.25, model_version="3")
    assert table([_ok(operating_point="high"), _refused(), _error(), low]) == (
        "path   status          label      P(pneumonia)     thr  point       detail\n"
        "a      ok              Pneumonia       > 0.999  0.2500  high        pneumonia v3\n"
        "b.dcm  NOT_ASSESSABLE  -                     -  0.2500  -           "
        "blank_image: blank or near-constant image: 2.5 (limit 8)\n"
        "c      ERROR           -                     -  0.2500  -           server down\n"
        "d      ok              Normal          < 0.001  0.2500  -           pneumonia v3\n")
    # the path column is at least as wide as its heading
    assert table([_ok()]).splitlines()[1].startswith("a     ok ")


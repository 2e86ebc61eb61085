"""One result type, one codec: a Prediction goes to the CSV and comes back as the same numbers and refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cxr.client.client import Prediction
from cxr.client.results import CSV_COLUMNS, JOURNAL_COLUMNS, as_json, from_row, table, to_row
from cxr.core import contract
from cxr.core.errors import DataError
from tests.conftest import REPO

SHA = "ab" * 32
THRESHOLD = 0.029920369386672974  # what a served config now carries, every digit


def _preds() -> list[Prediction]:
    ood = contract.not_assessable("c.png", "out_of_distribution", "ood_score 90.12 > 35.07", value=90.123456789012,
                                  limit=35.067726135253906)
    hdr = contract.not_assessable("d.dcm", "dicom_modality", "Modality 'CT' not in CR/DX", value="CT", limit="CR/DX")
    return [
        Prediction(source="a.png", status=contract.Status.OK, label="Pneumonia", probability=0.12345678901234567, threshold=THRESHOLD, model_name="pneumonia", model_version="1",
                   ood_score=12.345678901234567, ood_threshold=35.07, model_sha256=SHA),
        Prediction(source="b.png", status=contract.Status.ERROR, label=None, probability=None, threshold=THRESHOLD, model_name="pneumonia", model_version="1", reason="b.png: server down",
                   retryable=True, model_sha256=SHA),
        Prediction(source="c.png", status=contract.Status.NOT_ASSESSABLE, label=None, probability=None, threshold=THRESHOLD, model_name="pneumonia", model_version="1", reason=str(ood),
                   ood_score=90.123456789012, ood_threshold=35.067726135253906, refusal=contract.Refusal.of(ood),
                   model_sha256=SHA),
        Prediction(source="d.dcm", status=contract.Status.NOT_ASSESSABLE, label=None, probability=None, threshold=THRESHOLD, model_name="pneumonia", model_version="1", reason=str(hdr),
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
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", "--protocol", "embedded", "--format", "json", *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    with PneumoniaClient(protocol="embedded") as c:
        direct = c.predict(files)
    assert got[0]["probability"] == direct[0].probability and got[0]["threshold"] == direct[0].threshold
    assert got[1]["status"] == "not_assessable" and got[1]["refusal"]["rule"] == direct[1].rule
    assert got[1]["refusal"]["value"] == direct[1].refusal.value  # type: ignore[union-attr]

"""Behaviour of the safety modules that the other tests left open, found by the mutation check
(``scripts/mutation.py``, docs/tests/mutation.md): each test pins a decision, a bound or a message that a mutant
changed without any other test noticing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from cxr.client import results
from cxr.client.client import Prediction
from cxr.core import contract, pixels, stats
from cxr.core.audit_trail import (
    GENESIS,
    AuditChainError,
    AuditLog,
    AuditRecord,
    Verification,
    read,
    record_hash,
    verify,
)
from cxr.core.durable import AppendOnlyCsv, AppendOnlyLines, write_durably
from cxr.core.eligibility import Condition, Eligibility, default_text
from cxr.core.errors import CalibrationError, CxrError, DataError, InvalidInputError, NotAssessableError
from cxr.site import site_audit as audit_mod
from cxr.train import metrics
from cxr.train.claims import patient_bootstrap
from cxr.train.evaluate import choose_threshold, operating_point, sensitivity_lower_bound

# --- the CSV codec and its presenters (cxr.client.results) ------------------------------------------------------


def _ok(source: str = "a", **kw) -> Prediction:  # type: ignore[no-untyped-def]
    return Prediction(source=source, status="ok", label="Pneumonia", probability=0.9995, threshold=0.25, model_name="pneumonia", model_version="3", **kw)


def _refused(value: float | str | None = 2.5, detail: str = "std low") -> Prediction:
    return Prediction(source="b.dcm", status="not_assessable", label=None, probability=None, threshold=0.25, model_name="pneumonia", model_version="3", reason="blank", refusal=contract.Refusal("blank_image", value, 8.0 if value is not None else None, detail))


def _error() -> Prediction:
    return Prediction(source="c", status="error", label=None, probability=None, threshold=0.25, model_name="pneumonia", model_version="3", reason="server down", retryable=True)


def test_an_ok_row_leaves_the_refusal_and_error_columns_empty() -> None:
    row = results.to_row(_ok(), "f" * 64)
    assert {k: row[k] for k in ("rule", "rule_value", "rule_limit", "rule_detail", "error", "retryable")} == {
        "rule": "", "rule_value": "", "rule_limit": "", "rule_detail": "", "error": "", "retryable": "0"}


def test_an_error_row_carries_its_failure_and_retryability() -> None:
    row = results.to_row(_error(), "")
    assert (row["error"], row["reason"], row["retryable"], row["status"]) == ("server down", "server down", "1", "error")


def test_a_refusal_that_measured_nothing_writes_empty_cells_and_reads_back_none() -> None:
    pred = _refused(value=None, detail="Modality is missing")
    row = results.to_row(pred, "")
    assert (row["rule_value"], row["rule_limit"]) == ("", "")
    back, _ = results.from_row(row)
    assert back.refusal == contract.Refusal("blank_image", None, None, "Modality is missing")


def test_a_minimal_row_reads_back_with_empty_defaults() -> None:
    """Rows of older releases lack the newer columns: each reads back as empty (never None, never a guess)."""
    ok, sha = results.from_row({"path": "a", "status": "ok", "label": "Normal", "probability": "0.1",
                                "threshold": "0.5"})
    assert (ok.model_name, ok.model_version, ok.model_sha256, ok.operating_point, sha) == ("", "", "", "", "")
    refused, _ = results.from_row({"path": "b", "status": "not_assessable", "threshold": "0.5", "reason": "blank",
                                   "rule": "blank_image"})
    assert refused.refusal == contract.Refusal("blank_image", None, None, "")


def test_the_operating_point_reads_back() -> None:
    back, sha = results.from_row(results.to_row(_ok(operating_point="high"), "e" * 64))
    assert (back.operating_point, sha) == ("high", "e" * 64)


def test_rows_the_codec_did_not_write_are_refused_in_one_line_naming_the_file() -> None:
    with pytest.raises(DataError, match=r"^b: a not_assessable row without its rule \(written by a release before "
                                        r"the refusal had its own columns\)$"):
        results.from_row({"path": "b", "status": "not_assessable", "threshold": "0.5", "reason": "blank"})
    with pytest.raises(DataError, match=r"^x: not a predictions row \(ValueError: 'bogus' is not a valid Status\)$"):
        results.from_row({"path": "x", "status": "bogus", "threshold": "0.5"})


def test_as_json_is_the_prediction_with_absent_values_as_null() -> None:
    assert results.as_json(_refused(), "") == {
        "path": "b.dcm", "status": "not_assessable", "label": None, "probability": None, "threshold": 0.25,
        "operating_point": None, "reason": "blank",
        "refusal": {"rule": "blank_image", "value": 2.5, "limit": 8.0, "detail": "std low"},
        "ood_score": None, "model_name": "pneumonia", "model_version": "3", "model_sha256": None,
        "sop_instance_uid": None, "sha256": None, "error": None}
    assert results.as_json(_ok())["sha256"] is None
    pred = _ok(operating_point="high", model_sha256="m" * 64, sop_instance_uid="1.2.3", ood_score=0.5)
    assert results.as_json(pred, "s" * 64) == {
        "path": "a", "status": "ok", "label": "Pneumonia", "probability": 0.9995, "threshold": 0.25,
        "operating_point": "high", "reason": None, "refusal": None, "ood_score": 0.5, "model_name": "pneumonia",
        "model_version": "3", "model_sha256": "m" * 64, "sop_instance_uid": "1.2.3", "sha256": "s" * 64,
        "error": None}


def test_refusal_text_shows_the_measure_and_limit_else_the_detail_else_the_meaning() -> None:
    assert results.refusal_text(contract.Refusal("aspect_ratio", 3.14159, 3.0, "x")) == \
        "extreme aspect ratio: 3.142 (limit 3)"
    assert results.refusal_text(contract.Refusal("dicom_modality", None, None, "Modality is missing")) == \
        "DICOM Modality is not a radiograph (CR, DX): Modality is missing"
    assert results.refusal_text(contract.Refusal("dicom_modality")) == "DICOM Modality is not a radiograph (CR, DX)"


def test_the_terminal_table() -> None:
    low = Prediction(source="d", status="ok", label="Normal", probability=0.0004, threshold=0.25, model_name="pneumonia", model_version="3")
    assert results.table([_ok(operating_point="high"), _refused(), _error(), low]) == (
        "path   status          label      P(pneumonia)     thr  point       detail\n"
        "a      ok              Pneumonia       > 0.999  0.2500  high        pneumonia v3\n"
        "b.dcm  NOT_ASSESSABLE  -                     -  0.2500  -           "
        "blank_image: blank or near-constant image: 2.5 (limit 8)\n"
        "c      ERROR           -                     -  0.2500  -           server down\n"
        "d      ok              Normal          < 0.001  0.2500  -           pneumonia v3\n")
    # the path column is at least as wide as its heading
    assert results.table([_ok()]).splitlines()[1].startswith("a     ok ")


# --- the threshold choice (cxr.train.evaluate) ------------------------------------------------------------------


def test_the_sensitivity_bound_refuses_what_it_cannot_bound() -> None:
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
            sensitivity_lower_bound(1, 2, confidence)
    for tp, n_pos in ((0, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match=rf"^need 0 <= tp <= n_pos and n_pos >= 1, got tp={tp}, n_pos={n_pos}$"):
            sensitivity_lower_bound(tp, n_pos, 0.9)
    # one positive, found: the one-sided 90% bound is exactly 0.1 (0.1 ** (1 / n) for n of n)
    assert sensitivity_lower_bound(1, 1, 0.9) == pytest.approx(0.1)
    assert sensitivity_lower_bound(0, 1, 0.9) == 0.0


def test_the_threshold_rule_refuses_targets_and_confidences_out_of_range() -> None:
    y, p = np.array([0, 1, 1]), np.array([0.1, 0.5, 0.9])
    for target in (0.0, 1.5):
        with pytest.raises(CalibrationError, match=rf"^target must be in \(0, 1\], got {target}$"):
            choose_threshold(y, p, rule="sensitivity", target=target)
    for confidence in (0.0, 1.0):
        with pytest.raises(CalibrationError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
            choose_threshold(y, p, rule="sensitivity_lcb", target=0.5, confidence=confidence)
    with pytest.raises(CalibrationError, match=r"^unknown rule 'best'$"):
        choose_threshold(y, p, rule="best")
    with pytest.raises(CalibrationError, match=r"use a larger sample or a lower confidence$"):
        choose_threshold(y, p, rule="sensitivity_lcb", target=0.99)


def test_the_threshold_rule_defaults_to_95_percent_at_90_percent_confidence() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(300, int), np.zeros(300, int)]
    p = np.clip(np.r_[rng.normal(0.7, 0.15, 300), rng.normal(0.3, 0.15, 300)], 0, 1)
    assert choose_threshold(y, p, rule="sensitivity_lcb") == \
        choose_threshold(y, p, rule="sensitivity_lcb", target=0.95, confidence=0.9)


def test_a_bound_that_exactly_meets_the_target_is_enough() -> None:
    """``>=``: with every one of 5 positives found the bound is 0.1 ** (1/5); that target is met, not missed."""
    y, p = np.array([0, 1, 1, 1, 1, 1]), np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.9])
    target = sensitivity_lower_bound(5, 5, 0.9)
    assert choose_threshold(y, p, rule="sensitivity_lcb", target=target, confidence=0.9) == pytest.approx(0.3)


def test_the_threshold_lies_midway_to_the_next_lower_score_or_on_the_lowest() -> None:
    assert choose_threshold([0, 0, 1, 1], [0.2, 0.4, 0.6, 0.8], rule="sensitivity", target=1.0) == pytest.approx(0.5)
    # the lowest score chosen: nothing below it, the threshold is that score
    assert choose_threshold([1, 0, 1], [0.1, 0.5, 0.9], rule="sensitivity", target=1.0) == pytest.approx(0.1)
    # a threshold of 1 would refer nothing: it is kept just below 1
    assert choose_threshold([1, 0], [1.0, 1.0], rule="sensitivity", target=1.0) == 1 - 1e-6


def test_the_operating_point_counts_and_bounds() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.3, 0.1, 0.05])
    op = operating_point(y, p, 0.5)
    assert op["confidence"] == 0.9
    assert (op["tp"], op["n_pos"], op["tn"], op["n_neg"]) == (2, 3, 3, 4)
    assert op["sensitivity_lower_bound"] == pytest.approx(sensitivity_lower_bound(2, 3, 0.9))
    assert op["specificity_lower_bound"] == pytest.approx(sensitivity_lower_bound(3, 4, 0.9))
    only_neg = operating_point(np.zeros(3, int), np.array([0.1, 0.2, 0.9]), 0.5)
    assert math.isnan(only_neg["sensitivity_lower_bound"]) and only_neg["tn"] == 2
    only_pos = operating_point(np.ones(3, int), np.array([0.1, 0.6, 0.9]), 0.5)
    assert math.isnan(only_pos["specificity_lower_bound"]) and only_pos["tp"] == 2


# --- durable writes (cxr.core.durable) --------------------------------------------------------------------------


def test_write_durably_sets_the_mode_asked_else_the_umask_default(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        write_durably(tmp_path / "secret", b"k", mode=0o600)
        write_durably(tmp_path / "plain", b"p")
    finally:
        os.umask(umask)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret").read_bytes() == b"k" and not list(tmp_path.glob(".*.tmp"))


def test_a_new_csv_gets_its_header_once_and_rows_in_its_column_order(tmp_path: Path) -> None:
    path = tmp_path / "new.csv"
    log = AppendOnlyCsv(path, ("a", "b"))
    log.append([{"a": "1", "b": "x,y", "extra": "dropped"}])
    log.close()
    assert path.read_bytes() == b'a,b\n1,"x,y"\n'
    again = AppendOnlyCsv(path, ("a", "b"))
    again.append([{"b": "2", "a": "ä"}])
    again.close()
    assert again.rows == [{"a": "1", "b": "x,y"}]
    assert path.read_bytes() == 'a,b\n1,"x,y"\nä,2\n'.encode()


def test_an_empty_csv_gets_its_header_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        AppendOnlyCsv(path, ("a", "b")).close()
    assert path.read_bytes() == b"a,b\n" and not caplog.records


def test_a_csv_with_the_same_columns_in_another_order_keeps_its_order(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_bytes(b"b,a\n1,2\n")
    log = AppendOnlyCsv(path, ("a", "b"))
    log.append([{"a": "3", "b": "4"}])
    log.close()
    assert log.columns == ("b", "a") and path.read_bytes() == b"b,a\n1,2\n4,3\n"


def test_a_csv_with_other_columns_is_rewritten_dropping_the_columns_gone(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_bytes(b"a,legacy\n1,x\n")
    AppendOnlyCsv(path, ("a", "b")).close()
    assert path.read_bytes() == b"a,b\n1,\n"


def test_a_torn_last_csv_row_is_dropped_on_disk_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "torn.csv"
    path.write_bytes(b"a,b\n1,2\n3,4\n5,")
    with caplog.at_level(logging.WARNING, logger="cxr.core.durable"):
        log = AppendOnlyCsv(path, ("a", "b"))
    log.close()
    assert log.rows == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    assert path.read_bytes() == b"a,b\n1,2\n3,4\n"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: dropping a partial last row left by an interrupted run"]


def test_lines_append_refuses_a_line_break_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    lines = AppendOnlyLines(path)
    lines.append("one")
    for bad in ("two\nthree", "two\rthree"):
        with pytest.raises(ValueError, match="^a line must not contain a line break$"):
            lines.append(bad)
    lines.close()
    assert path.read_bytes() == b"one\n"


def test_the_last_line_is_found_across_read_blocks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The last newline is searched backwards in 64 KiB blocks: a last line longer than a block, a newline at the
    very start of the file, and a file whose only line is torn."""
    path = tmp_path / "long.jsonl"
    long = "x" * 70_000
    path.write_bytes(f"first\n{long}\n".encode())
    lines = AppendOnlyLines(path)
    assert lines.last == long
    lines.close()
    path.write_bytes(b"\n" + b"y" * 70_000 + b"\n")
    assert AppendOnlyLines(path).last == "y" * 70_000
    path.write_bytes(b"\n" + b"z" * 5)  # torn after an empty first line
    with caplog.at_level(logging.WARNING, logger="cxr.core.durable"):
        cut = AppendOnlyLines(path)
    assert path.read_bytes() == b"\n" and cut.last == ""
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: cutting a partial last line left by an interrupted run"]
    path.write_bytes(b"w" * 70_000)  # one torn line, no newline at all: cut to nothing
    assert AppendOnlyLines(path).last is None and path.read_bytes() == b""


# --- the audit chain (cxr.core.audit_trail) ---------------------------------------------------------------------


def _chain(path: Path, n: int = 4) -> list[dict]:
    with AuditLog(path, component="test") as log:
        return [log.event("screened", actor="ae:MODALITY", instance_uid=f"1.2.{i}", status="ok") for i in range(n)]


def _line(rec: dict) -> str:
    rec = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = record_hash(rec)
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


def test_verify_says_exactly_where_and_why_the_chain_breaks(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    recs = _chain(path)
    good = path.read_text().splitlines()
    h = [r["hash"] for r in recs]

    def check(lines: list[str], expected: Verification, **kw: str) -> None:
        path.write_text("\n".join(lines) + "\n")
        assert verify(path, **kw) == expected

    check(good, Verification(True, 4, h[3]))
    check([*good[:2], "{not json", *good[2:]], Verification(False, 2, h[1], 3, "line 3 is not a JSON record"))
    check([*good[:2], "[1, 2]"], Verification(False, 2, h[1], 3, "line 3 does not carry the hash of line 2 (a line "
                                                                  "before it was edited, inserted or deleted)"))
    check(good[1:], Verification(False, 0, GENESIS, 1, "line 1 does not start the chain (the trail's first lines "
                                                         "were deleted)"))
    check([good[0], good[2]], Verification(False, 1, h[0], 2, "line 2 does not carry the hash of line 1 (a line "
                                                                "before it was edited, inserted or deleted)"))
    edited = good[1].replace("1.2.1", "1.2.9")
    check([good[0], edited], Verification(False, 1, h[0], 2, "line 2 was edited (its content does not match its hash)"))
    check([good[0], _line({**recs[1], "seq": 7})],
          Verification(False, 1, h[0], 2, "line 2 has sequence number 7, expected 2"))
    check([good[0], _line({**recs[1], "event": "coffee"})],
          Verification(False, 1, h[0], 2, "line 2 has an unknown event 'coffee'"))
    check(good[:2], Verification(False, 2, h[1], None, "the last record is not the one filed (the trail's tail was "
                                                         "removed or replaced)"), expect_last_hash=h[3])
    check(good, Verification(True, 4, h[3]), expect_last_hash=h[3])


def test_an_unreadable_trail_and_a_broken_read_say_so_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(AuditChainError, match=rf"^{missing}: cannot read the audit trail \(FileNotFoundError\)$"):
        verify(missing)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(AuditChainError, match=r"cannot read the audit trail \(UnicodeDecodeError\)$"):
        verify(path)
    path = tmp_path / "b.jsonl"
    _chain(path, 2)
    assert [r["instance_uid"] for r in read(path)] == ["1.2.0", "1.2.1"]
    path.write_text(path.read_text().splitlines()[1] + "\n")
    with pytest.raises(AuditChainError, match=rf"^{path}: line 1 does not start the chain"):
        read(path)


# --- the DICOM eligibility rules (cxr.core.eligibility) ---------------------------------------------------------


def _refusal(cond: Condition, value: object) -> tuple[str, str, object, object, str]:
    with pytest.raises(NotAssessableError) as e:
        cond.check(value, "x.dcm")
    return str(e.value), e.value.rule, e.value.value, e.value.limit, e.value.detail


def test_a_condition_refuses_with_the_rule_what_it_read_and_the_limit() -> None:
    modality = Condition("Modality", "dicom_modality", allowed=("CR", "DX"), if_absent="refuse")
    assert _refusal(modality, None) == ("x.dcm: not assessable (dicom_modality): Modality is missing",
                                        "dicom_modality", None, None, "Modality is missing")
    assert _refusal(modality, " MR ") == ("x.dcm: not assessable (dicom_modality): Modality 'MR' not in CR/DX",
                                          "dicom_modality", "MR", "CR/DX", "Modality 'MR' not in CR/DX")
    modality.check("dx", "x.dcm")  # case-insensitive
    frames = Condition("NumberOfFrames", "dicom_frames", max=1)
    frames.check("1", "x.dcm")  # at the limit: accepted
    frames.check("", "x.dcm")  # absent, if_absent accept
    assert _refusal(frames, "2") == ("x.dcm: not assessable (dicom_frames): NumberOfFrames 2 > 1",
                                     "dicom_frames", 2.0, 1, "NumberOfFrames 2 > 1")
    assert _refusal(frames, "two") == ("x.dcm: not assessable (dicom_frames): NumberOfFrames 'two' is not a number",
                                       "dicom_frames", "two", 1, "NumberOfFrames 'two' is not a number")


def test_a_header_without_attributes_meets_only_the_conditions_that_accept_absence() -> None:
    rules = Eligibility.from_json(json.dumps({"schema": "cxr-eligibility/1", "conditions": {
        "BodyPartExamined": {"rule": "dicom_body_part", "allowed": ["CHEST"]},
        "NumberOfFrames": {"rule": "dicom_frames", "max": 1}}}))
    rules.check(object(), "x.dcm")  # no .get at all: every attribute absent
    assert rules.passes(object()) and not rules.passes({"BodyPartExamined": "HAND"})


def test_eligibility_files_load_or_say_why_not(tmp_path: Path) -> None:
    path = tmp_path / "eligibility.json"
    path.write_text(default_text())
    assert Eligibility.load(path) == Eligibility.default()
    with pytest.raises(CxrError, match=rf"^cannot read eligibility rules {tmp_path / 'none.json'}: "
                                       r"No such file or directory$"):
        Eligibility.load(tmp_path / "none.json")


# --- the contract (cxr.core.contract) ---------------------------------------------------------------------------


def test_the_population_of_an_age() -> None:
    assert [contract.population_for_age(a) for a in (0, 17.9, 18, 80)] == ["pediatric", "pediatric", "adult", "adult"]
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match=rf"^age must be >= 0 years, got {bad}$"):
            contract.population_for_age(bad)


def test_probabilities_for_people_at_the_ends() -> None:
    assert [contract.format_probability(p) for p in (0.0009, 0.001, 0.5, 0.999, 0.9991)] == [
        "< 0.001", "0.001", "0.500", "0.999", "> 0.999"]


def test_validate_batch_sizes_and_messages() -> None:
    one = np.zeros((1, *contract.IMAGE_SHAPE), np.uint8)
    assert contract.validate_batch(one) is one
    two = np.zeros((2, *contract.IMAGE_SHAPE), np.uint8)
    assert contract.validate_batch(two, max_batch_size=2) is two
    with pytest.raises(InvalidInputError, match=r"^batch: batch of 2 exceeds max_batch_size 1$"):
        contract.validate_batch(two, max_batch_size=1)
    with pytest.raises(InvalidInputError, match=r"^batch: expected numpy.ndarray, got list$"):
        contract.validate_batch([1])  # type: ignore[arg-type]
    shape = ", ".join(map(str, contract.IMAGE_SHAPE))
    with pytest.raises(InvalidInputError, match=rf"^batch: shape must be \(N, {shape}\), got \(0, {shape}\)$"):
        contract.validate_batch(np.zeros((0, *contract.IMAGE_SHAPE), np.uint8))


# --- the pixel rules (cxr.core.pixels) --------------------------------------------------------------------------


def _refused_by(gray: np.ndarray, chroma: float = 0.0) -> tuple[str, str, object, object]:
    with pytest.raises(NotAssessableError) as e:
        pixels.assess_pixels(gray, "x.png", chroma=chroma)
    return str(e.value), e.value.rule, e.value.value, e.value.limit


def _textured(h: int, w: int) -> np.ndarray:
    return (np.indices((h, w)).sum(axis=0) * 7 % 256).astype(np.uint8)


def test_grey_conversion_of_every_layout() -> None:
    assert pixels.to_gray_u8(np.full((2, 2, 1), 9, np.uint8), "x").tolist() == [[9, 9], [9, 9]]
    red = np.zeros((1, 2, 3), np.uint8)
    red[0, 0] = (255, 0, 0)  # ITU-R 601 luma of pure red: 76.245
    assert pixels.to_gray_u8(red, "x").tolist() == [[76, 0]]
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (0, 255, 0, 255)
    assert pixels.to_gray_u8(rgba, "x").tolist() == [[150, 0]]
    deep = np.zeros((1, 2, 3), np.uint16)
    deep[0, 0] = (0, 0, 4000)  # float luma, windowed to the full range
    assert pixels.to_gray_u8(deep, "x").tolist() == [[255, 0]]
    assert pixels.to_gray_u8(np.array([[True, False]]), "x").tolist() == [[255, 0]]
    assert pixels.to_gray_u8(np.array([[0, 1000, 500]], np.uint16), "x").tolist() == [[0, 255, 128]]
    assert pixels.to_gray_u8(np.array([[0.0, 0.25, 1.0]]), "x").tolist() == [[0, 64, 255]]
    assert pixels.to_gray_u8(np.full((2, 2), 700, np.uint16), "x").tolist() == [[0, 0], [0, 0]]
    out = pixels.to_gray_u8(np.array([[3, 4]], np.int32), "x")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 255]]


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((2, 2, 5), np.uint8), "x: unsupported channel count 5"),
    (np.zeros((2, 2, 2), np.uint8), "x: unsupported channel count 2"),
    (np.zeros(4, np.uint8), "x: expected a 2-D or 3-D pixel array, got shape (4,)"),
    (np.zeros((2, 2), np.complex128), "x: unsupported pixel dtype complex128"),
    (np.array([[0.0, np.nan]]), "x: pixel data contains NaN or Inf"),
    (np.array([[0.0, np.inf]]), "x: pixel data contains NaN or Inf"),
])
def test_grey_conversion_refuses_what_it_cannot_read(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        pixels.to_gray_u8(array, "x")
    assert str(e.value) == message


def test_the_aspect_ratio_rule_at_its_limit() -> None:
    pixels.assess_pixels(_textured(100, 250), "x.png")  # 2.5 exactly: accepted
    pixels.assess_pixels(_textured(250, 100), "x.png")
    assert _refused_by(_textured(100, 251)) == (
        "x.png: not assessable (aspect_ratio): 251x100 px, ratio 2.51 > 2.5", "aspect_ratio", 2.51, 2.5)


def test_the_colour_rule_at_its_limit() -> None:
    pixels.assess_pixels(_textured(64, 64), "x.png", chroma=12.0)
    assert _refused_by(_textured(64, 64), chroma=12.5) == (
        "x.png: not assessable (colour_image): mean chroma 12.5 > 12.0", "colour_image", 12.5, 12.0)


def test_the_blank_rule_reports_the_measure_that_failed() -> None:
    flat = np.full((64, 64), 120, np.uint8)
    assert _refused_by(flat) == ("x.png: not assessable (blank_image): grey-level std 0.0 (min 8.0), 1-99% spread 0 "
                                 "(min 32)", "blank_image", 0.0, 8.0)
    # high enough std but a narrow spread: two levels 20 apart, std 10
    two = np.full((64, 64), 100, np.uint8)
    two[:, 32:] = 120
    message, rule, value, limit = _refused_by(two)
    assert (rule, value, limit) == ("blank_image", 20.0, 32.0) and "grey-level std 10.0" in message
    # a spread of exactly 32 with std above 8 is assessable
    wide = np.full((64, 64), 100, np.uint8)
    wide[:, 32:] = 132
    pixels.assess_pixels(wide, "x.png")


def test_chroma_of_grey_colour_and_deep_images() -> None:
    assert pixels.chroma_of(np.full((4, 4, 3), 77, np.uint8)) == 0.0
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert pixels.chroma_of(red) == 255.0
    deep = np.zeros((4, 4, 4), np.uint16)
    deep[..., 1] = 65535  # the alpha channel is not a colour
    deep[..., 3] = 1
    assert pixels.chroma_of(deep) == pytest.approx(255.0)
    big = np.zeros((1000, 1000, 3), np.uint8)
    big[::2, ::2, 0] = 200  # sampled every 2nd pixel (at most ~250k): only the coloured ones are seen
    assert pixels.chroma_of(big) == pytest.approx(200.0)


def test_the_size_guards_at_their_limits() -> None:
    pixels.check_size(32, 32, "x")
    pixels.check_size(8000, 5000, "x")  # 40,000,000 pixels exactly
    with pytest.raises(InvalidInputError) as e:
        pixels.check_size(8001, 5000, "x")
    assert str(e.value) == ("x: image too large (8001x5000 = 40005000 pixels > 40000000); refusing to decode "
                            "(decompression-bomb guard)")
    with pytest.raises(InvalidInputError) as e:
        pixels.check_size(31, 500, "x")
    assert str(e.value) == "x: image too small (31x500); need at least 32 px per side"


def test_resize_to_the_model_input() -> None:
    same = _textured(224, 224)
    assert np.array_equal(pixels.resize(same)[..., 0], same)
    out = pixels.resize(_textured(100, 300))
    assert out.shape == contract.IMAGE_SHAPE and out.dtype == np.uint8


# --- the go/no-go (cxr.site.site_audit) -----------------------------------------------------------------------------


def _films() -> list[audit_mod.Screened]:
    ok, na = contract.Status.OK, contract.Status.NOT_ASSESSABLE
    probs = [(1, 0.9), (1, 0.8), (1, 0.7), (1, 0.3), (1, 0.65), (0, 0.1), (0, 0.2), (0, 0.6), (0, 0.05), (0, 0.15),
             (0, 0.25), (1, 0.95)]
    films = [audit_mod.Screened(f"f{i}.png", y, ok, p, ood_score=0.1 * i, patient=f"p{i // 2}")
             for i, (y, p) in enumerate(probs)]
    films.append(audit_mod.Screened("r0.png", 0, na, rule="blank_image", patient="p9"))
    films.append(audit_mod.Screened("r1.png", 1, na, rule="aspect_ratio", ood_score=2.0, patient="p9"))
    return films


def _keys(d: object, prefix: str = "") -> set[str]:
    if not isinstance(d, dict):
        return set()
    return {f"{prefix}{k}" for k in d} | {p for k, v in d.items() for p in _keys(v, f"{prefix}{k}.")}


def test_the_audit_result_names_every_figure_it_reports() -> None:
    r = audit_mod.audit(_films(), threshold=0.5, targets=audit_mod.Targets(), n_boot=50,
                        reference={"ood_score": [0.1, 0.2], "ood_threshold": 1.5})
    top = {"n", "threshold", "counts", "confidence", "patients", "patients_known", "flagged", "sensitivity",
           "specificity", "referrals_count_as_positive", "roc_auc", "calibration", "ood_score", "refused", "targets",
           "checks", "go", "confidence_allows_go", "needs_if_no"}
    assert set(r) == top
    assert set(r["counts"]["Normal"]) == {"films", "flagged", "flagged_rate"}
    assert set(r["roc_auc"]) == {"value", "se", "bound", "n", "positives", "negatives", "by", "confidence", "films"}
    assert set(r["calibration"]) == {"ece", "bins"}
    assert set(r["checks"]["flagged"]) == {"value", "op", "target", "holds", "bound", "point_meets_target"}
    assert (r["n"], r["threshold"], r["confidence"], r["patients"], r["patients_known"]) == (14, 0.5, 0.95, 7, True)
    assert r["referrals_count_as_positive"] is True
    assert r["counts"] == {"Normal": {"films": 7, "flagged": 1, "flagged_rate": 1 / 7},
                           "Pneumonia": {"films": 7, "flagged": 1, "flagged_rate": 1 / 7}}
    # referred: every refused film, and ok films at p >= 0.5
    assert r["sensitivity"]["k"] == 6 and r["sensitivity"]["n"] == 7
    assert r["specificity"]["k"] == 5 and r["specificity"]["n"] == 7
    assert r["flagged"]["k"] == 2 and r["flagged"]["n"] == 14
    # the AUC is by patient: a patient's largest score, Pneumonia when any film is (p0..p5 answered; p9 refused)
    yp, pp = np.array([1, 1, 1, 0, 0, 1]), np.array([0.9, 0.7, 0.65, 0.6, 0.15, 0.95])
    assert (r["roc_auc"]["films"], r["roc_auc"]["n"], r["roc_auc"]["positives"]) == (12, 6, 4)
    assert r["roc_auc"]["value"] == pytest.approx(metrics.roc_auc(yp, pp))
    assert r["roc_auc"]["bound"] == pytest.approx(stats.auc_bound(yp, pp).lower)
    assert r["ood_score"] == {"values": pytest.approx([0.1 * i for i in range(12)] + [2.0]),
                              "reference": [0.1, 0.2], "threshold": 1.5}
    assert r["refused"] == [{"path": "r0.png", "label": "Normal", "status": "not_assessable", "rule": "blank_image"},
                            {"path": "r1.png", "label": "Pneumonia", "status": "not_assessable",
                             "rule": "aspect_ratio"}]
    assert r["targets"] == {"sensitivity": 0.9, "specificity": 0.6, "roc_auc": 0.85, "flagged": 0.02}
    assert {k: (c["op"], c["target"]) for k, c in r["checks"].items()} == {
        "sensitivity": (">=", 0.9), "specificity": (">=", 0.6), "roc_auc": (">=", 0.85), "flagged": ("<=", 0.02)}
    # the bounds: the more cautious of the exact one-sided bound and the patient bootstrap's
    y = np.array([f.label for f in _films()])
    p = np.array([f.probability if f.probability is not None else np.nan for f in _films()])
    boot = patient_bootstrap(y, p, [f.patient for f in _films()], 0.5, n_boot=50,
                              confidence=2 * 0.95 - 1)
    assert r["checks"]["sensitivity"]["bound"] == min(audit_mod.lower_bound(6, 7), boot["sensitivity"][1])
    assert r["checks"]["specificity"]["bound"] == min(audit_mod.lower_bound(5, 7), boot["specificity"][1])
    assert r["checks"]["roc_auc"]["bound"] == r["roc_auc"]["bound"] and r["checks"]["roc_auc"]["value"] == r[
        "roc_auc"]["value"]
    assert r["checks"]["flagged"]["bound"] == max(audit_mod.upper_bound(2, 14), boot["flagged"][2])
    assert r["checks"]["flagged"]["value"] == 2 / 14 and r["go"] is False


def test_go_holds_when_every_bound_exactly_meets_its_target() -> None:
    first = audit_mod.audit(_films(), threshold=0.5, targets=audit_mod.Targets(), n_boot=50)
    met = audit_mod.Targets(**{k: c["bound"] for k, c in first["checks"].items()})
    r = audit_mod.audit(_films(), threshold=0.5, targets=met, n_boot=50)
    assert r["go"] is True and all(c["holds"] for c in r["checks"].values())
    at_point = audit_mod.Targets(**{k: c["value"] for k, c in first["checks"].items()})
    r = audit_mod.audit(_films(), threshold=0.5, targets=at_point, n_boot=50)
    assert all(c["point_meets_target"] for c in r["checks"].values())
    assert not r["checks"]["sensitivity"]["holds"] and not r["go"]


def test_the_audit_of_a_one_class_sample() -> None:
    pos = [f for f in _films() if f.label == 1]
    r = audit_mod.audit(pos, threshold=0.5, targets=audit_mod.Targets(), n_boot=50)
    assert r["calibration"] is None and r["counts"]["Normal"]["films"] == 0
    assert math.isnan(r["counts"]["Normal"]["flagged_rate"])
    assert math.isnan(r["roc_auc"]["value"]) and r["roc_auc"]["films"] == 6 and r["roc_auc"]["n"] == 4
    assert math.isnan(r["roc_auc"]["bound"]) and math.isnan(r["roc_auc"]["se"])
    assert math.isnan(r["checks"]["specificity"]["bound"]) and not r["checks"]["specificity"]["holds"]
    assert not r["checks"]["specificity"]["point_meets_target"]
    assert r["checks"]["sensitivity"]["bound"] <= audit_mod.lower_bound(6, 7)


def test_the_audit_bootstraps_1000_times_by_default() -> None:
    films = _films()
    default = audit_mod.audit(films, threshold=0.5, targets=audit_mod.Targets())
    explicit = audit_mod.audit(films, threshold=0.5, targets=audit_mod.Targets(), n_boot=1000, confidence=0.95)
    assert json.dumps(default, default=str) == json.dumps(explicit, default=str)


def test_targets_screened_and_needs_validate() -> None:
    audit_mod.Targets(sensitivity=1.0, specificity=0.0, roc_auc=1, flagged=0)
    for bad in (-0.1, 1.1, "0.9"):
        with pytest.raises(ValueError, match=rf"^target sensitivity must be in \[0, 1\], got {bad!r}$"):
            audit_mod.Targets(sensitivity=bad)  # type: ignore[arg-type]
    s = audit_mod.Screened("a.png", 1, "ok", 0.5)  # type: ignore[arg-type]
    assert s.status is contract.Status.OK
    with pytest.raises(ValueError, match="^label must be 0 or 1, got 2$"):
        audit_mod.Screened("a.png", 2, contract.Status.OK, 0.5)
    with pytest.raises(ValueError, match="^a.png: a probability comes with status ok, and only with it$"):
        audit_mod.Screened("a.png", 1, contract.Status.OK)
    audit_mod.Needs(1, 1, 1, 0.51)
    for args in ((0, 1, 1, 0.9), (1, 0, 1, 0.9), (1, 1, 0, 0.9), (1, 1, 1, 0.5), (1, 1, 1, 1.0), (1, 1, 1, 1.5)):
        with pytest.raises(ValueError, match=r"^needs are at least one film each, at a confidence in \(0.5, 1\)$"):
            audit_mod.Needs(*args)
    needs = audit_mod.Needs(10, 20, 40, 0.95)
    assert needs.met_by(10, 30) and not needs.met_by(9, 31) and not needs.met_by(20, 19)
    assert not needs.met_by(10, 20) and needs.met_by(20, 20)


def test_the_exact_interval_and_the_smallest_sample() -> None:
    assert all(math.isnan(v) for v in audit_mod.clopper_pearson(0, 0))
    lo, hi = audit_mod.clopper_pearson(1, 1)
    assert hi == 1.0 and lo == pytest.approx(0.025)
    assert audit_mod._smallest_n(lambda n: n >= 1) == 1
    assert audit_mod._smallest_n(lambda n: n >= 2) == 2
    assert audit_mod._smallest_n(lambda n: n >= 3) == 3
    assert audit_mod._smallest_n(lambda n: n >= 37) == 37
    assert audit_mod._smallest_n(lambda n: n >= 500_000) == 500_000
    with pytest.raises(ValueError, match=r"^a target that no sample can show \(1.0 or 0.0\)$"):
        audit_mod._smallest_n(lambda n: False)


def test_films_needed_and_the_sample_check() -> None:
    needs = audit_mod.films_needed(audit_mod.Targets(sensitivity=0.9, specificity=0.0, roc_auc=0.5, flagged=1.0))
    assert (needs.positives, needs.negatives, needs.films, needs.confidence) == (29, 1, 1, 0.95)
    needs = audit_mod.films_needed(audit_mod.Targets(), confidence=0.9)
    assert needs.positives == audit_mod._smallest_n(lambda n: audit_mod.lower_bound(n, n, 0.9) >= 0.9)
    assert needs.negatives == audit_mod._smallest_n(lambda n: audit_mod.lower_bound(n, n, 0.9) >= 0.6)
    assert needs.films == audit_mod._smallest_n(lambda n: audit_mod.upper_bound(0, n, 0.9) <= 0.02)
    assert audit_mod.lower_bound(needs.positives, needs.positives, 0.9) >= 0.9
    assert audit_mod.lower_bound(needs.positives - 1, needs.positives - 1, 0.9) < 0.9
    with pytest.raises(audit_mod.InsufficientSample, match="^the sample has 5 Pneumonia and 0 Normal patients"):
        audit_mod.check_sample(5, 0, audit_mod.Targets())


# --- more of the audit chain, the rules and the contract --------------------------------------------------------


def test_audit_records_redact_url_credentials_and_refuse_bad_fields(tmp_path: Path) -> None:
    rec = AuditRecord("result_delivered", "cert:https://u:pw@ris.example/x", detail={"to": "https://u:pw@pacs/x"})
    assert rec.actor == "cert:https://***@ris.example/x" and rec.detail == {"to": "https://***@pacs/x"}
    plain = AuditRecord("received", "ae:A", detail={"n": 1, "path": "/data/x"})
    assert plain.actor == "ae:A" and plain.detail == {"n": 1, "path": "/data/x"}
    with pytest.raises(ValueError, match=r"^unknown audit event 'x' \(one of received, screened, "):
        AuditRecord("x", "ae:A")
    with pytest.raises(ValueError, match=r"^outcome must be one of \('success', 'failure'\), got 'maybe'$"):
        AuditRecord("received", "ae:A", outcome="maybe")
    with pytest.raises(ValueError, match="^an audit record needs its actor$"):
        AuditRecord("received", "")
    with pytest.raises(ValueError, match=r"^audit detail must not carry patient data \(PatientID, name\)$"):
        AuditRecord("received", "ae:A", detail={"name": "x", "PatientID": "1"})
    with AuditLog(tmp_path / "a.jsonl", component="cxr listen") as log:
        out = log.event("received", actor="ae:A")
    assert out["component"] == "cxr listen"
    assert (out["outcome"], out["study_uid"], out["instance_uid"], out["model_sha256"], out["detail"]) == (
        "success", "", "", "", {})


def test_eligibility_files_and_conditions_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^condition M: unknown rule 'nope'$"):
        Condition("M", "nope", allowed=("A",))
    with pytest.raises(ValueError, match=r"^condition M: if_absent must be 'accept' or 'refuse'$"):
        Condition("M", "dicom_modality", allowed=("A",), if_absent="maybe")
    with pytest.raises(ValueError, match=r"^condition M: give 'allowed' or 'max'$"):
        Condition("M", "dicom_modality")
    with pytest.raises(ValueError, match="^eligibility rules need at least one condition$"):
        Eligibility("x", ())
    with pytest.raises(CxrError, match=r"^invalid eligibility rules: schema must be 'cxr-eligibility/1', got 'v0'$"):
        Eligibility.from_json('{"schema": "v0", "conditions": {}}')
    text = json.dumps({"schema": "cxr-eligibility/1", "name": "mine",
                       "conditions": {"Modality": {"rule": "dicom_modality", "allowed": ["CR"]}}})
    rules = Eligibility.from_json(text)
    assert (rules.name, rules.text, rules.conditions[0].if_absent) == ("mine", text, "accept")
    unnamed = Eligibility.from_json(json.dumps({"schema": "cxr-eligibility/1", "conditions": {
        "Modality": {"rule": "dicom_modality", "allowed": ["CR"], "if_absent": "refuse"}}}))
    assert unnamed.name == "" and unnamed.conditions[0].if_absent == "refuse"


def test_priorities_and_refusals_validate_with_their_message() -> None:
    assert contract.priority_level("urgent") < contract.priority_level("routine")
    with pytest.raises(ValueError, match=r"^priority must be one of urgent, routine, got 'soon'$"):
        contract.priority_level("soon")
    with pytest.raises(ValueError, match=r"^unknown rule 'nope'$"):
        contract.Refusal("nope")
    with pytest.raises(ValueError, match="^refusal value must be a number or text, got list$"):
        contract.Refusal("blank_image", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^refusal limit must be a number or text, got dict$"):
        contract.not_assessable("x", "blank_image", "d", value=1.0, limit={})  # type: ignore[arg-type]
    e = contract.not_assessable("x", "blank_image", "std low", value=2.0, limit=8.0)
    assert contract.Refusal.of(e) == contract.Refusal("blank_image", 2.0, 8.0, "std low")


def test_a_new_audit_file_is_private_to_the_service_group(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        AppendOnlyLines(tmp_path / "trail.jsonl").close()
    finally:
        os.umask(umask)
    assert (tmp_path / "trail.jsonl").stat().st_mode & 0o777 == 0o640


def test_an_audit_of_no_films_says_no_go() -> None:
    """No film shows nothing: no go (``check_sample`` refuses such a sample first; the function itself holds too)."""
    r = audit_mod.audit([], threshold=0.5, targets=audit_mod.Targets())
    assert r["n"] == 0 and r["go"] is False

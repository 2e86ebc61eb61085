"""The DICOM eligibility rules (cxr.core.eligibility): conditions, their refusals and the rules files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr.core.eligibility import Condition, Eligibility, default_text
from cxr.core.errors import CxrError, NotAssessableError

# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


def _refusal(cond: Condition, value: object) -> tuple[str, str, object, object, str]:
    with pytest.raises(NotAssessableError) as e:
        cond.check(value, "x.dcm")
    return str(e.value), e.value.rule, e.value.value, e.value.limit, e.value.detail


# guards cxr.core.eligibility: Condition.check: the refusal's rule, value, limit and detail
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


# guards cxr.core.eligibility: Eligibility.check/passes: absent attributes
def test_a_header_without_attributes_meets_only_the_conditions_that_accept_absence() -> None:
    rules = Eligibility.from_json(json.dumps({"schema": "cxr-eligibility/1", "conditions": {
        "BodyPartExamined": {"rule": "dicom_body_part", "allowed": ["CHEST"]},
        "NumberOfFrames": {"rule": "dicom_frames", "max": 1}}}))
    rules.check(object(), "x.dcm")  # no .get at all: every attribute absent
    assert rules.passes(object()) and not rules.passes({"BodyPartExamined": "HAND"})


# guards cxr.core.eligibility: Eligibility.load: the default file, and a missing file's message
def test_eligibility_files_load_or_say_why_not(tmp_path: Path) -> None:
    path = tmp_path / "eligibility.json"
    path.write_text(default_text())
    assert Eligibility.load(path) == Eligibility.default()
    with pytest.raises(CxrError, match=rf"^cannot read eligibility rules {tmp_path / 'none.json'}: "
                                       r"No such file or directory$"):
        Eligibility.load(tmp_path / "none.json")


# guards cxr.core.eligibility: Condition/Eligibility: their validation messages
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


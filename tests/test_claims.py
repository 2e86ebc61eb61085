"""claims.json and named operating points: the schema validates what a hospital will read."""

from __future__ import annotations

import pytest

from cxr.core import contract
from cxr.core.claims import Claim, Claims, Interval
from cxr.core.errors import CxrError
from cxr.core.model_dir import ServedParams


def _claim(**kw):  # type: ignore[no-untyped-def]
    base = dict(source="nih", population="adult", operating_point="adult", threshold=0.3, in_sample=False,
                films=10, patients=8, positives=4, negatives=6, auc=Interval(0.9, 0.8, 0.95),
                sensitivity=Interval(0.75, 0.3, 1.0), specificity=Interval(0.5, 0.2, 0.8),
                flagged=Interval(0.0, 0.0, 0.1))
    base.update(kw)
    return Claim(**base)


def test_claims_round_trip(tmp_path):
    c = Claims((_claim(),), "a" * 64, "patient bootstrap")
    back = Claims.load(c.save(tmp_path / "claims.json"))
    assert back == c
    assert back.find("nih", "adult") == _claim()
    assert back.as_dict()["claims"][0]["auc"] == [0.9, 0.8, 0.95]


@pytest.mark.parametrize("kw", [
    dict(auc=Interval(0.9, 0.8, 0.95), negatives=0, positives=10, specificity=None),  # one class has no AUC
    dict(sensitivity=None),  # positives but no sensitivity
    dict(positives=5),  # positives + negatives != films
    dict(patients=11),  # more patients than films
    dict(threshold=1.0),
    dict(source="NIH"),
])
def test_a_claim_refuses_what_cannot_be(kw):
    with pytest.raises(ValueError):
        _claim(**kw)


def test_an_interval_holds_its_point():
    with pytest.raises(ValueError):
        Interval(0.5, 0.6, 0.9)
    with pytest.raises(ValueError):
        Interval(0.5, 0.1, 1.2)


def test_one_claim_per_source_and_point():
    with pytest.raises(ValueError):
        Claims((_claim(), _claim()), "a" * 64, "m")


def test_a_missing_claims_file_says_what_to_run(tmp_path):
    with pytest.raises(CxrError, match="cxr claims"):
        Claims.load(tmp_path / "claims.json")


def test_operating_points_travel_as_parameters():
    s = ServedParams(0.3, operating_points=(("pediatric", 0.1), ("adult", 0.3)), default_operating_point="adult")
    back = ServedParams.from_parameters({k: {"string_value": v} for k, v in s.as_parameters().items()})
    assert back == s
    assert back.threshold_for(None) == ("adult", 0.3)
    assert back.threshold_for("pediatric") == ("pediatric", 0.1)
    with pytest.raises(CxrError, match="adult, pediatric"):
        back.threshold_for("neonatal")


@pytest.mark.parametrize("kw", [
    dict(operating_points=(("adult", 0.3),), default_operating_point="pediatric"),  # default not a point
    dict(operating_points=(("adult", 0.2),), default_operating_point="adult"),  # threshold is not the default's
    dict(operating_points=(("Adult", 0.3),), default_operating_point="Adult"),
    dict(default_operating_point="adult"),  # a default without points
])
def test_served_operating_points_are_validated(kw):
    with pytest.raises(ValueError):
        ServedParams(0.3, **kw)


def test_a_model_without_points_has_its_single_one():
    s = ServedParams(0.4)
    assert s.point_names == (contract.SINGLE_OPERATING_POINT,)
    assert s.threshold_for(None) == (contract.SINGLE_OPERATING_POINT, 0.4)
    with pytest.raises(CxrError):
        s.threshold_for("adult")


@pytest.mark.parametrize("age,population", [(0, "pediatric"), (17.9, "pediatric"), (18, "adult"), (80, "adult")])
def test_population_by_age(age, population):
    assert contract.population_for_age(age) == population

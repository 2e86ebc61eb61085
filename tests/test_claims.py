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


def test_the_patient_bootstrap_resamples_patients_not_films():
    import numpy as np

    from cxr.train.claims import measure, patient_bootstrap

    rng = np.random.default_rng(0)
    # 20 patients with 10 films each: the films of one patient share their score, so a film bootstrap would
    # think it had 200 independent films; the patient bootstrap sees 20 and its interval is wider
    y = np.repeat(np.arange(20) % 2, 10)
    p = np.repeat(np.clip(rng.normal(0.4 + 0.2 * (np.arange(20) % 2), 0.2), 0.01, 0.99), 10)
    patients = [f"p{i // 10}" for i in range(200)]
    by_patient = patient_bootstrap(y, p, patients, 0.5)
    by_film = patient_bootstrap(y, p, [f"f{i}" for i in range(200)], 0.5)
    width = lambda ci: ci[2] - ci[1]  # noqa: E731
    assert width(by_patient["auc"]) > 1.8 * width(by_film["auc"])
    claim = measure(source="nih", population="adult", operating_point="adult", threshold=0.5, y=y, p=p,
                    patients=patients, in_sample=False, n_boot=200)
    assert (claim.films, claim.patients, claim.positives) == (200, 20, 100)
    assert claim.auc is not None and claim.auc.lower <= claim.auc.point <= claim.auc.upper


def test_a_refused_film_is_a_referral_and_is_flagged():
    import numpy as np

    from cxr.train.claims import patient_bootstrap

    y = np.array([1, 1, 0, 0])
    p = np.array([np.nan, 0.9, np.nan, 0.1])
    ci = patient_bootstrap(y, p, ["a", "b", "c", "d"], 0.5, n_boot=50)
    assert ci["flagged"][0] == 0.5
    assert ci["sensitivity"][0] == 1.0  # the refused positive is referred
    assert ci["specificity"][0] == 0.5  # the refused negative is referred too


def test_a_one_class_source_states_no_auc_or_specificity():
    import numpy as np

    from cxr.train.claims import measure

    c = measure(source="covid", population="adult", operating_point="adult", threshold=0.5,
                y=np.ones(6, int), p=np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.95]), patients=list("aabbcc"),
                in_sample=False, n_boot=50)
    assert c.auc is None and c.specificity is None and c.sensitivity is not None
    assert c.sensitivity.point == 5 / 6


def test_a_perfect_rate_still_has_an_interval_as_wide_as_its_patients_allow():
    import numpy as np

    from cxr.train.claims import exact_interval, patient_bootstrap

    y = np.ones(77, int)
    p = np.full(77, 0.9)
    patients = [f"p{i % 24}" for i in range(77)]  # 77 films of 24 patients, all found
    ci = patient_bootstrap(y, p, patients, 0.5, n_boot=100)
    assert ci["sensitivity"][0] == 1.0 and ci["sensitivity"][2] == 1.0
    assert ci["sensitivity"][1] == pytest.approx(exact_interval(24, 24, 0.05)[0])  # 24 independent patients
    assert ci["sensitivity"][1] < 0.9


def test_the_readme_table_is_the_shipped_claims():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("claims_table", REPO / "scripts" / "claims_table.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    text = (REPO / "README.md").read_text()
    assert mod.block() in text, "run python scripts/claims_table.py --write"
    assert mod.render(text) == text, "run python scripts/claims_table.py --write"  # every shipped model's block


def test_the_card_shows_the_claims_of_its_own_file():
    from cxr.core.claims import Claims
    from cxr.export.claims_render import claims_markdown
    from tests.conftest import SHIPPED_MODELS, SHIPPED_REPOSITORY

    for model in SHIPPED_MODELS:
        md = (SHIPPED_REPOSITORY / model / "MODEL_CARD.md").read_text()
        table = claims_markdown(Claims.load(SHIPPED_REPOSITORY / model / "claims.json"), own_population_only=False)
        assert table.rstrip() in md

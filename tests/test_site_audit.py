"""The site audit's go/no-go (cxr.site.site_audit): the result's figures, the bounds against the targets, the
films needed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxr.core import contract, stats
from cxr.site import site_audit as audit_mod
from cxr.train import metrics
from cxr.train.claims import patient_bootstrap

# --- found by the mutation check (scripts/mutation.py, docs/tests/mutation.md): each test pins a decision, a
# bound or a message that a mutant changed without any other test noticing ------------------------------------


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


# guards cxr.site.site_audit: audit: every key and figure of its result
def test_the_audit_result_names_every_figure_it_reports() -> None:
    r = audit_mod.audit(_films(), threshold=0.5, targets=audit_mod.Targets(), n_boot=50,
                        reference={"ood_score": [0.1, 0.2], "ood_threshold": 1.5})
    top = {"n", "threshold", "counts", "confidence", "patients", "patients_known", "flagged", "sensitivity",
           "specificity", "referrals_count_as_positive", "roc_auc", "calibration", "ood_score", "refused", "targets",
           "checks", "go", "confidence_allows_go", "needs_if_no", "auc_targets_need"}
    assert set(r) == top
    assert r["auc_targets_need"] == audit_mod.auc_targets_need(audit_mod.Targets(), r["sensitivity"]["n"],
                                                               r["specificity"]["n"])
    assert r["auc_targets_need"]["in_truth"] == pytest.approx(0.861, abs=1e-3)
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


# guards cxr.site.site_audit: audit: a bound equal to its target holds
def test_go_holds_when_every_bound_exactly_meets_its_target() -> None:
    first = audit_mod.audit(_films(), threshold=0.5, targets=audit_mod.Targets(), n_boot=50)
    met = audit_mod.Targets(**{k: c["bound"] for k, c in first["checks"].items()})
    r = audit_mod.audit(_films(), threshold=0.5, targets=met, n_boot=50)
    assert r["go"] is True and all(c["holds"] for c in r["checks"].values())
    at_point = audit_mod.Targets(**{k: c["value"] for k, c in first["checks"].items()})
    r = audit_mod.audit(_films(), threshold=0.5, targets=at_point, n_boot=50)
    assert all(c["point_meets_target"] for c in r["checks"].values())
    assert not r["checks"]["sensitivity"]["holds"] and not r["go"]


# guards cxr.site.site_audit: audit: a sample of one class
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


# guards cxr.site.site_audit: audit: its default n_boot and confidence
def test_the_audit_bootstraps_1000_times_by_default() -> None:
    films = _films()
    default = audit_mod.audit(films, threshold=0.5, targets=audit_mod.Targets())
    explicit = audit_mod.audit(films, threshold=0.5, targets=audit_mod.Targets(), n_boot=1000, confidence=0.95)
    assert json.dumps(default, default=str) == json.dumps(explicit, default=str)


# guards cxr.site.site_audit: Targets/Screened/Needs: their validation
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


# guards cxr.site.site_audit: clopper_pearson and _smallest_n
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


# guards cxr.site.site_audit: films_needed and check_sample
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


# guards cxr.site.site_audit: audit: no films, no go
def test_an_audit_of_no_films_says_no_go() -> None:
    """No film shows nothing: no go (``check_sample`` refuses such a sample first; the function itself holds too)."""
    r = audit_mod.audit([], threshold=0.5, targets=audit_mod.Targets())
    assert r["n"] == 0 and r["go"] is False


"""Metrics against hand-computed cases; threshold rules and probability scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr.train import metrics
from cxr.train.evaluate import choose_threshold, fit_scaling

Y = np.array([0, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8])


def test_auc_hand_computed() -> None:
    # pairs (pos, neg): (0.35,0.1) ok, (0.35,0.4) wrong, (0.8,*) ok -> 3/4
    assert metrics.roc_auc(Y, P) == pytest.approx(0.75)
    assert metrics.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # ties count half
    assert math.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_pr_auc_hand_computed() -> None:
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3)
    assert metrics.pr_auc(Y, P) == pytest.approx(0.5 + 1 / 3)


def test_threshold_metrics_hand_computed() -> None:
    c = metrics.confusion(Y, P, 0.35)
    assert c == {"tp": 2, "fp": 1, "tn": 1, "fn": 0}
    m = metrics.threshold_metrics(Y, P, 0.35)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.8)


def test_ece_and_brier_hand_computed() -> None:
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.95, 0.95, 0.55])
    # bins: [0.0,0.1): p .05 y 0 -> |0-.05|*1/4; [0.9,1.0]: two, |1-.95|*2/4; [0.5,0.6): |1-.55|*1/4
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.05 / 4 + 0.05 * 2 / 4 + 0.45 / 4)
    assert metrics.brier(y, p) == pytest.approx((0.05**2 * 3 + 0.45**2) / 4)


def test_roc_curve_endpoints() -> None:
    fpr, tpr, thr = metrics.roc_curve(Y, P)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(thr[1:]) < 0)


@pytest.mark.parametrize("bad", [(np.array([0, 2]), np.array([0.1, 0.2])), (np.array([0, 1]), np.array([0.1, 1.2])),
                                 (np.array([0, 1]), np.array([0.1])), (np.array([]), np.array([]))])
def test_input_contract_violations(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        metrics.roc_auc(*bad)


def test_bootstrap_interval_contains_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    ci = metrics.bootstrap_ci(y, p, lambda a, b: {"auc": metrics.roc_auc(a, b)}, n_boot=200)
    lo, hi = ci["auc"]
    assert lo < metrics.roc_auc(y, p) < hi and hi - lo < 0.2


def test_sensitivity_rule_meets_target_with_best_specificity() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = choose_threshold(y, p, rule="sensitivity", target=1.0)
    assert 0.3 < t <= 0.4  # lowest positive (0.4) still positive; the 0.3 negative is not
    m = metrics.threshold_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75
    t75 = choose_threshold(y, p, rule="sensitivity", target=0.75)
    assert metrics.threshold_metrics(y, p, t75)["sensitivity"] >= 0.75 and t75 > 0.6


def test_youden_rule() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    t = choose_threshold(y, p, rule="youden")
    m = metrics.threshold_metrics(y, p, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(2 / 3)


@pytest.mark.parametrize("scaling", ["temperature", "platt"])
def test_fit_scaling_recovers_known_parameters(scaling: str) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    a_true, b_true = 0.5, (0.8 if scaling == "platt" else 0.0)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(a_true * z + b_true)))).astype(int)
    a, b = fit_scaling(z, y, scaling)
    assert a == pytest.approx(a_true, abs=0.03) and b == pytest.approx(b_true, abs=0.06)
    assert fit_scaling(z, y, "none") == (1.0, 0.0)


def test_fit_scaling_converges_from_far_away() -> None:
    """Logits mostly positive (a class-weighted model on a site with its own prevalence): a full Newton step from
    (1, 0) overshoots, and undamped iterations ran off to a step function (scale ~1e10, found by a real
    InceptionV3 run). The damped fit reaches the log-loss minimum that a general-purpose optimiser finds."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    z = np.r_[rng.normal(3, 2.5, 78), rng.normal(6.5, 1.5, 133)]
    y = np.r_[np.zeros(78), np.ones(133)].astype(int)

    def loss(v: np.ndarray) -> float:
        s = v[0] * z + v[1]
        return float(np.mean(np.logaddexp(0, s) - y * s))

    a, b = fit_scaling(z, y, "platt")
    ref = minimize(loss, [1.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000})
    assert 0 < a < 5 and a == pytest.approx(ref.x[0], rel=1e-4) and b == pytest.approx(ref.x[1], rel=1e-4)
    assert loss(np.array([a, b])) <= ref.fun + 1e-12

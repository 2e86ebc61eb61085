"""cxr.core.stats: the exact binomial bounds at their edges, DeLong's AUC and paired difference against brute force,
and the coverage of the one-sided bounds measured by simulation (vectorised: a few seconds)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from cxr.core import stats

pytestmark = pytest.mark.timeout(120)


def test_exact_bounds_at_their_edges_and_fractional_counts() -> None:
    assert all(math.isnan(v) for v in stats.exact_interval(0, 0))
    assert math.isnan(stats.lower_bound(0, 0)) and math.isnan(stats.upper_bound(0, 0))
    assert stats.lower_bound(0, 10) == 0.0 and stats.upper_bound(10, 10) == 1.0
    lo, hi = stats.exact_interval(1, 1)
    assert hi == 1.0 and lo == pytest.approx(0.025)
    assert stats.lower_bound(29, 29) >= 0.9 > stats.lower_bound(28, 28)  # the plan's 29 positives
    assert stats.upper_bound(0, 149) <= 0.02 < stats.upper_bound(0, 148)  # and its 149 in all
    # 0.95^n = 0.05 at k = n: the one-sided exact bound in closed form
    assert stats.lower_bound(20, 20) == pytest.approx(0.05 ** (1 / 20))
    # fractional k is an effective count: between the bounds of its neighbouring integers, monotone
    f = [stats.lower_bound(k, 40) for k in (30, 30.25, 30.5, 31)]
    assert f == sorted(f) and f[0] < f[1] < f[2] < f[3]
    for bad_k, bad_n in ((-1, 5), (6, 5), (float("nan"), 5), (1, -1), (1, 2.5), (1, True)):
        with pytest.raises(ValueError):
            stats.exact_interval(bad_k, bad_n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^confidence must be in \(0.5, 1\), got 0.4$"):
        stats.lower_bound(1, 2, 0.4)


def _brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_delong_matches_brute_force_with_ties_and_its_variance() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(13, int), np.zeros(17, int)]
    p = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: ties within and across classes
    auc, var = stats.delong(y, p)
    assert float(auc) == pytest.approx(_brute_auc(y, p))
    # the structural components by brute force
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    assert float(var) == pytest.approx(v10.var(ddof=1) / 13 + v01.var(ddof=1) / 17)
    b = stats.auc_bound(y, p)
    assert b.auc == pytest.approx(float(auc)) and 0 < b.lower < b.auc and b.se == pytest.approx(math.sqrt(float(var)))
    perfect = stats.auc_bound(y, y.astype(float))
    assert perfect.auc == 1.0 and perfect.lower == pytest.approx(0.05 ** (1 / 13))
    assert stats.auc_bound([1, 0, 0], [0.9, 0.1, 0.2]).lower == 0.0  # one positive: nothing shown
    with pytest.raises(ValueError, match="both classes"):
        stats.auc_bound([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        stats.auc_bound([1, 0], [0.2, float("nan")])


def test_the_auc_bound_covers_at_its_nominal_rate() -> None:
    """Binormal samples at a true AUC of 0.85 (the card's target): the one-sided 95% bound passes the truth in
    about 5% of samples, at the smallest plan (29 positives) and at the sizes of a site's audit part; the
    percentile bootstrap it replaces did so in 7.7% (issue 33), and so does a plain Wald bound (measured here)."""
    rng = np.random.default_rng(1)
    true_auc = 0.85
    d = math.sqrt(2) * NormalDist().inv_cdf(true_auc)
    sims = 4000
    for m, n in ((29, 120), (45, 105), (125, 55), (20, 20)):
        y = np.r_[np.ones(m, int), np.zeros(n, int)]
        scores = np.concatenate([rng.normal(d, 1, (sims, m)), rng.normal(0, 1, (sims, n))], axis=1)
        auc, se, low = stats.auc_lower_bounds(y, scores, 0.95)
        miss = float(np.mean(low > true_auc))
        assert 0.03 <= miss <= 0.07, (m, n, miss)
        wald = float(np.mean(auc - NormalDist().inv_cdf(0.95) * se > true_auc))
        assert wald > miss  # why the logit scale: the Wald bound passes the truth more often
    # and the paired difference of two correlated models with one true AUC: its bound passes 0 in about 5%
    a_auc = 0.75
    d = math.sqrt(2) * NormalDist().inv_cdf(a_auc)
    for m, n, rho in ((45, 105, 0.5), (125, 55, 0.7), (30, 30, 0.3)):
        y = np.r_[np.ones(m, int), np.zeros(n, int)]
        e1, e2 = rng.normal(0, 1, (sims, m + n)), rng.normal(0, 1, (sims, m + n))
        a = d * y + e1
        b = d * y + rho * e1 + math.sqrt(1 - rho**2) * e2
        _, _, lo, _, _ = stats.paired_auc_difference_many(y, a, b, 0.95)
        assert 0.03 <= float(np.mean(lo > 0)) <= 0.07, (m, n, rho)


def test_the_paired_auc_difference_and_what_it_would_need() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60, int), np.zeros(60, int)]
    good = y * 1.5 + rng.normal(0, 1, 120)
    weak = y * 0.5 + rng.normal(0, 1, 120)
    d = stats.paired_auc_difference(y, good, weak)
    assert d.difference == pytest.approx(_brute_auc(y, good) - _brute_auc(y, weak))
    assert d.a == pytest.approx(_brute_auc(y, good)) and d.lower > 0 and d.cases_needed(120) == 120
    same = stats.paired_auc_difference(y, good, good)
    assert same.difference == 0 and same.se == 0 and same.cases_needed(120) is None
    close = stats.paired_auc_difference(y, good, good + rng.normal(0, 0.8, 120))
    if close.difference > 0 and close.lower <= 0:
        assert close.cases_needed(120) > 120  # type: ignore[operator]


def test_the_paired_rate_difference_counts_discordant_pairs() -> None:
    a = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], bool)
    b = np.array([1, 0, 0, 1, 0, 1, 1, 1, 1, 1], bool)
    d = stats.paired_rate_difference(a, b)
    assert (d.a, d.b, d.difference, d.n) == (0.9, 0.7, pytest.approx(0.2), 10)
    assert d.se == pytest.approx(math.sqrt((2 - 4 / 10) / 100)) and d.lower < d.difference
    tie = stats.paired_rate_difference(a, a)
    assert tie.difference == 0 and tie.lower == 0
    with pytest.raises(ValueError):
        stats.paired_rate_difference(a, b[:5])


def test_per_patient_cases_and_patients_for_a_rate() -> None:
    y, p, names = stats.per_patient([0, 1, 0, 0, 1], [0.2, 0.9, float("nan"), float("nan"), 0.4],
                                    ["a", "a", "b", "c", "c"])
    assert names == ["a", "c"] and y.tolist() == [1, 1] and p.tolist() == [0.9, 0.4]
    assert stats.patients_for_rate(1.0, 0.9) == 29
    n = stats.patients_for_rate(0.95, 0.9)
    assert n is not None and stats.lower_bound(0.95 * n, n) >= 0.9 > stats.lower_bound(0.95 * (n - 1), n - 1)
    assert stats.patients_for_rate(0.85, 0.9) is None


def test_binormal_auc_and_the_rate_a_bound_needs() -> None:
    from cxr.core.stats import binormal_auc, lower_bound, rate_to_show

    assert binormal_auc(0.5, 0.5) == pytest.approx(0.5)
    # equal-variance binormal scores at d' = 1.5: the ROC through any of its points gives Phi(1.5 / sqrt 2)
    from statistics import NormalDist
    nd = NormalDist()
    for c in (-0.5, 0.3, 1.2):
        sens, spec = 1 - nd.cdf(c - 1.5), nd.cdf(c)
        assert binormal_auc(sens, spec) == pytest.approx(nd.cdf(1.5 / 2 ** 0.5))
    with pytest.raises(ValueError):
        binormal_auc(1.0, 0.5)
    r = rate_to_show(0.9, 138)
    assert r is not None and lower_bound(round(r * 138), 138) >= 0.9 > lower_bound(round(r * 138) - 1, 138)
    assert rate_to_show(0.9, 10) is None and rate_to_show(0.0, 5) == 0.0

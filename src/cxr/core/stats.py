"""The statistics every go/no-go and claim reads: one implementation each, numpy and scipy only.

* :func:`exact_interval`, :func:`lower_bound`, :func:`upper_bound`: the exact (Clopper-Pearson) binomial bounds.
  ``n = 0`` gives NaN (nothing is shown); ``k = 0`` has the lower bound 0 and ``k = n`` the upper bound 1.
  **Fractional** ``k`` is accepted and read as an *effective* count (a clustered design's ``k / n`` times its
  effective size, a rate times a number of patients): the bounds are the Beta quantiles at that ``k``, the
  continuous extension of the exact interval, which lies between the bounds of the neighbouring integers.
* :func:`delong` and :func:`auc_bound`: ROC AUC with DeLong's variance (the structural components of the
  Mann-Whitney statistic, midranks for ties). The one-sided bound is taken on the logit scale, where the normal
  approximation holds near 1 (the plain Wald bound can pass 1 and under-covers there); its coverage is checked
  by simulation in ``tests/test_stats.py``.
* :func:`paired_auc_difference`: two models scored on the *same* cases (the site model against the one in
  service): the difference of their AUCs with DeLong's paired variance and a one-sided lower bound.
* :func:`paired_rate_difference`: the difference of two rates on the same cases (sensitivity of two models on the
  same positives) from the discordant pairs, with a one-sided lower bound.
* :func:`per_patient`: a patient's films as one case (max score, any Pneumonia film), so cases are independent.

Every function is vectorised over leading axes where it says so (the simulation tests draw thousands of samples
at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def z_of(confidence: float) -> float:
    """The standard normal quantile of a one-sided ``confidence`` in (0.5, 1)."""
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def _check_count(k: float, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a count (an int >= 0), got {n!r}")
    if not isinstance(k, (int, float, np.integer, np.floating)) or not math.isfinite(k) or not 0 <= k <= n:
        raise ValueError(f"k must be a number in [0, n] = [0, {n}], got {k!r}")


def exact_interval(k: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of ``k / n`` at level ``1 - alpha`` (``alpha / 2`` each side).

    ``n = 0``: ``(nan, nan)``. ``k`` may be fractional (an effective count; see the module docstring).

    Raises:
        ValueError: ``n`` not a count, ``k`` outside ``[0, n]``, or ``alpha`` outside (0, 1).
    """
    _check_count(k, n)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n == 0:
        return (float("nan"), float("nan"))
    from scipy.stats import beta

    lo = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def lower_bound(k: float, n: int, confidence: float = 0.95) -> float:
    """One-sided exact lower bound of ``k / n`` at ``confidence`` (NaN when ``n = 0``; 0 when ``k = 0``)."""
    z_of(confidence)
    return exact_interval(k, n, 2 * (1 - confidence))[0]


def upper_bound(k: float, n: int, confidence: float = 0.95) -> float:
    """One-sided exact upper bound of ``k / n`` at ``confidence`` (NaN when ``n = 0``; 1 when ``k = n``)."""
    z_of(confidence)
    return exact_interval(k, n, 2 * (1 - confidence))[1]


def _split(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    scores = np.asarray(scores, float)
    if y.ndim != 1 or scores.shape[-1] != y.size or not np.isin(y, (0, 1)).all():
        raise ValueError("y must be a 1-d array of 0/1 labels, one per score (the scores' last axis)")
    if np.isnan(scores).any():
        raise ValueError("scores must not be NaN (leave refused films out of an AUC)")
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("an AUC needs both classes")
    return scores[..., y == 1], scores[..., y == 0]


def _components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: V10 per positive (share of negatives it outranks, ties half) and V01 per
    negative (share of positives that outrank it), from midranks; vectorised over leading axes."""
    from scipy.stats import rankdata

    m, n = pos.shape[-1], neg.shape[-1]
    both = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    v10 = (both[..., :m] - rankdata(pos, axis=-1)) / n
    v01 = 1.0 - (both[..., m:] - rankdata(neg, axis=-1)) / m
    return v10, v01


def delong(y: Sequence[int] | np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, DeLong variance) of ``scores`` against labels ``y``; ``scores`` may have leading axes (many score
    vectors for the same labels), the result has them.

    Raises:
        ValueError: One class only, NaN scores, or shapes that disagree.
    """
    pos, neg = _split(np.asarray(y), scores)
    v10, v01 = _components(pos, neg)
    m, n = pos.shape[-1], neg.shape[-1]
    var = (v10.var(axis=-1, ddof=1) / m if m > 1 else 0.0) + (v01.var(axis=-1, ddof=1) / n if n > 1 else 0.0)
    return v10.mean(axis=-1), np.asarray(var, float)


def auc_lower_bounds(y: Sequence[int] | np.ndarray, scores: np.ndarray, confidence: float = 0.95
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUC, DeLong standard error, one-sided lower bound), vectorised over the scores' leading axes.

    The bound is taken on the logit scale (delta method): ``expit(logit(A) - z * se / (A (1 - A)))``; it stays in
    [0, 1] and holds its coverage near 1, where the plain Wald bound does not (``tests/test_stats.py`` measures
    both). A perfect separation (AUC 1, no variance) gets the exact lower bound of a perfect rate over the
    smaller class, ``(1 - confidence) ** (1 / min(m, n))``. Fewer than two cases of a class: bound 0.
    """
    z = z_of(confidence)
    y = np.asarray(y)
    auc, var = delong(y, scores)
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if min(m, n) < 2:
        return auc, np.sqrt(var), np.zeros_like(np.asarray(auc, float))
    a = np.asarray(auc, float)
    a_eff = np.clip(a, 1e-9, 1 - 1e-9)
    logit = np.log(a_eff / (1 - a_eff)) - z * np.sqrt(np.maximum(var, 0.0)) / (a_eff * (1 - a_eff))
    low = 1.0 / (1.0 + np.exp(-logit))
    # a perfect separation has no variance: the exact bound of a perfect rate over the smaller class instead
    low = np.where(a >= 1.0, lower_bound(min(m, n), min(m, n), confidence), low)
    return a, np.sqrt(np.maximum(var, 0.0)), low


@dataclass(frozen=True)
class AucBound:
    """An AUC with its DeLong standard error and one-sided lower bound at ``confidence``.

    Attributes:
        auc: The point estimate (Mann-Whitney, ties half).
        se: DeLong's standard error.
        lower: One-sided lower bound (logit scale; :func:`auc_bound`).
        confidence: Its one-sided confidence.
        positives: Positive cases.
        negatives: Negative cases.
    """

    auc: float
    se: float
    lower: float
    confidence: float
    positives: int
    negatives: int

    def __post_init__(self) -> None:
        if not (0 <= self.auc <= 1 and 0 <= self.lower <= 1 and self.se >= 0 and 0.5 < self.confidence < 1
                and min(self.positives, self.negatives) >= 1):
            raise ValueError("an AUC bound needs auc and lower in [0, 1], se >= 0, confidence in (0.5, 1) and "
                             "cases of both classes")


def auc_bound(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
              confidence: float = 0.95) -> AucBound:
    """ROC AUC of ``p`` against ``y`` with DeLong's variance and its one-sided lower bound on the logit scale.
    With fewer than two cases of a class the variance is not estimable: the bound is 0 (nothing is shown).

    Raises:
        ValueError: One class only, NaN scores, or a confidence outside (0.5, 1).
    """
    y = np.asarray(y)
    auc, se, low = auc_lower_bounds(y, np.asarray(p, float), confidence)
    return AucBound(auc=float(auc), se=float(se), lower=float(low), confidence=confidence,
                    positives=int((y == 1).sum()), negatives=int((y == 0).sum()))


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` (two models on the same cases) with its one-sided lower bound.

    Attributes:
        a: The first model's figure (the site model's).
        b: The second's (the model in service).
        difference: ``a - b``.
        se: Its standard error (paired).
        lower: One-sided lower bound of the difference at ``confidence``.
        confidence: One-sided confidence.
        n: Cases both were judged on.
    """

    a: float
    b: float
    difference: float
    se: float
    lower: float
    confidence: float
    n: int

    def __post_init__(self) -> None:
        if not (self.se >= 0 and 0.5 < self.confidence < 1 and self.n >= 0 and self.lower <= self.difference + 1e-12):
            raise ValueError("a difference needs se >= 0, confidence in (0.5, 1), n >= 0 and lower <= difference")

    @property
    def shown_above(self) -> float:
        """The largest margin the bound shows ``a`` above ``b`` by (negative: not shown)."""
        return self.lower

    def cases_needed(self, n_now: int) -> int | None:
        """Cases for the bound to reach 0 if the difference and its spread stay as they are (the variance falls
        as 1/n); ``None`` when the difference is not positive (no sample shows it)."""
        if self.difference <= 0:
            return None
        if self.lower > 0:
            return n_now
        z = z_of(self.confidence)
        return math.ceil(n_now * (z * self.se / self.difference) ** 2)


def paired_auc_difference(y: Sequence[int] | np.ndarray, p_a: np.ndarray, p_b: np.ndarray,
                          confidence: float = 0.95) -> Difference:
    """``AUC(p_a) - AUC(p_b)`` on the same cases with DeLong's paired variance (the components of both models on
    the same positives and negatives, so their correlation is counted) and a one-sided Wald lower bound.
    ``p_a`` and ``p_b`` may have leading axes; the figures are then returned for the first sample only (use
    :func:`paired_auc_difference_many` for arrays).

    Raises:
        ValueError: One class only, NaN scores, or shapes that disagree.
    """
    d, se, lo, a, b = paired_auc_difference_many(y, p_a, p_b, confidence)
    return Difference(a=float(a.flat[0]), b=float(b.flat[0]), difference=float(d.flat[0]), se=float(se.flat[0]),
                      lower=float(lo.flat[0]), confidence=confidence, n=int(np.asarray(y).size))


def paired_auc_difference_many(y: Sequence[int] | np.ndarray, p_a: np.ndarray, p_b: np.ndarray,
                               confidence: float = 0.95) -> tuple[np.ndarray, ...]:
    """(difference, se, lower bound, AUC a, AUC b), vectorised over the scores' leading axes."""
    z = z_of(confidence)
    y = np.asarray(y)
    pos_a, neg_a = _split(y, p_a)
    pos_b, neg_b = _split(y, p_b)
    if pos_a.shape != pos_b.shape:
        raise ValueError("p_a and p_b must have one shape (the same cases)")
    a10, a01 = _components(pos_a, neg_a)
    b10, b01 = _components(pos_b, neg_b)
    m, n = a10.shape[-1], a01.shape[-1]
    d10, d01 = a10 - b10, a01 - b01
    var = (d10.var(axis=-1, ddof=1) / m if m > 1 else 0.0) + (d01.var(axis=-1, ddof=1) / n if n > 1 else 0.0)
    se = np.sqrt(np.maximum(var, 0.0))
    auc_a, auc_b = a10.mean(axis=-1), b10.mean(axis=-1)
    diff = auc_a - auc_b
    return diff, se, diff - z * se, auc_a, auc_b


def paired_rate_difference(hit_a: Sequence[bool] | np.ndarray, hit_b: Sequence[bool] | np.ndarray,
                           confidence: float = 0.95) -> Difference:
    """``rate(a) - rate(b)`` of two models on the same cases (e.g. the positives each refers), from the
    discordant pairs: ``(n10 - n01) / n`` with the paired variance ``(n10 + n01 - (n10 - n01)^2 / n) / n^2`` and a
    one-sided Wald lower bound. No discordant pair: the difference is 0, exactly (its bound too).

    Raises:
        ValueError: Lengths that disagree, or no case.
    """
    z = z_of(confidence)
    a = np.asarray(hit_a, bool)
    b = np.asarray(hit_b, bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("hit_a and hit_b must be 1-d, of one length, non-empty (the same cases)")
    n = a.size
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    diff = (n10 - n01) / n
    var = max(0.0, (n10 + n01 - (n10 - n01) ** 2 / n) / n**2)
    se = math.sqrt(var)
    return Difference(a=float(a.mean()), b=float(b.mean()), difference=diff, se=se, lower=diff - z * se,
                      confidence=confidence, n=n)


def per_patient(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
                patients: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A patient's films as one case: label 1 when any film is Pneumonia, score the largest of its films' scores
    (NaN scores, refused films, left out; a patient with none is dropped). Returns (labels, scores, patients),
    patients sorted.

    Raises:
        ValueError: Lengths that disagree.
    """
    y = np.asarray(y, int)
    p = np.asarray(p, float)
    if not (y.shape == p.shape and y.ndim == 1 and len(patients) == y.size):
        raise ValueError("y, p and patients must be 1-d and of one length")
    by: dict[str, list[int]] = {}
    for i, pid in enumerate(patients):
        by.setdefault(str(pid), []).append(i)
    ys, ps, names = [], [], []
    for pid in sorted(by):
        idx = np.array(by[pid])
        scores = p[idx][~np.isnan(p[idx])]
        if not scores.size:
            continue
        ys.append(int(y[idx].max()))
        ps.append(float(scores.max()))
        names.append(pid)
    return np.array(ys, int), np.array(ps, float), names


def patients_for_rate(rate: float, target: float, confidence: float = 0.95, *, limit: int = 100_000) -> int | None:
    """Cases a one-sided exact lower bound needs to reach ``target`` if the observed ``rate`` held (the effective
    count ``rate * n`` may be fractional); ``None`` when ``rate <= target`` (no sample shows it)."""
    z_of(confidence)
    if not (0 <= rate <= 1 and 0 <= target <= 1):
        raise ValueError("rate and target must be in [0, 1]")
    if rate <= target:
        return None
    if target <= 0:
        return 1
    n = 1
    while lower_bound(rate * n, n, confidence) < target:
        n *= 2
        if n > limit:
            return None
    lo = n // 2 + 1 if n > 1 else 1
    while lo < n:
        mid = (lo + n) // 2
        n, lo = (mid, lo) if lower_bound(rate * mid, mid, confidence) >= target else (n, mid + 1)
    return n


def binormal_auc(sensitivity: float, specificity: float) -> float:
    """The ROC AUC of a binormal model with equal variances whose ROC passes through (``1 - specificity``,
    ``sensitivity``): ``Phi((Phi^-1(sens) + Phi^-1(spec)) / sqrt 2)``. What a ranking must be worth before one
    threshold can give both rates (a model whose scores are not binormal may need a little more or less)."""
    for v in (sensitivity, specificity):
        if not 0 < v < 1:
            raise ValueError(f"rates must be in (0, 1), got {v}")
    nd = NormalDist()
    return nd.cdf((nd.inv_cdf(sensitivity) + nd.inv_cdf(specificity)) / math.sqrt(2))


def rate_to_show(target: float, n: int, confidence: float = 0.95) -> float | None:
    """The smallest observed share ``k / n`` whose one-sided exact lower bound at ``confidence`` reaches
    ``target`` (``None``: not even ``n / n`` does)."""
    z_of(confidence)
    if n < 1 or not 0 <= target <= 1:
        raise ValueError(f"need n >= 1 and a target in [0, 1], got n={n}, target={target}")
    # the bound never exceeds k / n, so no k below target * n can do: start just under it
    for k in range(max(0, math.floor(target * n) - 1), n + 1):
        if lower_bound(k, n, confidence) >= target:
            return k / n
    return None

"""Binary classification metrics in plain numpy (no scikit-learn needed).

Inputs everywhere: ``y_true`` integer labels in {0, 1}, ``y_prob`` float
probabilities in [0, 1], both 1-D of equal length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cxr.core import contract


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true and y_prob differ in length: {y_true.shape} vs {y_prob.shape}")
    if y_true.size == 0:
        raise ValueError("empty inputs")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(y_prob).all() or y_prob.min() < 0 or y_prob.max() > 1:
        raise ValueError("y_prob must be finite and within [0, 1]")
    return y_true, y_prob


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half). NaN if one class is absent."""
    y_true, y_prob = _check(y_true, y_prob)
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(y_prob, kind="mergesort")
    ranks = np.empty(y_prob.size, dtype=np.float64)
    sorted_p = y_prob[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _cumulative_counts(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct threshold (decreasing): ``(thresholds, tp, fp)`` when predicting ``p >= t``."""
    order = np.argsort(-y_prob, kind="mergesort")
    p_sorted, y_sorted = y_prob[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p_sorted)), p_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return p_sorted[last_of_tie], tp.astype(np.float64), fp.astype(np.float64)


def roc_curve(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` with decreasing thresholds; predict positive when ``p >= t``."""
    y_true, y_prob = _check(y_true, y_prob)
    thresholds, tp, fp = _cumulative_counts(y_true, y_prob)
    pos = max(int(y_true.sum()), 1)
    neg = max(y_true.size - int(y_true.sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, thresholds]


def pr_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Average precision (area under the precision-recall step curve)."""
    y_true, y_prob = _check(y_true, y_prob)
    n_pos = int(y_true.sum())
    if n_pos == 0:
        return float("nan")
    _, tp, fp = _cumulative_counts(y_true, y_prob)
    recall = tp / n_pos
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, int]:
    """Confusion counts at ``threshold`` (positive when ``p >= threshold``)."""
    y_true, y_prob = _check(y_true, y_prob)
    pred = contract.is_positive(y_prob, threshold)
    return {
        "tp": int((pred & (y_true == 1)).sum()),
        "fp": int((pred & (y_true == 0)).sum()),
        "tn": int((~pred & (y_true == 0)).sum()),
        "fn": int((~pred & (y_true == 1)).sum()),
    }


def _safe_div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def threshold_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity and F1 at ``threshold``."""
    c = confusion(y_true, y_prob, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _safe_div(tp, tp + fp)
    sensitivity = _safe_div(tp, tp + fn)
    return {
        "accuracy": _safe_div(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, *, bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of ``|bin| / n * |mean(y) - mean(p)|``."""
    y_true, y_prob = _check(y_true, y_prob)
    idx = np.minimum((y_prob * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(y_true[mask].mean() - y_prob[mask].mean())
    return float(ece)


def reliability(y_true: np.ndarray, y_prob: np.ndarray, *, bins: int = 10) -> list[dict[str, float]]:
    """Per-bin ``count``, mean predicted probability and observed positive rate."""
    y_true, y_prob = _check(y_true, y_prob)
    idx = np.minimum((y_prob * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "count": int(mask.sum()),
                "mean_prob": float(y_prob[mask].mean()) if mask.any() else float("nan"),
                "frac_pos": float(y_true[mask].mean()) if mask.any() else float("nan"),
            }
        )
    return out


def brier(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Brier score: mean squared error of the probabilities."""
    y_true, y_prob = _check(y_true, y_prob)
    return float(np.mean((y_prob - y_true) ** 2))


def all_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Every scalar metric of the evaluation report at one threshold."""
    out = threshold_metrics(y_true, y_prob, threshold)
    out["accuracy_at_0.5"] = threshold_metrics(y_true, y_prob, 0.5)["accuracy"]
    out["roc_auc"] = roc_auc(y_true, y_prob)
    out["pr_auc"] = pr_auc(y_true, y_prob)
    out["ece"] = expected_calibration_error(y_true, y_prob)
    out["brier"] = brier(y_true, y_prob)
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (resampling images, stratified by class) for every key of ``fn``."""
    y_true, y_prob = _check(y_true, y_prob)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        for k, v in fn(y_true[idx], y_prob[idx]).items():
            samples.setdefault(k, []).append(v)
    return {
        k: (float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2))))
        for k, v in samples.items()
    }

"""L2-regularised logistic regression in numpy and scipy (no scikit-learn needed), and patient-grouped folds.

Used by the body-part check (chest film or not, on the network's pooled features) and by the source probe
(how well those features tell the hospitals apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Logistic:
    """``logit(x) = ((x - mean) / scale) @ coef + intercept``; the standardisation is part of the fit."""

    mean: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    coef: np.ndarray = field(repr=False)
    intercept: float = 0.0

    def __post_init__(self) -> None:
        p = self.coef.shape
        if self.mean.shape != p or self.scale.shape != p or len(p) != 1:
            raise ValueError(f"mean {self.mean.shape}, scale {self.scale.shape} and coef {p} must be one length")
        if not (np.isfinite(self.coef).all() and np.isfinite(self.intercept) and (self.scale > 0).all()):
            raise ValueError("logistic fit holds NaN, Inf or a zero scale")

    def logit(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def folded(self) -> tuple[np.ndarray, float]:
        """``(w, b)`` with ``logit(x) = x @ w + b`` (the form a graph computes)."""
        w = self.coef / self.scale
        return w, float(self.intercept - self.mean @ w)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, weights: np.ndarray | None = None, l2: float = 1.0) -> Logistic:
    """Fit by L-BFGS on the weighted mean log-loss plus ``l2 / (2 n) * ||coef||^2`` (standardised features).

    ``weights`` default to balancing the two classes (each class half the mass)."""
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).ravel()
    if x.ndim != 2 or len(x) != len(y) or set(np.unique(y)) != {0.0, 1.0}:
        raise ValueError("need 2-D features and labels of both classes 0 and 1")
    if weights is None:
        weights = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum())
    w = np.asarray(weights, np.float64) / np.sum(weights)
    mean = w @ x
    scale = np.sqrt(w @ (x - mean) ** 2) + 1e-8
    z = (x - mean) / scale
    lam = l2 / len(y)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, b = theta[:-1], theta[-1]
        s = z @ coef + b
        # log(1 + exp(-s)) for y=1, log(1 + exp(s)) for y=0, stably
        ll = np.logaddexp(0.0, np.where(y == 1, -s, s))
        p = 1.0 / (1.0 + np.exp(-s))
        g = w * (p - y)
        return float(w @ ll + 0.5 * lam * coef @ coef), np.r_[z.T @ g + lam * coef, g.sum()]

    res = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    return Logistic(mean, scale, res.x[:-1].copy(), float(res.x[-1]))


def group_folds(groups: Sequence[str], k: int, *, seed: int = 0) -> list[np.ndarray]:
    """``k`` folds of indexes with every group (patient) in one fold only; groups shuffled with ``seed``."""
    uniq = sorted(set(groups))
    if len(uniq) < k:
        raise ValueError(f"{len(uniq)} groups cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {uniq[j]: i % k for i, j in enumerate(order)}
    idx = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(idx == f) for f in range(k)]

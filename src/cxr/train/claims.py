"""Measuring a claim: one source's films at one operating point, with 95% intervals that resample patients.

Films of one patient are not independent (NIH patients have up to 12 films, COVID patients up to 22), so the
bootstrap draws patients with replacement, inside each class stratum of patients (a patient's films go
together), and recomputes every metric on the drawn films. A refused film (``probability`` NaN) counts as a
referral: positive for sensitivity and specificity, and in ``flagged``; AUC is over the films the model answered.

A bootstrap cannot widen an interval around a rate of 0 or 1 (every resample of 77 found pneumonias finds 77), so
each rate's interval also covers the exact Clopper-Pearson interval of the same rate over the *patients* that
carry it (an effective sample no larger than the independent units): the stated interval is the union of both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from cxr.core import contract
from cxr.core.claims import Claim, Interval
from cxr.core.stats import exact_interval  # the one Clopper-Pearson (its n = 0 and fractional k rules)
from cxr.train import metrics

#: Resamples of the patient bootstrap.
N_BOOT = 2000
CONFIDENCE = 0.95


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    answered = np.isfinite(p)
    referred = ~answered | (answered & contract.is_positive(np.nan_to_num(p, nan=0.0), threshold))
    out = {"flagged": float((~answered).mean())}
    pos, neg = y == 1, y == 0
    out["sensitivity"] = float(referred[pos].mean()) if pos.any() else float("nan")
    out["specificity"] = float((~referred[neg]).mean()) if neg.any() else float("nan")
    ya, pa = y[answered], p[answered]
    out["auc"] = metrics.roc_auc(ya, pa) if ya.size and len(set(ya.tolist())) == 2 else float("nan")
    return out


def patient_bootstrap(y: np.ndarray, p: np.ndarray, patients: Sequence[str], threshold: float, *,
                      n_boot: int = N_BOOT, seed: int = 0, confidence: float = CONFIDENCE
                      ) -> dict[str, tuple[float, float, float]]:
    """``{metric: (point, lower, upper)}`` for auc, sensitivity, specificity and flagged, resampling patients
    (stratified by whether the patient has a Pneumonia film). A metric the set cannot measure is NaN."""
    y = np.asarray(y, int)
    p = np.asarray(p, float)
    if not (y.shape == p.shape and len(patients) == y.size and y.size > 0):
        raise ValueError("y, p and patients must be non-empty and of one length")
    films: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(patients):
        films[pid].append(i)
    strata = [[np.array(films[k]) for k in sorted(films) if (y[films[k]].max() == s)] for s in (0, 1)]
    rng = np.random.default_rng(seed)
    point = _rates(y, p, threshold)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = np.concatenate([g[j] for g in (grp for grp in strata if grp)
                              for j in rng.integers(0, len(g), len(g))])
        for k, v in _rates(y[idx], p[idx], threshold).items():
            draws[k].append(v)
    alpha = 1.0 - confidence
    units = {"sensitivity": len(strata[1]), "specificity": len({p for p, f in films.items() if (y[f] == 0).any()}),
             "flagged": len(films)}
    out: dict[str, tuple[float, float, float]] = {}
    for k, v in point.items():
        arr = np.array(draws[k], float)
        if not np.isfinite(v) or not np.isfinite(arr).any():
            out[k] = (float("nan"),) * 3
            continue
        lo, hi = np.nanpercentile(arr, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        if k in units and units[k]:
            cp_lo, cp_hi = exact_interval(v * units[k], units[k], alpha)
            lo, hi = min(lo, cp_lo), max(hi, cp_hi)
        out[k] = (v, float(max(0.0, min(lo, v))), float(min(1.0, max(hi, v))))
    return out


def measure(*, source: str, population: str, operating_point: str, threshold: float, y: np.ndarray,
            p: np.ndarray, patients: Sequence[str], in_sample: bool, n_boot: int = N_BOOT, seed: int = 0) -> Claim:
    """The :class:`Claim` of one source's films (``p`` NaN where the model refused the film)."""
    y = np.asarray(y, int)
    ci = patient_bootstrap(y, p, patients, threshold, n_boot=n_boot, seed=seed)

    def iv(name: str) -> Interval | None:
        v = ci[name]
        return None if not np.isfinite(v[0]) else Interval(*v)

    n_pos = int((y == 1).sum())
    return Claim(source=source, population=population, operating_point=operating_point, threshold=float(threshold),
                 in_sample=in_sample, films=int(y.size), patients=len(set(patients)), positives=n_pos,
                 negatives=int(y.size - n_pos), auc=iv("auc") if min(n_pos, y.size - n_pos) > 0 else None,
                 sensitivity=iv("sensitivity") if n_pos else None,
                 specificity=iv("specificity") if y.size - n_pos else None,
                 flagged=iv("flagged") or Interval(0.0, 0.0, 0.0))

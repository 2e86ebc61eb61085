"""``cxr monitor``: does a batch of answers still look like the model's reference?

It compares a predictions CSV (``cxr predict --format csv`` or ``cxr listen
--out``) with the model folder's ``reference.json`` (the served outputs on the
real chest X-rays the model was validated on) and names what moved:

* ``flagged_rate``: the share of films refused as not assessable (Fisher's
  exact test against the reference's count);
* ``positive_rate``: the share of judged films answered Pneumonia at the
  served threshold (Fisher's exact test);
* ``probability`` and ``ood_score``: their distributions (two-sample
  Kolmogorov-Smirnov test).

A check *moves* when its p-value is below ``alpha`` (0.001 by default: four
checks a batch, many batches a month, so a monitor must not cry wolf) **and**
the change is material (:data:`MIN_EFFECT`): a large batch makes tiny, harmless
differences significant. A batch smaller than :data:`MIN_BATCH` films is too
small to judge and is reported as such.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import DataError

#: Smallest batch judged.
MIN_BATCH = 30
#: Smallest change that counts: absolute difference of rates, or the KS statistic.
MIN_EFFECT = {"flagged_rate": 0.03, "positive_rate": 0.15, "probability": 0.2, "ood_score": 0.2}


@dataclass(frozen=True)
class Check:
    """One comparison: the reference and batch values, the test's statistic and p-value, and the verdict."""

    name: str
    reference: float
    batch: float
    statistic: float
    p_value: float
    moved: bool
    n_reference: int
    n_batch: int


def read_predictions(path: Path) -> list[dict]:
    """Rows of a predictions CSV as numbers: ``status``, ``probability`` and ``ood_score`` (``None`` when empty).

    Raises:
        DataError: Not a predictions CSV (no ``status`` column), or no rows.
    """
    try:
        with Path(path).open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "status" not in reader.fieldnames:
                raise DataError(f"{path}: not a predictions CSV (no status column)")
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    out = []
    for i, r in enumerate(rows, 2):
        try:
            status = contract.Status(r["status"])
            prob = float(r["probability"]) if r.get("probability") else None
            ood = float(r["ood_score"]) if r.get("ood_score") else None
        except ValueError:
            raise DataError(f"{path}:{i}: status {r.get('status')!r}, probability or ood_score is not valid") from None
        out.append({"status": status, "probability": prob, "ood_score": ood})
    return out


def reference_from_rows(rows: list[dict], *, what: str) -> dict:
    """A reference made of a site's own baseline batch (e.g. its first week after go-live), in the form of the
    model folder's ``reference.json``."""
    answered = [r for r in rows if r["status"] is not contract.Status.ERROR]
    if not answered:
        raise DataError(f"{what}: no answered rows to use as a baseline")
    return {"what": what, "n": len(answered),
            "flagged_rate": sum(r["status"] is contract.Status.NOT_ASSESSABLE for r in answered) / len(answered),
            "probability": [r["probability"] for r in answered if r["probability"] is not None],
            "ood_score": [r["ood_score"] for r in answered if r["ood_score"] is not None]}


def _fisher(k: int, n: int, k0: int, n0: int) -> float:
    from scipy.stats import fisher_exact

    return float(fisher_exact([[k, n - k], [k0, n0 - k0]])[1])


def compare(rows: list[dict], reference: dict, threshold: float, *, alpha: float = 0.001) -> list[Check]:
    """Every check of the batch ``rows`` against ``reference`` (see the module docstring)."""
    from scipy.stats import ks_2samp

    answered = [r for r in rows if r["status"] is not contract.Status.ERROR]  # errors are failures, not drift
    flagged = sum(r["status"] is contract.Status.NOT_ASSESSABLE for r in answered)
    n0 = int(reference["n"])
    k0 = int(round(reference["flagged_rate"] * n0))
    probs = np.array([r["probability"] for r in answered if r["probability"] is not None], float)
    ref_p = np.asarray(reference["probability"], float)
    oods = np.array([r["ood_score"] for r in answered if r["ood_score"] is not None], float)
    ref_o = np.asarray(reference["ood_score"], float)
    checks = []

    def add(name: str, ref: float, got: float, stat: float, p: float, nr: int, nb: int) -> None:
        moved = bool(math.isfinite(p) and p < alpha and stat >= MIN_EFFECT[name])
        checks.append(Check(name, ref, got, stat, p, moved, nr, nb))

    if answered:
        fr = flagged / len(answered)
        add("flagged_rate", k0 / n0, fr, abs(fr - k0 / n0), _fisher(flagged, len(answered), k0, n0), n0, len(answered))
    if len(probs) and len(ref_p):
        pos, pos0 = int(np.sum(contract.is_positive(probs, threshold))), int(np.sum(contract.is_positive(ref_p, threshold)))
        pr, pr0 = pos / len(probs), pos0 / len(ref_p)
        add("positive_rate", pr0, pr, abs(pr - pr0), _fisher(pos, len(probs), pos0, len(ref_p)), len(ref_p), len(probs))
        ks = ks_2samp(probs, ref_p)
        add("probability", float(np.median(ref_p)), float(np.median(probs)), float(ks.statistic), float(ks.pvalue),
            len(ref_p), len(probs))
    if len(oods) and len(ref_o):
        ks = ks_2samp(oods, ref_o)
        add("ood_score", float(np.median(ref_o)), float(np.median(oods)), float(ks.statistic), float(ks.pvalue),
            len(ref_o), len(oods))
    return checks


def report(checks: list[Check], *, batch: str, model: str, n_rows: int) -> dict:
    """The monitor's result as numbers: every check, what moved, and whether the batch was large enough."""
    return {"batch": batch, "model": model, "n": n_rows, "too_small": n_rows < MIN_BATCH,
            "moved": [c.name for c in checks if c.moved] if n_rows >= MIN_BATCH else [],
            "checks": [asdict(c) for c in checks], "min_effect": MIN_EFFECT, "min_batch": MIN_BATCH}


def markdown(result: dict) -> str:
    """The monitor's report for people (the only place its numbers become text)."""
    verdict = ("too small to judge" if result["too_small"] else
               ("MOVED: " + ", ".join(result["moved"])) if result["moved"] else "nothing moved")
    lines = [f"# Drift check: {result['batch']}", "", f"- model: `{result['model']}`; {result['n']} films; {verdict}", "",
             "| check | reference | batch | statistic | p-value | moved |", "|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['name']} | {c['reference']:.3f} | {c['batch']:.3f} | {c['statistic']:.3f} | "
                     f"{c['p_value']:.2g} | {'YES' if c['moved'] and not result['too_small'] else 'no'} |")
    lines += ["", "Rates: Fisher's exact test; distributions: two-sample Kolmogorov-Smirnov (medians shown). A check "
              "moves when p < alpha and the change is at least " + ", ".join(f"{k} {v}" for k, v in result["min_effect"].items())
              + ".", ""]
    return "\n".join(lines)

"""The claims table the README and ``MODEL_CARD.md`` carry (one generator; a test keeps the README equal), with
PPV, NPV and referrals per 100 films at stated prevalences."""

from __future__ import annotations

from cxr.core import contract
from cxr.core.claims import CLAIMS_FILE, Claims

#: Prevalences at which the card states PPV, NPV and referrals per 100 films.
PREVALENCES = (0.05, 0.10, 0.20)


def _ci(v: list[float] | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v[0]:.{digits}f} ({v[1]:.{digits}f}-{v[2]:.{digits}f})"


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> dict[str, float]:
    """PPV, NPV and referrals per 100 films at ``prevalence`` (Bayes' rule on the stated rates)."""
    tp = sensitivity * prevalence
    fp = (1 - specificity) * (1 - prevalence)
    fn = (1 - sensitivity) * prevalence
    tn = specificity * (1 - prevalence)
    return {"ppv": tp / (tp + fp) if tp + fp else float("nan"), "npv": tn / (tn + fn) if tn + fn else float("nan"),
            "referrals_per_100": 100 * (tp + fp)}


def claims_markdown(claims: Claims, *, own_population_only: bool = True) -> str:
    """The performance table of the README and the card: each source's test patients at its own population's
    operating point (or at every point), then PPV, NPV and referrals per 100 films at stated prevalences."""
    rows = [c for c in claims.claims if not own_population_only or c.population == c.operating_point
            or c.operating_point == contract.SINGLE_OPERATING_POINT]
    read = ("Measured once on locked test patients that chose nothing" if claims.reads <= 1 else
            f"Measured on locked test patients that chose nothing, whose test side was read **{claims.reads} times** "
            "(every read is listed in the file; these are the last read's figures)")
    lines = [
        f"{read} (`{CLAIMS_FILE}`; "
        f"{claims.confidence:.0%} intervals from a {claims.method.split(';')[0]}):",
        "",
        "| source | population | operating point | threshold | films (patients) | Pneumonia | AUC | sensitivity | "
        "specificity | flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        d = c.as_dict()
        lines.append(f"| {c.source} | {c.population} | {c.operating_point} | {c.threshold:.4f} | {c.films} "
                     f"({c.patients}) | {c.positives} | {_ci(d['auc'])} | {_ci(d['sensitivity'])} | "
                     f"{_ci(d['specificity'])} | {_ci(d['flagged'])} |")
    lines += ["", "A film the model refused (`not_assessable`) counts as a **referral**: a positive answer in sensitivity "
              "and specificity, and in *flagged*; AUC is over the films it answered. Intervals resample patients "
              "(a patient's films go together), and each rate's interval covers the exact Clopper-Pearson interval "
              "over the patients that carry it, so several films of one patient never count as several patients."]
    pv = [c for c in rows if c.sensitivity is not None and c.specificity is not None]
    if pv:
        lines += ["", "At a population's own prevalence, from the test sensitivity and specificity above (point "
                  "estimates):", "",
                  "| source | operating point | prevalence | PPV | NPV | referrals per 100 films |", "|---|---|---|---|---|---|"]
        for c in pv:
            for prev in PREVALENCES:
                v = predictive_values(c.sensitivity.point, c.specificity.point, prev)  # type: ignore[union-attr]
                lines.append(f"| {c.source} | {c.operating_point} | {prev:.0%} | {v['ppv']:.3f} | {v['npv']:.3f} | "
                             f"{v['referrals_per_100']:.1f} |")
    return "\n".join(lines) + "\n"

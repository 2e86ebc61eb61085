"""``cxr site-audit``: what a hospital runs before go-live, on its own labelled sample.

Every film of the sample is screened by the served model exactly as in
service. A film the model refuses (``not_assessable``) or cannot read
(``error``) is a *referral*: it goes to a human reader, so it counts as
flagged positive for sensitivity and specificity, and it is listed. The
report holds:

* per-class counts and the flagged (refused) rate;
* ROC AUC on the assessable films with a bootstrap 95% interval;
* sensitivity and specificity at the served operating point (referrals
  counted as positive) with two-sided 95% Clopper-Pearson intervals;
* calibration (reliability bins, ECE) on the assessable films;
* the ``ood_score`` histogram against the model's reference histogram.

The go/no-go is decided on **bounds** at a stated one-sided confidence
(:data:`CONFIDENCE`, 95% by default): the lower bounds of sensitivity,
specificity and ROC AUC must reach the card's targets (:class:`Targets`) and
the upper bound of the flagged share must stay under its target. A rate's
bound is the more cautious of the exact Clopper-Pearson bound (films as if
independent) and the patient bootstrap's (:func:`cxr.train.claims.patient_bootstrap`,
a patient's films drawn together); the AUC's is the patient bootstrap's.

A sample that cannot support its targets (even a perfect result's bound would
miss one) is refused before anything is screened (:class:`InsufficientSample`,
exit 2), with the films per class it would need (:func:`films_needed`); so is a
one-class sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError, ExitCode
from cxr.core.model_dir import ModelCard
from cxr.train import metrics

if TYPE_CHECKING:
    from cxr.client import PneumoniaClient

#: Exit codes of ``cxr site-audit`` and ``cxr adapt``: targets hold / targets missed (bad input is 2).
GO, NO_GO = ExitCode.OK, ExitCode.CHECK_FAILED
#: One-sided confidence of every bound the decision reads.
CONFIDENCE = 0.95


class InsufficientSample(CxrError):
    """A labelled sample that cannot show its targets whatever the model does (one class, or too few films)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Targets:
    """Go-live targets stated in the model card (:attr:`cxr.core.model_dir.ModelCard.go_live_targets`).

    Attributes:
        sensitivity: Minimum sensitivity at the operating point (referrals count as positive).
        specificity: Minimum specificity there.
        roc_auc: Minimum ROC AUC on the assessable films.
        flagged: Maximum share of films refused as not assessable (or unreadable).
    """

    sensitivity: float = 0.90
    specificity: float = 0.60
    roc_auc: float = 0.85
    flagged: float = 0.02

    def __post_init__(self) -> None:
        for name in ("sensitivity", "specificity", "roc_auc", "flagged"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"target {name} must be in [0, 1], got {v!r}")

    @classmethod
    def from_card(cls, card: ModelCard) -> Targets:
        return cls(**{k: v for k, v in card.go_live_targets.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Screened:
    """One film of a labelled sample as the served model answered it (numbers, not text)."""

    path: str
    label: int
    status: contract.Status
    probability: float | None = None
    ood_score: float | None = None
    rule: str | None = None
    patient: str | None = None

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label}")
        object.__setattr__(self, "status", contract.Status(self.status))
        if (self.status is contract.Status.OK) != (self.probability is not None):
            raise ValueError(f"{self.path}: a probability comes with status ok, and only with it")


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided exact binomial interval of ``k / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


#: What a sample without patient ids costs (the warning both site tools print).
NO_PATIENTS_WARNING = ("no patient ids (MANIFEST.csv with a patient column): patients are guessed from file names, so "
                       "films of one patient may count as independent (intervals too narrow) and one patient may land "
                       "in two parts of a split")


@dataclass(frozen=True)
class SiteSample:
    """A hospital's labelled folder as the site tools use it.

    Attributes:
        films: The films to use (patients namespaced by the folder), sorted by path.
        set_aside: Films the model's ``provenance.csv`` lists (by sha256): the model trained, selected or
            calibrated on them, so they are never scored as the site's evidence.
        patients_known: Every film's patient comes from ``MANIFEST.csv`` (else from file names).
        digests: sha256 of every film (``films`` and ``set_aside``), by path.
    """

    films: tuple
    set_aside: tuple
    patients_known: bool
    digests: dict

    def __post_init__(self) -> None:
        if not self.films and not self.set_aside:
            raise ValueError("a site sample has films")

    @property
    def n_pos(self) -> int:
        return sum(s.label == 1 for s in self.films)

    @property
    def n_neg(self) -> int:
        return sum(s.label == 0 for s in self.films)

    def set_aside_by_role(self, provenance: list[dict]) -> dict[str, int]:
        roles: dict[str, set[str]] = {}
        for r in provenance:
            roles.setdefault(r["sha256"], set()).add(r["role"])
        out: dict[str, int] = {}
        for s in self.set_aside:
            for role in sorted(roles.get(self.digests[s.path], ())):
                out[role] = out.get(role, 0) + 1
        return out


def site_sample(folder: Path, provenance: list[dict]) -> SiteSample:
    """The labelled folder, with the films ``provenance`` (the model folder's rows) lists set aside."""
    import hashlib

    from cxr.train import data as data_mod

    folder = Path(folder)
    samples = data_mod.folder_samples(folder)
    named = data_mod.manifest_patients(folder)
    known = all(s.path.name in named for s in samples)
    digests = {s.path: hashlib.sha256(s.path.read_bytes()).hexdigest() for s in samples}
    listed = {r["sha256"] for r in provenance}
    return SiteSample(films=tuple(s for s in samples if digests[s.path] not in listed),
                      set_aside=tuple(s for s in samples if digests[s.path] in listed),
                      patients_known=known, digests=digests)


def lower_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) lower bound of ``k / n``."""
    lo, _ = clopper_pearson(k, n, alpha=2 * (1 - confidence))
    return lo


def upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) upper bound of ``k / n``."""
    _, hi = clopper_pearson(k, n, alpha=2 * (1 - confidence))
    return hi


@dataclass(frozen=True)
class Needs:
    """The smallest sample whose *perfect* result would show the targets at ``confidence``: every positive
    referred, every negative cleared, no film flagged (a real model needs more).

    Attributes:
        positives: Pneumonia films for the sensitivity target.
        negatives: Normal films for the specificity target.
        films: Films in all for the flagged target.
        confidence: One-sided confidence of the bounds.
    """

    positives: int
    negatives: int
    films: int
    confidence: float

    def __post_init__(self) -> None:
        if min(self.positives, self.negatives, self.films) < 1 or not 0.5 < self.confidence < 1:
            raise ValueError("needs are at least one film each, at a confidence in (0.5, 1)")

    def met_by(self, n_pos: int, n_neg: int) -> bool:
        return n_pos >= self.positives and n_neg >= self.negatives and n_pos + n_neg >= self.films

    def text(self) -> str:
        return (f">= {self.positives} Pneumonia and >= {self.negatives} Normal films, >= {self.films} in all "
                f"(what a perfect result needs for its {self.confidence:.0%} bounds to reach the targets)")


def _smallest_n(ok: Callable[[int], bool]) -> int:
    n = 1
    while not ok(n):
        n *= 2
        if n > 1_000_000:
            raise ValueError("a target that no sample can show (1.0 or 0.0)")
    lo = n // 2 + 1 if n > 1 else 1
    while lo < n:  # the bound of a perfect result only improves with n: bisect
        mid = (lo + n) // 2
        n, lo = (mid, lo) if ok(mid) else (n, mid + 1)
    return n


def films_needed(targets: Targets, confidence: float = CONFIDENCE) -> Needs:
    """Films per class a sample needs before it can show ``targets`` (:class:`Needs`)."""
    def rate_n(target: float) -> int:
        return 1 if target <= 0 else _smallest_n(lambda n: lower_bound(n, n, confidence) >= target)

    flagged = 1 if targets.flagged >= 1 else _smallest_n(lambda n: upper_bound(0, n, confidence) <= targets.flagged)
    return Needs(positives=rate_n(targets.sensitivity), negatives=rate_n(targets.specificity), films=flagged,
                 confidence=confidence)


def check_sample(n_pos: int, n_neg: int, targets: Targets, confidence: float = CONFIDENCE) -> Needs:
    """Refuse a sample that cannot show its targets (before anything is screened).

    Raises:
        InsufficientSample: One class only, or fewer films than :func:`films_needed` (one line, with the needs).
    """
    needs = films_needed(targets, confidence)
    if min(n_pos, n_neg) == 0:
        raise InsufficientSample(f"the sample has {n_pos} Pneumonia and {n_neg} Normal films: one class cannot show "
                                 f"sensitivity, specificity and AUC; label both classes ({needs.text()})")
    if not needs.met_by(n_pos, n_neg):
        raise InsufficientSample(f"the sample ({n_pos} Pneumonia, {n_neg} Normal) cannot support its targets: it "
                                 f"needs {needs.text()}")
    return needs


def _rate(k: int, n: int) -> dict:
    lo, hi = clopper_pearson(k, n)
    return {"value": k / n if n else float("nan"), "k": k, "n": n, "ci95": [lo, hi]}


def audit(films: list[Screened], *, threshold: float, targets: Targets, reference: dict | None = None,
          n_boot: int = 1000, confidence: float = CONFIDENCE) -> dict:
    """The audit as numbers (see the module docstring). ``reference``: the model's ``reference.json``.

    ``go`` holds when every check's bound at ``confidence`` (one-sided) meets its target.
    """
    from cxr.train.claims import patient_bootstrap

    y = np.array([f.label for f in films], int)
    ok = np.array([f.status is contract.Status.OK for f in films], bool)  # bool even when empty (~ on float fails)
    p = np.array([f.probability if f.probability is not None else np.nan for f in films], float)
    referred = ~ok | (ok & contract.is_positive(np.nan_to_num(p, nan=0.0), threshold))
    counts = {}
    for label, name in enumerate(contract.LABELS):
        m = y == label
        counts[name] = {"films": int(m.sum()), "flagged": int((m & ~ok).sum()),
                        "flagged_rate": float((m & ~ok).mean() / m.mean()) if m.any() else float("nan")}
    tp, n_pos = int((referred & (y == 1)).sum()), int((y == 1).sum())
    tn, n_neg = int((~referred & (y == 0)).sum()), int((y == 0).sum())
    n_flag = int((~ok).sum())
    patients = [f.patient or f.path for f in films]
    result: dict = {
        "n": len(films), "threshold": threshold, "counts": counts, "confidence": confidence,
        "patients": len(set(patients)), "patients_known": all(f.patient for f in films),
        "flagged": _rate(n_flag, len(films)),
        "sensitivity": _rate(tp, n_pos), "specificity": _rate(tn, n_neg),
        "referrals_count_as_positive": True,
    }
    boot = (patient_bootstrap(y, p, patients, threshold, n_boot=n_boot, confidence=2 * confidence - 1)
            if films else {k: (float("nan"),) * 3 for k in ("auc", "sensitivity", "specificity", "flagged")})
    yo, po = y[ok], p[ok]
    if len(set(yo)) == 2:
        ci = metrics.bootstrap_ci(yo, po, lambda a, b: {"roc_auc": metrics.roc_auc(a, b)}, n_boot=n_boot)
        result["roc_auc"] = {"value": metrics.roc_auc(yo, po), "ci95": list(ci["roc_auc"]), "n": int(ok.sum()),
                             "patient_bootstrap": list(boot["auc"])}
        result["calibration"] = {"ece": metrics.expected_calibration_error(yo, po),
                                 "bins": metrics.reliability(yo, po)}
    else:
        result["roc_auc"] = {"value": float("nan"), "ci95": [float("nan"), float("nan")], "n": int(ok.sum()),
                             "patient_bootstrap": [float("nan")] * 3}
        result["calibration"] = None
    scores = np.array([f.ood_score for f in films if f.ood_score is not None], float)
    result["ood_score"] = {"values": scores.tolist(),
                           "reference": (reference or {}).get("ood_score"),
                           "threshold": (reference or {}).get("ood_threshold")}
    result["refused"] = [{"path": f.path, "label": contract.LABELS[f.label], "status": f.status.value, "rule": f.rule}
                         for f in films if f.status is not contract.Status.OK]

    def low(k: int, n: int, b: float) -> float:  # the more cautious of the exact and the patient bootstrap bound
        return min(lower_bound(k, n, confidence), b) if n and math.isfinite(b) else (
            lower_bound(k, n, confidence) if n else float("nan"))

    checks = {
        "sensitivity": (result["sensitivity"]["value"], ">=", targets.sensitivity,
                        low(tp, n_pos, boot["sensitivity"][1])),
        "specificity": (result["specificity"]["value"], ">=", targets.specificity,
                        low(tn, n_neg, boot["specificity"][1])),
        "roc_auc": (result["roc_auc"]["value"], ">=", targets.roc_auc, result["roc_auc"]["patient_bootstrap"][1]),
        "flagged": (result["flagged"]["value"], "<=", targets.flagged,
                    max(upper_bound(n_flag, len(films), confidence), boot["flagged"][2]) if films else float("nan")),
    }
    result["targets"] = asdict(targets)
    result["checks"] = {}
    for name, (value, op, target, bound) in checks.items():
        point = math.isfinite(value) and (value >= target if op == ">=" else value <= target)
        shown = math.isfinite(bound) and (bound >= target if op == ">=" else bound <= target)
        result["checks"][name] = {"value": value, "op": op, "target": target, "holds": bool(shown),
                                  "bound": bound, "point_meets_target": bool(point)}
    result["go"] = all(c["holds"] for c in result["checks"].values())
    return result


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def summary(result: dict) -> str:
    """The decision and every check, one line each (for the terminal)."""
    conf = result.get("confidence", CONFIDENCE)
    lines = [f"decision: {'GO' if result['go'] else 'NO-GO'} (every {conf:.0%} bound against the card's target)"]
    for name, ch in result["checks"].items():
        verdict = "holds" if ch["holds"] else ("MISSED" if math.isfinite(ch["value"]) else "NOT MEASURABLE (one class)")
        lines.append(f"  {name:<12} {_fmt(ch['value'])}  target {ch['op']} {_fmt(ch['target'], 2)}  {conf:.0%} bound "
                     f"{_fmt(ch['bound'])}  {verdict}"
                     + (" (the point estimate meets it; the bound does not)" if ch["point_meets_target"] and not ch["holds"]
                        else ""))
    return "\n".join(lines)


def markdown(result: dict, *, title: str, model: str, sample: str) -> str:
    """The audit as Markdown (the only place its numbers become text)."""
    c = result["checks"]
    lines = [
        f"# {title}", "",
        f"- model: `{model}`; threshold {_fmt(result['threshold'], 4)}"
        + (f" (operating point `{result['operating_point']}`)" if result.get("operating_point") else ""),
        f"- sample: `{sample}` ({result['n']} films)",
        f"- decision: **{'GO' if result['go'] else 'NO-GO'}** (every one-sided "
        f"{result.get('confidence', CONFIDENCE):.0%} bound against the card's target)",
        f"- patients: {result.get('patients', 'n/a')}" + ("" if result.get("patients_known", True) else
                                                           " (guessed from file names: intervals may be too narrow)"),
        "", "| check | value | target | bound | holds (bound) | point meets target |", "|---|---|---|---|---|---|",
    ]
    for name, ch in c.items():
        holds = "yes" if ch["holds"] else ("NO" if math.isfinite(ch["value"]) else "not measurable (one class)")
        lines.append(f"| {name} | {_fmt(ch['value'])} | {ch['op']} {_fmt(ch['target'], 2)} | {_fmt(ch['bound'])} | "
                     f"{holds} | {'yes' if ch['point_meets_target'] else 'no'} |")
    lines += ["", "| class | films | flagged | flagged rate |", "|---|---|---|---|"]
    for name, cnt in result["counts"].items():
        lines.append(f"| {name} | {cnt['films']} | {cnt['flagged']} | {_fmt(cnt['flagged_rate'])} |")
    s, sp = result["sensitivity"], result["specificity"]
    lines += [
        "",
        f"Sensitivity {s['k']}/{s['n']}, specificity {sp['k']}/{sp['n']} (Clopper-Pearson 95% intervals "
        f"{_fmt(s['ci95'][0])}-{_fmt(s['ci95'][1])} and {_fmt(sp['ci95'][0])}-{_fmt(sp['ci95'][1])}); films the model "
        "refused count as referrals (positive). ROC AUC on the assessable films: "
        f"{_fmt(result['roc_auc']['value'])} ({_fmt(result['roc_auc']['ci95'][0])}-{_fmt(result['roc_auc']['ci95'][1])}, "
        "bootstrap).",
    ]
    if result["calibration"]:
        lines.append(f"Calibration: ECE {_fmt(result['calibration']['ece'])} (reliability in calibration.png).")
    lines += ["", f"## Refused films ({len(result['refused'])})", ""]
    lines += [f"- `{r['path']}` ({r['label']}): {r['status']}" + (f", rule `{r['rule']}`" if r["rule"] else "")
              for r in result["refused"]] or ["none"]
    lines += ["", *[f"![{n}]({f})" for n, f in result.get("plots", {}).items()], ""]
    return "\n".join(lines)


def plots(result: dict, films: list[Screened], out_dir: Path) -> dict[str, str]:
    """PNG figures: counts and flagged per class, ROC, reliability, ood_score histogram against the reference."""
    from cxr.train.plots import plt, save_figure

    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(result["counts"])
    films_n = [result["counts"][n]["films"] for n in names]
    flag_n = [result["counts"][n]["flagged"] for n in names]
    ax.bar(names, films_n, label="films", color="#9ecae1")
    ax.bar(names, flag_n, label="flagged (not assessable)", color="#de2d26")
    ax.set_title("Films per class and flagged")
    ax.legend()
    out["counts"] = save_figure(fig, out_dir / "counts.png").name
    ok = [f for f in films if f.probability is not None]
    y = np.array([f.label for f in ok])
    p = np.array([f.probability for f in ok], float)
    if len(set(y)) == 2:
        fpr, tpr, _ = metrics.roc_curve(y, p)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, label=f"AUC {result['roc_auc']['value']:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title("ROC (assessable films)")
        ax.legend(loc="lower right")
        out["roc"] = save_figure(fig, out_dir / "roc.png").name
        bins = [b for b in result["calibration"]["bins"] if b["count"]]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.plot([b["mean_prob"] for b in bins], [b["frac_pos"] for b in bins], "o-")
        ax.set_xlabel("mean predicted P(pneumonia)")
        ax.set_ylabel("observed share Pneumonia")
        ax.set_title(f"Calibration (ECE {result['calibration']['ece']:.3f})")
        out["calibration"] = save_figure(fig, out_dir / "calibration.png").name
    scores = result["ood_score"]["values"]
    if scores:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ref = result["ood_score"]["reference"]
        hi = max([*scores, *(ref or [])]) * 1.05
        edges = np.linspace(0, hi, 40)
        if ref:
            ax.hist(ref, bins=edges, density=True, alpha=0.5, label="reference (model card)")
        ax.hist(scores, bins=edges, density=True, alpha=0.6, label="this sample")
        if result["ood_score"]["threshold"]:
            ax.axvline(result["ood_score"]["threshold"], color="k", linestyle="--", label="refusal threshold")
        ax.set_xlabel("ood_score")
        ax.set_title("Out-of-distribution score")
        ax.legend()
        out["ood_score"] = save_figure(fig, out_dir / "ood_score.png").name
    return out


def write(result: dict, films: list[Screened], out_dir: Path, *, model: str, sample: str) -> None:
    """``audit.json``, ``audit.md`` and the PNGs into ``out_dir`` (written whole or not at all)."""
    from cxr.core.durable import write_durably

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result, films, out_dir)
    result.update(model=model, sample=sample)
    write_durably(out_dir / "audit.json", (json.dumps(result, indent=1, default=_json_default) + "\n").encode())
    write_durably(out_dir / "audit.md", markdown(result, title="Site audit", model=model, sample=sample).encode())


def _json_default(o: object) -> object:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def targets_from(card: ModelCard, overrides: Sequence[str] = ()) -> Targets:
    """The card's go-live targets with ``NAME=VALUE`` overrides (``--targets``; one-line errors)."""
    fields = Targets.__dataclass_fields__
    values = {k: v for k, v in card.go_live_targets.items() if k in fields}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise CxrError(f"--targets {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        try:
            values[name] = float(value)
        except ValueError:
            raise CxrError(f"--targets {item!r}: {value!r} is not a number") from None
    try:
        return Targets(**values)
    except ValueError as exc:
        raise CxrError(str(exc)) from None


def plan_text(targets: Targets, confidence: float) -> str:
    """What a site must label before its audit can show ``targets`` at ``confidence`` (``--plan``)."""
    if not 0.5 < confidence < 1:
        raise CxrError(f"--confidence must be in (0.5, 1), got {confidence}")
    needs = films_needed(targets, confidence)
    return (f"targets {targets.sensitivity:.2f} sensitivity, {targets.specificity:.2f} specificity, "
            f"{targets.roc_auc:.2f} AUC, <= {targets.flagged:.1%} flagged at {confidence:.0%} confidence: label "
            f"{needs.text()}; more where the model errs or patients have several films")


def screen_labelled(client: PneumoniaClient, films: Sequence[Any], *, chunk: int = 64,
                    progress: bool = False) -> list[Screened]:
    """Screen labelled films (``path``, ``label``, ``patient``) with ``client`` as in service."""
    from tqdm import tqdm

    out: list[Screened] = []
    with tqdm(total=len(films), unit="film", desc="screen", disable=not progress) as bar:
        for i in range(0, len(films), chunk):
            part = films[i : i + chunk]
            for s, pred in zip(part, client.predict([str(x.path) for x in part])):
                out.append(Screened(str(s.path), s.label, pred.status, pred.probability, pred.ood_score, pred.rule,
                                    s.patient))
            bar.update(len(part))
    return out


@dataclass(frozen=True)
class SiteAuditOptions:
    """One ``cxr site-audit`` run.

    Attributes:
        sample: The labelled folder ``{NORMAL,PNEUMONIA}/`` (MANIFEST.csv with patients recommended).
        model_dir: The served model's folder (card, provenance, reference; its sha256 must be the served one).
        connect: Opens the client of the served model.
        out: Report folder (audit.md, audit.json, PNGs).
        targets: ``NAME=VALUE`` overrides of the card's targets.
        confidence: One-sided confidence of the bounds the decision reads, in (0.5, 1).
        operating_point: The served point judged (default: the model's default point).
    """

    sample: Path
    model_dir: Path
    connect: Callable[[], PneumoniaClient]
    out: Path
    targets: tuple[str, ...] = ()
    confidence: float = CONFIDENCE
    operating_point: str | None = None

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1:
            raise CxrError(f"--confidence must be in (0.5, 1), got {self.confidence}")


def site_audit(opts: SiteAuditOptions, *, say: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Screen the site's sample with the served model and judge it against the card's targets; writes the report
    into ``opts.out`` and returns the result (``go``: the decision).

    Raises:
        InsufficientSample: The sample cannot show its targets (before anything is screened).
        CxrError: An unreadable sample, or a served model that is not the folder's.
    """
    import logging

    from cxr.core.model_dir import ModelDir
    from cxr.core.paths import relative

    folder = ModelDir(opts.model_dir)
    targets = targets_from(folder.card(), opts.targets)
    needs = films_needed(targets, opts.confidence)
    try:
        sample = site_sample(opts.sample, folder.provenance())
    except ValueError as exc:
        raise CxrError(f"{opts.sample}: {exc}") from None
    if not sample.patients_known:
        logging.getLogger(__name__).warning("%s: %s", relative(opts.sample), NO_PATIENTS_WARNING)
    aside = sample.set_aside_by_role(folder.provenance())
    if sample.set_aside:
        say(f"set aside: {len(sample.set_aside)} films the model's provenance lists (as "
            + ", ".join(f"{k} {v}" for k, v in aside.items()) + "); they are not the site's evidence")
    check_sample(sample.n_pos, sample.n_neg, targets, opts.confidence)
    with opts.connect() as client:
        info = client.info
        films = screen_labelled(client, list(sample.films), progress=progress)
    card = folder.card()
    if info.sha256 and card.sha256 != info.sha256:
        raise CxrError(f"the served model ({info.sha256[:12]}) is not the one in {folder.path} "
                       f"({card.sha256[:12]}); give --model-repository of the served model")
    point, threshold = info.threshold_for(opts.operating_point)
    say(f"operating point {point}: threshold {threshold:.4f}")
    result = audit(films, threshold=threshold, targets=targets, reference=folder.reference(),
                   confidence=opts.confidence)
    result["operating_point"] = point
    result["set_aside"] = {"films": len(sample.set_aside), "by_role": aside}
    result["needs"] = {"positives": needs.positives, "negatives": needs.negatives, "films": needs.films}
    write(result, films, opts.out, model=f"{info.name} v{info.version} ({(info.sha256 or '')[:12]})",
          sample=relative(opts.sample))
    return result

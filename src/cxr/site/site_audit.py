"""``cxr site-audit``: what a hospital runs before go-live, on its own labelled sample.

Every film of the sample is screened by the served model exactly as in
service. A film the model refuses (``not_assessable``) or cannot read
(``error``) is a *referral*: it goes to a human reader, so it counts as
flagged positive for sensitivity and specificity, and it is listed. The
report holds:

* per-class counts and the flagged (refused) rate;
* ROC AUC **by patient** (a patient's largest score) with DeLong's standard
  error and a one-sided bound on the logit scale (:mod:`cxr.core.stats`);
* sensitivity and specificity at the served operating point (referrals
  counted as positive) with two-sided 95% Clopper-Pearson intervals;
* calibration (reliability bins, ECE) on the assessable films;
* the ``ood_score`` histogram against the model's reference histogram;
* the targets that applied (the card's, or the site's own given with ``--targets``), the patients per class
  needed when the answer is no (:func:`patients_needed`), and the earlier attempts on the same sample.

The go/no-go is decided on **bounds** at a stated one-sided confidence
(:data:`CONFIDENCE`, 95% by default; below :data:`PUBLISH_CONFIDENCE` the answer is never go): the lower bounds
of sensitivity, specificity and ROC AUC must reach the targets (:class:`Targets`) and the upper bound of the
flagged share must stay under its target. A rate's bound is the more cautious of the exact Clopper-Pearson bound
(films as if independent; :func:`cxr.core.stats.lower_bound`) and the patient bootstrap's
(:func:`cxr.train.claims.patient_bootstrap`, a patient's films drawn together); the AUC's is DeLong's by patient,
whose coverage ``tests/test_stats.py`` checks by simulation.

A site model (``cxr adapt``) must also beat the model in service on the same patients
(:func:`compare_with_service`). Every run on a sample is recorded in the report folder's
:data:`ATTEMPTS_FILE` (the sample's sha256, the options, the outcome; :func:`record_attempt`).

A sample that cannot support its targets (even a perfect result's bound would
miss one) is refused before anything is screened (:class:`InsufficientSample`,
exit 2), with the **patients** per class it would need (:func:`films_needed`); so is a
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

from cxr.core import contract, stats
from cxr.core.errors import CxrError, ExitCode
from cxr.core.model_dir import ModelCard
from cxr.train import metrics

if TYPE_CHECKING:
    from cxr.client import PneumoniaClient

#: Exit codes of ``cxr site-audit`` and ``cxr adapt``: targets hold / targets missed (bad input is 2).
GO, NO_GO = ExitCode.OK, ExitCode.CHECK_FAILED
#: One-sided confidence of every bound the decision reads.
CONFIDENCE = 0.95
#: The least confidence a go (and a published site model) may be decided at: a lower one may be asked for to
#: explore, never to go live (issue 33: --confidence was varied down to 0.51 until GO).
PUBLISH_CONFIDENCE = 0.95


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
    """Two-sided exact binomial interval of ``k / n`` (:func:`cxr.core.stats.exact_interval`, the one
    implementation)."""
    return stats.exact_interval(k, n, alpha)


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
    from cxr.core.integrity import sha256_file
    from cxr.train import data as data_mod

    folder = Path(folder)
    samples = data_mod.folder_samples(folder)
    named = data_mod.manifest_patients(folder)
    known = all(s.path.name in named for s in samples)
    digests = {s.path: sha256_file(s.path) for s in samples}
    listed = {r["sha256"] for r in provenance}
    return SiteSample(films=tuple(s for s in samples if digests[s.path] not in listed),
                      set_aside=tuple(s for s in samples if digests[s.path] in listed),
                      patients_known=known, digests=digests)


#: The attempts log of a report folder: one JSON line per ``cxr site-audit`` or ``cxr adapt`` run, append-only.
ATTEMPTS_FILE = "attempts.jsonl"


def bare_patient(patient: str) -> str:
    """A patient id without the folder namespace the site tools give it (``site:123`` -> ``123``), so renaming
    or copying the sample's folder changes neither its hash nor its audit membership."""
    return str(patient).split(":", 1)[-1]


def sample_sha256(sample: SiteSample) -> str:
    """The sample's identity: sha256 over its films' (label, patient, content sha256), sorted; the folder's
    name, the files' names and their order do not enter, so a copied or renamed sample is the same sample."""
    import hashlib

    lines = sorted(f"{s.label}\t{bare_patient(s.patient)}\t{sample.digests[s.path]}"
                   for s in (*sample.films, *sample.set_aside))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def earlier_attempts(report_dir: Path, sample_sha: str) -> list[dict]:
    """The attempts the report folder's log holds on the sample ``sample_sha`` (oldest first); lines that are
    not JSON objects are skipped (a torn line is cut when the log is next appended to)."""
    path = Path(report_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("sample_sha256") == sample_sha:
            out.append(rec)
    return out


def record_attempt(report_dir: Path, *, command: str, sample: str, sample_sha: str, options: dict, outcome: str,
                   model_sha256: str = "", detail: dict | None = None) -> dict:
    """Append one attempt to the report folder's log (:data:`ATTEMPTS_FILE`; fsynced before the call returns,
    never rewritten) and return it. ``outcome``: ``go``, ``no-go`` or ``insufficient``."""
    import datetime

    from cxr.core.durable import AppendOnlyLines

    if outcome not in ("go", "no-go", "insufficient"):
        raise ValueError(f"outcome must be go, no-go or insufficient, got {outcome!r}")
    rec = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
           "sample": sample, "sample_sha256": sample_sha, "model_sha256": model_sha256, "outcome": outcome,
           "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
           **({"detail": detail} if detail else {})}
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    log = AppendOnlyLines(Path(report_dir) / ATTEMPTS_FILE)
    try:
        log.append(json.dumps(rec, sort_keys=True, default=str))
    finally:
        log.close()
    return rec


def targets_source(overrides: Sequence[str]) -> str:
    """Whose targets applied: ``the card`` or ``the site (NAME=VALUE ...)`` (written into every report)."""
    return "the card" if not overrides else "the site (" + " ".join(overrides) + ", the rest the card's)"


def lower_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) lower bound of ``k / n`` (:func:`cxr.core.stats.lower_bound`)."""
    return stats.lower_bound(k, n, confidence)


def upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) upper bound of ``k / n`` (:func:`cxr.core.stats.upper_bound`)."""
    return stats.upper_bound(k, n, confidence)


@dataclass(frozen=True)
class Needs:
    """The smallest sample whose *perfect* result would show the targets at ``confidence``: every positive
    referred, every negative cleared, no film flagged (a real model needs more). Counted in **patients**: the
    bounds resample patients (a patient's films together), so a second film of a patient adds little.

    Attributes:
        positives: Patients with a Pneumonia film, for the sensitivity target.
        negatives: Patients with a Normal film, for the specificity target.
        films: Patients in all, for the flagged target (the name is kept for the reports that read it).
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
        return (f">= {self.positives} Pneumonia and >= {self.negatives} Normal patients, >= {self.films} patients "
                f"in all (what a perfect result needs for its {self.confidence:.0%} bounds to reach the targets)")


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
    """Patients per class a sample needs before it can show ``targets`` (:class:`Needs`)."""
    def rate_n(target: float) -> int:
        return 1 if target <= 0 else _smallest_n(lambda n: lower_bound(n, n, confidence) >= target)

    try:
        flagged = 1 if targets.flagged >= 1 else _smallest_n(lambda n: upper_bound(0, n, confidence) <= targets.flagged)
        pos, neg = rate_n(targets.sensitivity), rate_n(targets.specificity)
    except ValueError:
        raise InsufficientSample(f"no sample can show sensitivity {targets.sensitivity}, specificity "
                                 f"{targets.specificity} and at most {targets.flagged:.1%} flagged at its bounds (a "
                                 "rate target of 1, or a flagged target of 0)") from None
    return Needs(positives=pos, negatives=neg, films=flagged, confidence=confidence)


def auc_targets_need(targets: Targets, n_pos: int | None = None, n_neg: int | None = None,
                     confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The ROC AUC a model needs before one threshold can give the sensitivity and specificity targets together
    (binormal, equal variances: :func:`cxr.core.stats.binormal_auc`): ``in_truth`` at the targets themselves, and
    ``at_bounds`` at the rates a sample of ``n_pos`` Pneumonia and ``n_neg`` Normal films must show for its one-sided
    exact bounds to reach them (:func:`cxr.core.stats.rate_to_show`). ``at_bounds`` is ``None`` without counts, and
    where only every film right would do (``bounds_need``: ``"every film right"``) or nothing would (``"more
    films"``). About, not exact: real scores are not binormal, and a patient bootstrap's bound can be more
    cautious."""
    if not (0 < targets.sensitivity < 1 and 0 < targets.specificity < 1):
        return {"in_truth": None, "at_bounds": None, "bounds_need": None}
    truth = stats.binormal_auc(targets.sensitivity, targets.specificity)
    at_bounds, bounds_need = None, None
    if n_pos and n_neg:
        sens = stats.rate_to_show(targets.sensitivity, n_pos, confidence)
        spec = stats.rate_to_show(targets.specificity, n_neg, confidence)
        if sens is None or spec is None:
            bounds_need = "more films"
        elif sens == 1 or spec == 1:
            bounds_need = "every film right"
        else:
            at_bounds = stats.binormal_auc(sens, spec)
    return {"in_truth": truth, "at_bounds": at_bounds, "bounds_need": bounds_need}


def patients_by_class(films: Sequence[Any]) -> tuple[int, int, int]:
    """(patients with a Pneumonia film, patients with a Normal film, patients) of films that have ``label`` and
    ``patient`` (a film without a patient is a patient of its own, by ``path``)."""
    pos: set[str] = set()
    neg: set[str] = set()
    for f in films:
        pid = str(f.patient or f.path)
        (pos if f.label == 1 else neg).add(pid)
    return len(pos), len(neg), len(pos | neg)


def check_sample(n_pos: int, n_neg: int, targets: Targets, confidence: float = CONFIDENCE,
                 n_all: int | None = None) -> Needs:
    """Refuse a sample that cannot show its targets (before anything is screened). The counts are patients
    (:func:`patients_by_class`); ``n_all``: patients in all (``n_pos + n_neg`` when not given).

    Raises:
        InsufficientSample: One class only, or fewer patients than :func:`films_needed` (one line, with the needs).
    """
    needs = films_needed(targets, confidence)
    if min(n_pos, n_neg) == 0:
        raise InsufficientSample(f"the sample has {n_pos} Pneumonia and {n_neg} Normal patients: one class cannot "
                                 f"show sensitivity, specificity and AUC; label both classes ({needs.text()})")
    total = n_pos + n_neg if n_all is None else n_all
    if not (needs.met_by(n_pos, n_neg) and total >= needs.films):
        raise InsufficientSample(f"the sample ({n_pos} Pneumonia, {n_neg} Normal patients, {total} in all) cannot "
                                 f"support its targets: it needs {needs.text()}")
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
    result["roc_auc"] = auc_by_patient(y, p, patients, confidence)
    result["roc_auc"]["films"] = int(ok.sum())
    if len(set(yo)) == 2:
        result["calibration"] = {"ece": metrics.expected_calibration_error(yo, po),
                                 "bins": metrics.reliability(yo, po)}
    else:
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
        "roc_auc": (result["roc_auc"]["value"], ">=", targets.roc_auc, result["roc_auc"]["bound"]),
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
    result["confidence_allows_go"] = confidence >= PUBLISH_CONFIDENCE
    result["go"] = all(c["holds"] for c in result["checks"].values()) and result["confidence_allows_go"]
    result["needs_if_no"] = patients_needed(result)
    result["auc_targets_need"] = auc_targets_need(targets, n_pos, n_neg, confidence)
    return result


def auc_by_patient(y: np.ndarray, p: np.ndarray, patients: Sequence[str], confidence: float = CONFIDENCE) -> dict:
    """ROC AUC with a patient as one case (its largest score among the films it was answered on; Pneumonia when
    any film is), DeLong's standard error and the one-sided lower bound at ``confidence``
    (:func:`cxr.core.stats.auc_bound`, whose coverage ``tests/test_stats.py`` measures). NaN without both
    classes."""
    yp, pp, names = stats.per_patient(y, p, patients)
    nan = float("nan")
    out = {"value": nan, "se": nan, "bound": nan, "n": len(names), "positives": int(yp.sum()),
           "negatives": int(len(yp) - yp.sum()), "by": "patient (largest score), DeLong, logit scale",
           "confidence": confidence}
    if len(set(yp.tolist())) == 2:
        b = stats.auc_bound(yp, pp, confidence)
        out.update(value=b.auc, se=b.se, bound=b.lower)
    return out


def patients_needed(result: dict) -> dict[str, int | None]:
    """For every check that failed, the patients its class would need for the bound to reach the target if the
    observed figure held (``None``: the observed figure itself misses, so no sample shows it). Sensitivity:
    Pneumonia patients; specificity: Normal patients; flagged: patients in all; AUC: both classes together, in
    the proportion observed (DeLong's variance falls as 1 / n)."""
    conf = result.get("confidence", CONFIDENCE)
    out: dict[str, int | None] = {}
    for name, ch in result.get("checks", {}).items():
        if ch["holds"] or not math.isfinite(ch["value"]):
            continue
        if name in ("sensitivity", "specificity"):
            out[name] = stats.patients_for_rate(ch["value"], ch["target"], conf)
        elif name == "flagged":
            miss = stats.patients_for_rate(1 - ch["value"], 1 - ch["target"], conf)
            out[name] = miss
        elif name == "roc_auc":
            auc = result["roc_auc"]
            if ch["value"] <= ch["target"] or not math.isfinite(auc.get("se", float("nan"))) or auc["se"] <= 0:
                out[name] = None
            else:
                z = stats.z_of(conf)
                # on the logit scale, as the bound: se_logit = se / (A (1 - A)); the margin logit(A) - logit(target)
                a, t = ch["value"], ch["target"]
                margin = math.log(a / (1 - a)) - math.log(t / (1 - t))
                out[name] = math.ceil(auc["n"] * (z * auc["se"] / (a * (1 - a)) / margin) ** 2)
    return out


def _referred_patients(films: Sequence[Screened], threshold: float) -> dict[str, bool]:
    """Per patient with a Pneumonia film: whether the model referred one of them (refused films are referrals)."""
    out: dict[str, bool] = {}
    for f in films:
        if f.label != 1:
            continue
        hit = f.status is not contract.Status.OK or bool(contract.is_positive(float(f.probability or 0.0), threshold))
        pid = str(f.patient or f.path)
        out[pid] = out.get(pid, False) or hit
    return out


def compare_with_service(site: dict, site_films: Sequence[Screened], service: dict,
                         service_films: Sequence[Screened], *, service_model: str,
                         confidence: float = CONFIDENCE) -> dict:
    """Is the site model better than the model in service on the same patients? ``site`` and ``service``: their
    :func:`audit` results on ``site_films`` and ``service_films`` (the same films, each model's answers).

    * **AUC**: the paired DeLong difference (site - in service) on the patients both models answered (a patient
      as one case, its largest score); it holds when its one-sided lower bound is above 0.
    * **Sensitivity at the operating point**: not lower at its bound: the site model's sensitivity bound (the
      audit's: the more cautious of the exact and the patient bootstrap's) is at least the in-service model's on
      the same patients. The paired difference (discordant positive patients) and its bound are shown beside.

    ``holds``: both hold. ``needs_if_no``: the patients the AUC difference would need if it and its spread held.
    """
    if sorted(f.path for f in site_films) != sorted(f.path for f in service_films):
        raise ValueError("the site model and the model in service must be compared on the same films")
    y_a, p_a, n_a = stats.per_patient([f.label for f in site_films], [np.nan if f.probability is None else
                                                                      f.probability for f in site_films],
                                      [str(f.patient or f.path) for f in site_films])
    y_b, p_b, n_b = stats.per_patient([f.label for f in service_films], [np.nan if f.probability is None else
                                                                         f.probability for f in service_films],
                                      [str(f.patient or f.path) for f in service_films])
    both = sorted(set(n_a) & set(n_b))
    ia, ib = [n_a.index(x) for x in both], [n_b.index(x) for x in both]
    y = y_a[ia]
    nan = float("nan")
    auc: dict[str, Any] = {"a": nan, "b": nan, "difference": nan, "se": nan, "lower": nan, "n": len(both),
                           "rule": "one-sided bound > 0 (paired DeLong, by patient)", "holds": False}
    needs: dict[str, int | None] = {}
    if len(set(y.tolist())) == 2:
        d = stats.paired_auc_difference(y, p_a[ia], p_b[ib], confidence)
        auc.update(a=d.a, b=d.b, difference=d.difference, se=d.se, lower=d.lower, holds=bool(d.lower > 0))
        if not auc["holds"]:
            needs["auc_difference"] = d.cases_needed(len(both))
    ra = _referred_patients(site_films, site["threshold"])
    rb = _referred_patients(service_films, service["threshold"])
    pos = sorted(ra)
    sens: dict[str, Any] = {"a": nan, "b": nan, "difference": nan, "se": nan, "lower": nan, "n": len(pos),
                            "rule": "site bound >= in-service bound", "holds": False,
                            "site_bound": site["checks"]["sensitivity"]["bound"],
                            "service_bound": service["checks"]["sensitivity"]["bound"]}
    if pos:
        d = stats.paired_rate_difference([ra[k] for k in pos], [rb[k] for k in pos], confidence)
        sens.update(a=d.a, b=d.b, difference=d.difference, se=d.se, lower=d.lower,
                    holds=bool(math.isfinite(sens["site_bound"]) and math.isfinite(sens["service_bound"])
                               and sens["site_bound"] >= sens["service_bound"]))
    return {"service_model": service_model, "auc_difference": auc, "sensitivity_difference": sens,
            "holds": bool(auc["holds"] and sens["holds"]), "needs_if_no": needs,
            "service": {k: service[k] for k in ("threshold", "checks", "sensitivity", "specificity", "roc_auc",
                                                "flagged", "go")}}


def decide(site: dict, comparison: dict | None) -> dict:
    """The site model's decision: its own audit's go (every target at its bound, at a confidence that may go)
    and, when a model is in service, the comparison's (:func:`compare_with_service`). Returns ``site`` with
    ``comparison`` and ``go`` set."""
    out = {**site, "meets_targets": site["go"]}
    if comparison is not None:
        out["comparison"] = comparison
        out["go"] = bool(site["go"] and comparison["holds"])
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _verdict_line(result: dict) -> str:
    conf = result.get("confidence", CONFIDENCE)
    why = []
    if not result.get("confidence_allows_go", True):
        why.append(f"confidence {conf:.0%} is below the {PUBLISH_CONFIDENCE:.0%} a go needs")
    cmp_ = result.get("comparison")
    against = " and against the model in service (paired, by patient)" if cmp_ else ""
    return (f"decision: {'GO' if result['go'] else 'NO-GO'} (every one-sided {conf:.0%} bound against "
            f"the targets of {result.get('targets_from', 'the card')}{against})" + (f"; {'; '.join(why)}" if why else ""))


def _needs_text(needs: dict) -> str:
    what = {"sensitivity": "Pneumonia patients", "specificity": "Normal patients", "flagged": "patients in all",
            "roc_auc": "patients (both classes, as observed)", "auc_difference": "patients (both classes)",
            "sensitivity_difference": "Pneumonia patients"}
    return "; ".join(f"{k}: " + (f">= {v} {what.get(k, 'patients')}" if v is not None else
                                 "no number (the observed figure itself misses)") for k, v in needs.items())


def summary(result: dict) -> str:
    """The decision and every check, one line each (for the terminal)."""
    conf = result.get("confidence", CONFIDENCE)
    lines = [_verdict_line(result)]
    for name, ch in result["checks"].items():
        verdict = "holds" if ch["holds"] else ("MISSED" if math.isfinite(ch["value"]) else "NOT MEASURABLE (one class)")
        lines.append(f"  {name:<12} {_fmt(ch['value'])}  target {ch['op']} {_fmt(ch['target'], 2)}  {conf:.0%} bound "
                     f"{_fmt(ch['bound'])}  {verdict}"
                     + (" (the point estimate meets it; the bound does not)" if ch["point_meets_target"] and not ch["holds"]
                        else ""))
    cmp_ = result.get("comparison")
    if cmp_:
        for name in ("auc_difference", "sensitivity_difference"):
            d = cmp_[name]
            lines.append(f"  {name:<12} {_fmt(d['difference'])} (site {_fmt(d['a'])}, in service {_fmt(d['b'])})  "
                         f"{conf:.0%} bound {_fmt(d['lower'])}  {'holds' if d['holds'] else 'MISSED'} "
                         f"({d['rule']})")
    needs = {**result.get("needs_if_no", {}), **(cmp_ or {}).get("needs_if_no", {})}
    if not result["go"] and needs:
        lines.append("  patients needed if the figures held: " + _needs_text(needs))
    reach = _reach_text(result)
    if reach:
        lines.append("  " + reach)
    return "\n".join(lines)


def _reach_text(result: dict) -> str:
    """When the sensitivity or specificity target was missed: the ROC AUC the two targets need together
    (:func:`auc_targets_need`) beside the model's; empty otherwise."""
    need = result.get("auc_targets_need") or {}
    checks = result.get("checks", {})
    if need.get("in_truth") is None or all(checks.get(k, {}).get("holds", True) for k in ("sensitivity", "specificity")):
        return ""
    at = need.get("at_bounds")
    return (f"sensitivity {_fmt(result['targets']['sensitivity'], 2)} and specificity "
            f"{_fmt(result['targets']['specificity'], 2)} together need a ROC AUC of about {_fmt(need['in_truth'])} "
            + (f"in truth and {_fmt(at)} for this sample's bounds to show them " if at is not None else
               f"in truth, and {need['bounds_need']} for this sample's bounds to show them " if need.get("bounds_need")
               else "in truth ")
            + f"(binormal, equal variances); this model reads {_fmt(result['roc_auc']['value'])}")


def markdown(result: dict, *, title: str, model: str, sample: str) -> str:
    """The audit as Markdown (the only place its numbers become text): the decision, the targets that applied
    (the card's or the site's), every check, the model in service side by side when there is one, the patients
    needed when the answer is no, and the earlier attempts on the same sample."""
    c = result["checks"]
    lines = [
        f"# {title}", "",
        f"- model: `{model}`; threshold {_fmt(result['threshold'], 4)}"
        + (f" (operating point `{result['operating_point']}`)" if result.get("operating_point") else ""),
        f"- sample: `{sample}` ({result['n']} films)"
        + (f"; sample sha256 `{result['sample_sha256'][:16]}`" if result.get("sample_sha256") else ""),
        f"- {_verdict_line(result)}",
        f"- targets of {result.get('targets_from', 'the card')}: " + ", ".join(
            f"{k} {'<=' if k == 'flagged' else '>='} {v}" for k, v in result["targets"].items()),
        f"- patients: {result.get('patients', 'n/a')}" + ("" if result.get("patients_known", True) else
                                                           " (guessed from file names: intervals may be too narrow)"),
        "", "| check | value | target | bound | holds (bound) | point meets target |", "|---|---|---|---|---|---|",
    ]
    for name, ch in c.items():
        holds = "yes" if ch["holds"] else ("NO" if math.isfinite(ch["value"]) else "not measurable (one class)")
        lines.append(f"| {name} | {_fmt(ch['value'])} | {ch['op']} {_fmt(ch['target'], 2)} | {_fmt(ch['bound'])} | "
                     f"{holds} | {'yes' if ch['point_meets_target'] else 'no'} |")
    cmp_ = result.get("comparison")
    if cmp_:
        svc = cmp_["service"]
        lines += ["", f"## Against the model in service (`{cmp_['service_model']}`), on the same patients", "",
                  "| check | site model | bound | model in service | bound |", "|---|---|---|---|---|"]
        for name, ch in c.items():
            o = svc["checks"][name]
            lines.append(f"| {name} | {_fmt(ch['value'])} | {_fmt(ch['bound'])} | {_fmt(o['value'])} | "
                         f"{_fmt(o['bound'])} |")
        lines += ["", "| paired difference (site - in service) | value | one-sided bound | rule | holds |",
                  "|---|---|---|---|---|"]
        for name in ("auc_difference", "sensitivity_difference"):
            d = cmp_[name]
            lines.append(f"| {name} | {_fmt(d['difference'])} | {_fmt(d['lower'])} | {d['rule']} | "
                         f"{'yes' if d['holds'] else 'NO'} |")
    needs = {**result.get("needs_if_no", {}), **(cmp_ or {}).get("needs_if_no", {})}
    if not result["go"] and needs:
        lines += ["", "Patients needed if the observed figures held: " + _needs_text(needs) + "."]
    reach = _reach_text(result)
    if reach:
        lines += ["", reach[0].upper() + reach[1:] + "."]
    lines += ["", "| class | films | flagged | flagged rate |", "|---|---|---|---|"]
    for name, cnt in result["counts"].items():
        lines.append(f"| {name} | {cnt['films']} | {cnt['flagged']} | {_fmt(cnt['flagged_rate'])} |")
    s, sp, auc = result["sensitivity"], result["specificity"], result["roc_auc"]
    lines += [
        "",
        f"Sensitivity {s['k']}/{s['n']}, specificity {sp['k']}/{sp['n']} films (Clopper-Pearson 95% intervals "
        f"{_fmt(s['ci95'][0])}-{_fmt(s['ci95'][1])} and {_fmt(sp['ci95'][0])}-{_fmt(sp['ci95'][1])}); films the model "
        "refused count as referrals (positive); the bounds are the more cautious of the exact one and the patient "
        f"bootstrap's. ROC AUC by patient ({auc['n']} patients, a patient's largest score): {_fmt(auc['value'])}, "
        f"DeLong standard error {_fmt(auc['se'])}, one-sided bound {_fmt(auc['bound'])} (logit scale).",
    ]
    if result["calibration"]:
        lines.append(f"Calibration: ECE {_fmt(result['calibration']['ece'])} (reliability in calibration.png).")
    attempts = result.get("attempts") or []
    lines += ["", f"## Earlier attempts on this sample ({len(attempts)})", ""]
    lines += [f"- {a.get('time', '?')} `{a.get('command', '?')}`: {a.get('outcome', '?')}; options "
              + ", ".join(f"{k}={v}" for k, v in sorted((a.get('options') or {}).items())) for a in attempts] or ["none"]
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
    truth = auc_targets_need(targets, confidence=confidence)["in_truth"]
    return (f"targets {targets.sensitivity:.2f} sensitivity, {targets.specificity:.2f} specificity, "
            f"{targets.roc_auc:.2f} AUC, <= {targets.flagged:.1%} flagged at {confidence:.0%} confidence: label the "
            f"films of {needs.text()}; more where the model errs (a patient's further films count for little: the "
            f"bounds resample patients)"
            + (f"; the sensitivity and specificity targets together need a model that ranks the site's films at a "
               f"ROC AUC of about {truth:.2f} or more (binormal, equal variances), more for a sample's bounds to show "
               "them" if truth is not None else "")
            + (f"; a go needs {PUBLISH_CONFIDENCE:.0%} confidence, so this plans an exploration only"
               if confidence < PUBLISH_CONFIDENCE else ""))


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
    sha = sample_sha256(sample)
    earlier = earlier_attempts(opts.out, sha)
    if earlier:
        say(f"earlier attempts on this sample ({len(earlier)}): "
            + "; ".join(f"{a['time']} {a['command']} {a['outcome']}" for a in earlier))
    attempt: dict[str, Any] = {"command": "cxr site-audit", "sample": relative(opts.sample), "sample_sha": sha,
               "options": {"targets": list(opts.targets), "confidence": opts.confidence,
                           "operating_point": opts.operating_point}}
    try:
        n_pos, n_neg, n_all = patients_by_class(sample.films)
        check_sample(n_pos, n_neg, targets, opts.confidence, n_all=n_all)
    except InsufficientSample as exc:
        record_attempt(opts.out, **attempt, outcome="insufficient", detail={"why": str(exc)})
        raise
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
    result["targets_from"] = targets_source(opts.targets)
    result["set_aside"] = {"films": len(sample.set_aside), "by_role": aside}
    result["needs"] = {"positives": needs.positives, "negatives": needs.negatives, "films": needs.films,
                       "counted_in": "patients"}
    result["sample_sha256"] = sha
    result["attempts"] = earlier
    result["attempt"] = record_attempt(opts.out, **attempt, outcome="go" if result["go"] else "no-go",
                                       model_sha256=card.sha256)
    write(result, films, opts.out, model=f"{info.name} v{info.version} ({(info.sha256 or '')[:12]})",
          sample=relative(opts.sample))
    return result

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

Header-rule refusals (the DICOM eligibility rules: a lateral view, another modality or body part; see
:mod:`cxr.core.eligibility`) are the workload, not the model: they are counted apart, by rule, and never enter
the flagged rate or any other check. A PA + lateral workload refuses its laterals by header and is not drift.

The positive rate and the probability distribution depend on the site's case mix, so they are judged only
against an explicit baseline (a previous period's CSV or JSON) or against the model's reference reweighted to
the site's stated prevalence (:func:`at_prevalence`); against the bare reference (a mix of children's and
adults' validation films, 71% answered positive) they are shown but not judged.

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
from cxr.core.errors import CxrError, DataError
from cxr.core.model_dir import ModelDir, model_dirs

#: Smallest batch judged.
MIN_BATCH = 30
#: Smallest change that counts: absolute difference of rates, or the KS statistic.
MIN_EFFECT = {"flagged_rate": 0.03, "positive_rate": 0.15, "probability": 0.2, "ood_score": 0.2}
#: Checks that depend on the site's case mix (judged only against a baseline or at a stated prevalence).
CASE_MIX = frozenset({"positive_rate", "probability"})


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
    judged: bool = True


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
        out.append({"status": status, "probability": prob, "ood_score": ood, "rule": r.get("rule") or None,
                    "model_sha256": r.get("model_sha256") or None})
    return out


def header_rules(eligibility: object | None = None) -> frozenset[str]:
    """The rules that refuse a film by its DICOM header: every ``dicom_*`` rule of the contract, and every rule
    the model folder's eligibility conditions name (``eligibility``: a :class:`cxr.core.eligibility.Eligibility`)."""
    names = {r for r in contract.RULES if r.startswith("dicom_")}
    names |= {c.rule for c in getattr(eligibility, "conditions", ())}
    return frozenset(names)


def split_header_refusals(rows: list[dict], rules: frozenset[str]) -> tuple[list[dict], dict[str, int]]:
    """(rows the model judged or refused on the pixels, {header rule: films it refused})."""
    kept: list[dict] = []
    refused: dict[str, int] = {}
    for r in rows:
        if r["status"] is contract.Status.NOT_ASSESSABLE and r.get("rule") in rules:
            refused[r["rule"]] = refused.get(r["rule"], 0) + 1
        else:
            kept.append(r)
    return kept, dict(sorted(refused.items()))


def model_sha256(rows: list[dict], *, what: str) -> str | None:
    """The one model sha256 a predictions CSV names (``None`` when it names none).

    Raises:
        DataError: The rows name more than one model.
    """
    shas = {r["model_sha256"] for r in rows if r.get("model_sha256")}
    if len(shas) > 1:
        raise DataError(f"{what}: answers of {len(shas)} models ({', '.join(sorted(s[:12] for s in shas))}); "
                        "monitor one model's answers at a time")
    return next(iter(shas), None)


def at_prevalence(reference: dict, threshold: float, prevalence: float) -> dict:
    """The reference with its positive and negative parts (answered at ``threshold``) reweighted to
    ``prevalence``: the larger part is thinned to evenly spaced order statistics, so the distribution within each
    part is kept and the two-sample tests stay exact. ``ood_score`` is left as it is (it is not paired with the
    probabilities in ``reference.json``).

    ``reference.json`` carries answers, not labels: its films answered positive stand for its positives. That is
    exact for the positive rate's meaning (the share answered Pneumonia) when the site's sensitivity and
    specificity are like the reference's; a site that knows its own first weeks should use them (``--baseline``).
    """
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence must be in (0, 1), got {prevalence}")
    p = np.sort(np.asarray(reference["probability"], float))
    pos, neg = p[contract.is_positive(p, threshold)], p[~contract.is_positive(p, threshold)]
    if not len(pos) or not len(neg):
        raise DataError("the reference has answers on one side of the threshold only; give --baseline instead")
    # keep every film of the scarcer part, relative to the target mix
    n_pos, n_neg = len(pos), len(neg)
    if n_pos / (n_pos + n_neg) > prevalence:
        n_pos = max(1, round(n_neg * prevalence / (1 - prevalence)))
    else:
        n_neg = max(1, round(n_pos * (1 - prevalence) / prevalence))

    def thin(a: np.ndarray, n: int) -> np.ndarray:
        return a if n >= len(a) else a[np.round(np.linspace(0, len(a) - 1, n)).astype(int)]

    prob = np.concatenate([thin(neg, n_neg), thin(pos, n_pos)])
    return {**reference, "probability": prob.tolist(), "prevalence": prevalence,
            "what": f"{reference.get('what', 'reference')}, reweighted to {prevalence:.3f} answered positive"}


def reference_from_rows(rows: list[dict], *, what: str) -> dict:
    """A reference made of a site's own baseline batch (e.g. its first week after go-live), in the form of the
    model folder's ``reference.json``."""
    answered = [r for r in rows if r["status"] is not contract.Status.ERROR]
    if not answered:
        raise DataError(f"{what}: no answered rows to use as a baseline")
    answered = [r for r in answered if not (r["status"] is contract.Status.NOT_ASSESSABLE
                                            and r.get("rule") in header_rules())]
    if not answered:
        raise DataError(f"{what}: every answered row was refused by a header rule; nothing to use as a baseline")
    return {"what": what, "n": len(answered),
            "flagged_rate": sum(r["status"] is contract.Status.NOT_ASSESSABLE for r in answered) / len(answered),
            "probability": [r["probability"] for r in answered if r["probability"] is not None],
            "ood_score": [r["ood_score"] for r in answered if r["ood_score"] is not None]}


def read_baseline(path: Path) -> dict:
    """A previous period as a reference: a predictions CSV, the JSON list of ``cxr predict --format json``, or a
    JSON object in the form of ``reference.json`` (``n``, ``flagged_rate``, ``probability``, ``ood_score``).

    Raises:
        DataError: None of these.
    """
    import json

    path = Path(path)
    if path.suffix.lower() != ".json":
        return reference_from_rows(read_predictions(path), what=str(path))
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read as JSON ({type(exc).__name__})") from None
    try:
        if isinstance(doc, list):
            rows = [{"status": contract.Status(d["status"]), "probability": None if d.get("probability") is None
                     else float(d["probability"]), "ood_score": None if d.get("ood_score") is None else float(d["ood_score"]),
                     "rule": (d.get("refusal") or {}).get("rule"), "model_sha256": d.get("model_sha256")} for d in doc]
            if not rows:
                raise DataError(f"{path}: no answers")
            return reference_from_rows(rows, what=str(path))
        if isinstance(doc, dict) and {"n", "flagged_rate", "probability", "ood_score"} <= set(doc):
            return {"what": str(doc.get("what", path)), "n": int(doc["n"]), "flagged_rate": float(doc["flagged_rate"]),
                    "probability": [float(v) for v in doc["probability"]], "ood_score": [float(v) for v in doc["ood_score"]]}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path}: answers or a reference with malformed fields") from None
    raise DataError(f"{path}: neither answers (cxr predict --format json) nor a reference (n, flagged_rate, probability, "
                    "ood_score)")


def _fisher(k: int, n: int, k0: int, n0: int) -> float:
    from scipy.stats import fisher_exact

    return float(fisher_exact([[k, n - k], [k0, n0 - k0]])[1])


def compare(rows: list[dict], reference: dict, threshold: float, *, alpha: float = 0.001,
            judge_case_mix: bool = True, rules: frozenset[str] | None = None) -> list[Check]:
    """Every check of the batch ``rows`` against ``reference`` (see the module docstring).

    ``judge_case_mix``: False when ``reference`` is not the site's own case mix (neither a baseline nor reweighted
    to its prevalence): the positive rate and the probability distribution are then shown, never judged.
    ``rules``: the header rules whose refusals are left out (:func:`header_rules` by default).
    """
    from scipy.stats import ks_2samp

    rows, _ = split_header_refusals(rows, header_rules() if rules is None else rules)
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
        judged = judge_case_mix or name not in CASE_MIX
        moved = bool(judged and math.isfinite(p) and p < alpha and stat >= MIN_EFFECT[name])
        checks.append(Check(name, ref, got, stat, p, moved, nr, nb, judged))

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


def report(checks: list[Check], *, batch: str, model: str, n_rows: int, header_refused: dict[str, int] | None = None,
           threshold: float | None = None, against: str = "") -> dict:
    """The monitor's result as numbers: every check, what moved, and whether the batch was large enough.

    ``n_rows``: the films judged (header-rule refusals excluded); ``header_refused``: those, by rule.
    """
    return {"batch": batch, "model": model, "n": n_rows, "too_small": n_rows < MIN_BATCH,
            "moved": [c.name for c in checks if c.moved] if n_rows >= MIN_BATCH else [],
            "checks": [asdict(c) for c in checks], "min_effect": MIN_EFFECT, "min_batch": MIN_BATCH,
            "header_refused": dict(header_refused or {}), "threshold": threshold, "against": against}


def markdown(result: dict) -> str:
    """The monitor's report for people (the only place its numbers become text)."""
    verdict = ("too small to judge" if result["too_small"] else
               ("MOVED: " + ", ".join(result["moved"])) if result["moved"] else "nothing moved")
    lines = [f"# Drift check: {result['batch']}", "", f"- model: `{result['model']}`; {result['n']} films; {verdict}"]
    if result.get("threshold") is not None:
        lines.append(f"- threshold {result['threshold']:.4f}; against {result.get('against') or 'the reference'}")
    hdr = result.get("header_refused") or {}
    lines.append("- refused by a header rule (the workload, never drift): "
                 + (", ".join(f"{k} {v}" for k, v in hdr.items()) if hdr else "none"))
    lines += ["",
             "| check | reference | batch | statistic | p-value | moved |", "|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['name']} | {c['reference']:.3f} | {c['batch']:.3f} | {c['statistic']:.3f} | "
                     f"{c['p_value']:.2g} | {'YES' if c['moved'] and not result['too_small'] else ('no' if c.get('judged', True) else 'not judged')} |")
    lines += ["", "Rates: Fisher's exact test; distributions: two-sample Kolmogorov-Smirnov (medians shown). A check "
              "moves when p < alpha and the change is at least " + ", ".join(f"{k} {v}" for k, v in result["min_effect"].items())
              + ". Positive rate and probability are judged only against a baseline or at a stated prevalence (--baseline, "
              "--prevalence).", ""]
    return "\n".join(lines)


def answering_model(repository: Path, sha256: str | None, fallback: str) -> ModelDir:
    """The model folder of ``repository`` whose card has ``sha256`` (the model that answered), else ``fallback``
    when the predictions name none (older CSVs)."""
    if not sha256:
        return ModelDir(Path(repository) / fallback)
    for d in model_dirs(Path(repository)):
        try:
            if d.card().sha256 == sha256:
                return d
        except CxrError:
            continue
    raise CxrError(f"no model folder in {repository} has sha256 {sha256[:12]}, the model the CSV names; "
                   "give --model-repository of the model that answered")


@dataclass(frozen=True)
class MonitorOptions:
    """One ``cxr monitor`` run.

    Attributes:
        predictions: The batch's predictions CSV (``cxr predict --format csv``, ``cxr listen --out``).
        repository: Where the model that answered is found (by the sha256 the CSV names).
        model: The model folder whose reference applies when the CSV names no sha256.
        baseline: A previous period to compare with (predictions CSV, predict's JSON, or a reference JSON).
        prevalence: The site's share of Pneumonia: the reference is reweighted to it (not with ``baseline``).
        alpha: Significance level of each check.
        out: Also write the report here (``.md`` and ``.json``).
    """

    predictions: Path
    repository: Path
    model: str
    baseline: Path | None = None
    prevalence: float | None = None
    alpha: float = 0.001
    out: Path | None = None

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise CxrError(f"--alpha must be in (0, 1), got {self.alpha}")
        if self.prevalence is not None and not 0 < self.prevalence < 1:
            raise CxrError(f"--prevalence must be in (0, 1), got {self.prevalence}")
        if self.prevalence is not None and self.baseline is not None:
            raise CxrError("give --baseline or --prevalence, not both (a baseline already has the site's case mix)")


def monitor(opts: MonitorOptions) -> tuple[dict, str]:
    """Judge a batch of answers against a baseline or the answering model's reference; returns the result
    (``moved``: something moved) and its Markdown, written to ``opts.out`` when given. Reads the model folder,
    never writes it."""
    import json

    from cxr.core.durable import write_durably
    from cxr.core.eligibility import Eligibility

    rows = read_predictions(opts.predictions)
    folder = answering_model(opts.repository, model_sha256(rows, what=str(opts.predictions)), opts.model)
    threshold = folder.card().threshold
    elig = folder.path / "eligibility.json"
    rules = header_rules(Eligibility.load(elig) if elig.exists() else None)
    reference: dict | None
    if opts.baseline is not None:
        reference = read_baseline(opts.baseline)
        against = f"the baseline {opts.baseline}"
    else:
        reference = folder.reference()
        if reference is None:
            raise CxrError(f"{folder.path}: no reference.json (refit its OOD head with `cxr ood-fit` to write one)")
        against = f"{folder.name}'s reference"
        if opts.prevalence is not None:
            reference = at_prevalence(reference, threshold, opts.prevalence)
            against += f" reweighted to prevalence {opts.prevalence:.3f}"
        else:
            against += " (positive rate and probability not judged: give --baseline or --prevalence)"
    judged, header_refused = split_header_refusals(rows, rules)
    checks = compare(judged, reference, threshold, alpha=opts.alpha, rules=rules,
                     judge_case_mix=opts.baseline is not None or opts.prevalence is not None)
    result = report(checks, batch=str(opts.predictions), model=folder.name, n_rows=len(judged),
                    header_refused=header_refused, threshold=threshold, against=against)
    text = markdown(result)
    if opts.out is not None:
        write_durably(opts.out.with_suffix(".md"), text.encode())
        write_durably(opts.out.with_suffix(".json"), (json.dumps(result, indent=1) + "\n").encode())
    return result, text

"""``cxr monitor``: does a site's stream of answers still look like the site's own earlier answers?

It compares a predictions CSV (``cxr predict --format csv`` or ``cxr listen
--out``) with a reference and names what moved. Two rules:

* **Each batch** (:func:`compare`): ``flagged_rate`` (Fisher's exact test), ``positive_rate`` (Fisher's, or a
  binomial test against the claims' expectation at a stated prevalence), and the distributions of
  ``probability`` and ``ood_score`` (two-sample Kolmogorov-Smirnov). A check *moves* when its p-value is below
  ``alpha`` (0.001) **and** the change is material (:data:`MIN_EFFECT`; :data:`MIN_RELATIVE` against the claims);
  a batch under :data:`MIN_BATCH` films is too small to judge.
* **Across batches** (:func:`observe`, :class:`SequentialRule`): a two-sided CUSUM of log-likelihood ratios on
  every quantity, film by film, kept in a state file between batches (``--state``): the positive rate and the
  share of high P(pneumonia) as **relative** changes, the flagged rate, the distributions of P(pneumonia),
  ``ood_score`` and, with ``--images``, the films' own statistics (:data:`IMAGE_STATS`: intensity histogram,
  contrast, sharpness), so a new scanner's window moves something even where the model's answers hide it. An
  alarm (:class:`Alarm`) names what moved, by how much and since which film of which batch. :func:`follow`
  watches a growing CSV; :func:`prometheus` writes the state as Prometheus text.

The reference must be the site's population:

* ``--baseline``: a period of the site's own films (every quantity is judged against it);
* ``--prevalence``: the site's share of **Pneumonia**: the expected positive rate is
  ``prevalence x sensitivity + (1 - prevalence) x (1 - specificity)`` from the model's claims at the operating
  point each row was answered at, with that row's threshold (:func:`expected_positive_rates`); with
  ``--claims-source SOURCE``, when the model's ``reference.json`` holds that source's select films of both classes,
  the flagged rate and the distributions of P(pneumonia) and ``ood_score`` are judged too, against that
  hospital's films mixed at the prevalence (:func:`source_reference`: a reference per source and class); else
  nothing else is judged;
* neither: every check is shown, none judged. The model's ``reference.json`` is its pooled validation films
  (mostly children): the flagged rate and ``ood_score`` are never judged against it (issue 33: adult films of a
  training source alarmed there in almost every batch).

Header-rule refusals (the DICOM eligibility rules: a lateral view, another modality or body part; see
:mod:`cxr.core.eligibility`) are the workload, not the model: they are counted apart, by rule, and never enter
any check. A PA + lateral workload refuses its laterals by header and is not drift.
"""

from __future__ import annotations

import csv
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError, DataError
from cxr.core.model_dir import ModelDir, model_dirs

logger = logging.getLogger(__name__)

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
    return [parse_row(r, f"{path}:{i}") for i, r in enumerate(rows, 2)]


def parse_row(r: dict, where: str) -> dict:
    """One CSV row as numbers: ``status``, ``probability``, ``ood_score``, ``rule``, ``model_sha256``, and, where
    the CSV has them (``cxr predict`` since operating points), ``threshold``, ``operating_point`` and ``path``.

    Raises:
        DataError: A status, probability, ood_score or threshold that is not valid (one line, ``where``).
    """
    try:
        status = contract.Status(r["status"])
        prob = float(r["probability"]) if r.get("probability") else None
        ood = float(r["ood_score"]) if r.get("ood_score") else None
        thr = float(r["threshold"]) if r.get("threshold") else None
    except (ValueError, KeyError):
        raise DataError(f"{where}: status {r.get('status')!r}, probability, ood_score or threshold is not valid") from None
    out = {"status": status, "probability": prob, "ood_score": ood, "rule": r.get("rule") or None,
           "model_sha256": r.get("model_sha256") or None}
    for k, v in (("threshold", thr), ("operating_point", r.get("operating_point") or None),
                 ("path", r.get("path") or None)):
        if v is not None:
            out[k] = v
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
    verdict = (("MOVED: " + ", ".join(result["moved"])) if result["moved"] else
               "too small to judge" if result["too_small"] else "nothing moved")
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
              "--prevalence); the flagged rate and ood_score only against a baseline of the site's own films.", ""]
    seq = result.get("sequential")
    if seq:
        rule = seq["rule"]
        lines += ["## Across batches (CUSUM)", "",
                  f"{seq['films']} films judged in all against {seq['against']}; an alarm when a log-likelihood "
                  f"sum passes {rule['limit']:g} (rates: a relative change of {rule['relative']:g}x, the flagged "
                  f"rate {rule['flagged_relative']:g}x; distributions: a tilt of {rule['tilt']:g}).", ""]
        lines += [f"- ALARM: {a['text']}" for a in seq["alarms"]] or ["- no alarm"]
        lines += ["", "| series | up | down |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('up', 0):.2f} | {v.get('down', 0):.2f} |" for k, v in sorted(seq["sums"].items())]
        lines.append("")
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
        baseline: A previous period at the site to compare with (predictions CSV, predict's JSON, or a reference
            JSON): the reference of every check.
        prevalence: The site's share of **Pneumonia** among its films: the expected positive rate comes from the
            model's claims at the operating point each row was answered at, with that row's threshold (not with
            ``baseline``). The flagged rate and the distributions are judged only with ``claims_source`` whose
            films the model's reference holds (:func:`source_reference`); never against its pooled validation
            films, which are not the site's population.
        alpha: Significance level of each batch check.
        out: Also write the report here (``.md`` and ``.json``).
        state: The sequential rule's state file, kept between batches (created when missing).
        images: Read every film the CSV names for :data:`IMAGE_STATS` (the baseline's too).
        rule: The sequential rule (:class:`SequentialRule`).
        metrics: Also write the state as Prometheus text (a node-exporter textfile).
        claims_source: Which claim's sensitivity and specificity give the expected positive rate (default: the
            operating point's own population, most films), and with ``prevalence`` whose select films, mixed at
            it, are the reference of the flagged rate and the distributions.
    """

    predictions: Path
    repository: Path
    model: str
    baseline: Path | None = None
    prevalence: float | None = None
    alpha: float = 0.001
    out: Path | None = None
    state: Path | None = None
    images: bool = False
    rule: SequentialRule = field(default_factory=lambda: SequentialRule())
    metrics: Path | None = None
    claims_source: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise CxrError(f"--alpha must be in (0, 1), got {self.alpha}")
        if self.prevalence is not None and not 0 < self.prevalence < 1:
            raise CxrError(f"--prevalence must be in (0, 1), got {self.prevalence}")
        if self.prevalence is not None and self.baseline is not None:
            raise CxrError("give --baseline or --prevalence, not both (a baseline already has the site's case mix)")


def _baseline_rows(path: Path) -> list[dict] | None:
    """The baseline's rows when it is answers (CSV or predict's JSON list); ``None`` for a reference JSON."""
    import json

    path = Path(path)
    if path.suffix.lower() != ".json":
        return read_predictions(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read as JSON ({type(exc).__name__})") from None
    if not isinstance(doc, list):
        return None
    try:
        return [{"status": contract.Status(d["status"]), "probability": None if d.get("probability") is None
                 else float(d["probability"]), "ood_score": None if d.get("ood_score") is None
                 else float(d["ood_score"]), "rule": (d.get("refusal") or {}).get("rule"),
                 "model_sha256": d.get("model_sha256"), **({"path": d["source"]} if d.get("source") else {})}
                for d in doc]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path}: answers with malformed fields") from None


def expectations_for(opts: MonitorOptions, folder: ModelDir, threshold: float, rules: frozenset[str]
                     ) -> Expectations | None:
    """The sequential rule's reference: the site's baseline (every quantity), or the claims at the stated
    prevalence (the positive rate only), else ``None`` (nothing can be judged: the model's own reference is its
    pooled validation films, not this site's population)."""
    if opts.baseline is not None:
        rows = _baseline_rows(opts.baseline)
        if rows is None:  # a reference JSON: its distributions and flagged rate
            ref = read_baseline(opts.baseline)
            p = np.sort(np.asarray(ref["probability"], float))
            rates = {"flagged_rate": _floor_rate(ref["flagged_rate"] * ref["n"], int(ref["n"]))}
            if len(p):
                rates["positive_rate"] = _floor_rate(float(np.sum(contract.is_positive(p, threshold))), len(p))
            return Expectations(rates=rates, positive={}, what=f"the baseline {opts.baseline}",
                                distributions={"probability": p, "ood_score": np.sort(np.asarray(ref["ood_score"]))})
        return expectations_from_baseline(rows, what=f"the baseline {opts.baseline}", threshold=threshold,
                                          rules=rules, images=opts.images)
    if opts.prevalence is not None:
        from cxr.core.claims import Claims

        claims_file = folder.path / "claims.json"
        if not claims_file.is_file():
            raise CxrError(f"{folder.path}: no claims.json, so the positive rate at a prevalence cannot be known; "
                           "give --baseline")
        positive = expected_positive_rates(Claims.load(claims_file), opts.prevalence, source=opts.claims_source)
        own = source_reference(folder.reference(), opts.claims_source, opts.prevalence)
        if own is None:
            return Expectations(rates={}, positive=positive, distributions={},
                                what=f"{folder.name}'s claims at prevalence {opts.prevalence:.3f}")
        dists = {k: np.sort(np.asarray(own[k], float)) for k in ("probability", "ood_score") if len(own[k]) >= 20}
        return Expectations(rates={"flagged_rate": _floor_rate(own["flagged_rate"] * own["n"], own["n"])},
                            positive=positive, distributions=dists,
                            what=f"{folder.name}'s claims at prevalence {opts.prevalence:.3f} and {own['what']}")
    return None


def _positive_check(rows: list[dict], exp: Expectations, threshold: float, alpha: float) -> Check | None:
    """The batch's positive rate against the claims' expectation at each row's operating point (binomial test on
    the mean expected rate; the effect is relative, :data:`MIN_RELATIVE`)."""
    from scipy.stats import binomtest

    hits, expected = [], []
    for r in rows:
        v = _film_values(r, exp, threshold, None, SequentialRule()).get("positive_rate")
        if v is not None:
            hits.append(v[2])
            expected.append(v[3])
    if not hits:
        return None
    n, k, e = len(hits), int(sum(hits)), float(np.mean(expected))
    rel = (k / n) / e - 1
    p = float(binomtest(k, n, e).pvalue)
    return Check("positive_rate", e, k / n, abs(rel), p, bool(p < alpha and abs(rel) >= MIN_RELATIVE), n, n, True)


#: Smallest relative change of the positive rate that counts against the claims' expectation.
MIN_RELATIVE = 0.25


def monitor(opts: MonitorOptions) -> tuple[dict, str]:
    """Judge a batch of answers against a baseline or the answering model's claims at the site's prevalence;
    returns the result (``moved``: what moved in this batch or alarmed in the sequence) and its Markdown, written
    to ``opts.out`` when given. Reads the model folder, never writes it.

    Two rules: each batch's tests (:func:`compare`; the flagged rate and the ``ood_score`` distribution only
    against the site's baseline), and the sequential rule across batches (:func:`observe`, state in
    ``opts.state``), whose alarms name what moved, by how much and since when."""
    import json

    from cxr.core.durable import write_durably
    from cxr.core.eligibility import Eligibility

    rows = read_predictions(opts.predictions)
    folder = answering_model(opts.repository, model_sha256(rows, what=str(opts.predictions)), opts.model)
    card = folder.card()
    threshold = card.threshold
    elig = folder.path / "eligibility.json"
    rules = header_rules(Eligibility.load(elig) if elig.exists() else None)
    judged, header_refused = split_header_refusals(rows, rules)
    state = _load_state(opts, folder, threshold, rules)
    if opts.baseline is not None:
        against = f"the baseline {opts.baseline}"
        checks = compare(judged, read_baseline(opts.baseline), threshold, alpha=opts.alpha, rules=rules,
                         judge_case_mix=True)
    else:
        reference = folder.reference()
        if reference is None:
            raise CxrError(f"{folder.path}: no reference.json (refit its OOD head with `cxr ood-fit` to write one)")
        against = (f"{folder.name}'s reference (its pooled validation films: shown, not judged; give --baseline, "
                   "a period of this site's own films)")
        own = (source_reference(reference, opts.claims_source, opts.prevalence)
               if opts.prevalence is not None else None)
        if own is not None:  # the site's hospital, at its prevalence: every check judged
            against = f"{folder.name}'s claims and {own['what']}"
            checks = compare(judged, own, threshold, alpha=opts.alpha, rules=rules, judge_case_mix=True)
        else:
            checks = [replace(c, moved=False, judged=False) for c in
                      compare(judged, reference, threshold, alpha=opts.alpha, rules=rules, judge_case_mix=False)]
        if state is not None and opts.prevalence is not None:  # the positive rate: against the claims
            pc = _positive_check(judged, state.expectations, threshold, opts.alpha)
            checks = [c for c in checks if c.name != "positive_rate"] + ([pc] if pc else [])
            if own is None:
                against = (f"{folder.name}'s claims at prevalence {opts.prevalence:.3f} (positive rate; the rest "
                           "shown, not judged)")
    result = report(checks, batch=str(opts.predictions), model=folder.name, n_rows=len(judged),
                    header_refused=header_refused, threshold=threshold, against=against)
    if state is not None:
        before = len(state.alarms)
        state = observe(state, rows, batch=str(opts.predictions), threshold=threshold, rules=rules,
                        images=opts.images)
        result["sequential"] = {"films": state.films, "rule": asdict(state.rule), "against": state.expectations.what,
                                "new_alarms": [asdict(a) | {"text": a.text()} for a in state.alarms[before:]],
                                "alarms": [asdict(a) | {"text": a.text()} for a in state.alarms],
                                "sums": {k: {d: s.total for d, s in v.items()} for k, v in (state.sides or {}).items()}}
        result["moved"] = sorted({*result["moved"], *(f"{a.series} {a.direction}" for a in state.alarms)})
        if opts.state is not None:
            state.save(opts.state)
        if opts.metrics is not None:
            write_durably(opts.metrics, prometheus(state, model=folder.name).encode())
    text = markdown(result)
    if opts.out is not None:
        write_durably(opts.out.with_suffix(".md"), text.encode())
        write_durably(opts.out.with_suffix(".json"), (json.dumps(result, indent=1, default=float) + "\n").encode())
    return result, text


def _load_state(opts: MonitorOptions, folder: ModelDir, threshold: float, rules: frozenset[str]) -> MonitorState | None:
    """The state kept in ``opts.state`` when it is this model's, else a new one over :func:`expectations_for`
    (``None`` when nothing can be judged sequentially)."""
    sha = folder.card().sha256
    if opts.state is not None and Path(opts.state).exists():
        st = MonitorState.load(opts.state)
        if st.model_sha256 == sha:
            return st
        logger.warning("%s: the state is another model's (%s); starting a new one", opts.state, st.model_sha256[:12])
    exp = expectations_for(opts, folder, threshold, rules)
    return None if exp is None else MonitorState(model_sha256=sha, expectations=exp, rule=opts.rule)


def follow(opts: MonitorOptions, stop: threading.Event, *, poll_s: float = 5.0,
           on_update: Callable[[MonitorState], None] | None = None) -> MonitorState:
    """Follow ``opts.predictions`` as it grows (a CSV ``cxr predict`` or ``cxr listen`` appends to): every
    ``poll_s`` seconds the rows completed since the last poll go through the sequential rule, the state and the
    Prometheus textfile are rewritten, and ``on_update`` is called with the state. Returns the state when
    ``stop`` is set.

    Raises:
        CxrError: Nothing to judge against (give --baseline or --prevalence).
    """
    from cxr.core.durable import write_durably
    from cxr.core.eligibility import Eligibility

    follower = CsvFollower(opts.predictions)
    state: MonitorState | None = None
    folder: ModelDir | None = None
    threshold, rules = 0.5, header_rules()
    while True:
        rows = follower.poll()
        if rows:
            if folder is None:
                folder = answering_model(opts.repository, model_sha256(rows, what=str(opts.predictions)), opts.model)
                threshold = folder.card().threshold
                elig = folder.path / "eligibility.json"
                rules = header_rules(Eligibility.load(elig) if elig.exists() else None)
                state = _load_state(opts, folder, threshold, rules)
                if state is None:
                    raise CxrError("--follow needs --baseline or --prevalence: nothing to judge against")
            assert state is not None
            state = observe(state, rows, batch=f"{opts.predictions}@{state.films + 1}", threshold=threshold,
                            rules=rules, images=opts.images)
            if opts.state is not None:
                state.save(opts.state)
            if opts.metrics is not None:
                write_durably(opts.metrics, prometheus(state, model=folder.name).encode())
            if on_update is not None:
                on_update(state)
        if stop.wait(poll_s):
            break
    if state is None:
        raise CxrError(f"{opts.predictions}: no rows arrived")
    return state


# --- the sequential rule: a monitor a site can leave on ----------------------------------------------------------

#: Image statistics computed beside ``ood_score`` from each film as the model sees it (224x224, 0-255): the mean
#: intensity and the share of dark and bright pixels (the intensity histogram's ends), the contrast (standard
#: deviation) and the sharpness (variance of the Laplacian). A new scanner or window (gamma) moves them.
IMAGE_STATS = ("intensity_mean", "dark_share", "bright_share", "contrast", "sharpness")
#: The quantities the sequential rule follows, film by film.
SERIES = ("positive_rate", "high_probability", "probability", "flagged_rate", "ood_score", *IMAGE_STATS)
#: ``high_probability``: the share of films above this quantile of the reference's P(pneumonia) (a change of the
#: case mix moves the top of the distribution most: a doubled prevalence nearly doubles it).
HIGH_QUANTILE = 0.85


def image_stats(path: str | Path) -> dict[str, float] | None:
    """:data:`IMAGE_STATS` of one film (``None`` when it cannot be read: it is then left out of these series)."""
    from cxr.core import imaging

    try:
        a = np.asarray(imaging.preprocess(str(path)), np.float64)[..., 0] / 255.0
    except Exception:  # noqa: BLE001 - a film that cannot be read has no statistics; the model's answer says why
        return None
    lap = a[1:-1, 1:-1] * 4 - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return {"intensity_mean": float(a.mean()), "dark_share": float((a < 0.25).mean()),
            "bright_share": float((a > 0.75).mean()), "contrast": float(a.std()), "sharpness": float(lap.var())}


@dataclass(frozen=True)
class SequentialRule:
    """A two-sided CUSUM of log-likelihood ratios on every quantity, so evidence accumulates across batches: a
    small lasting change alarms, one batch that is odd by chance does not (it adds at most a few units).

    * A rate (positive, flagged) with expected share ``p`` per film: the Bernoulli log-likelihood ratio of
      ``p * relative`` (up) or ``p / relative`` (down) against ``p``: a **relative** effect.
    * A distribution (P(pneumonia), ``ood_score``, image statistics): the film's rank ``u`` in the reference
      (uniform when nothing moved) against the tilted density ``1 +- tilt (2u - 1)``: a shift of the whole
      distribution up or down.

    A sum over ``limit`` alarms; Wald's bound keeps a sum's false alarms rarer than one in ``exp(limit)`` films
    when the reference is exact (a finite baseline makes them somewhat more frequent: the tests measure it).

    Attributes:
        relative: The positive rate's relative change to detect (1.25: a quarter up or down).
        flagged_relative: The flagged rate's (2: doubled or halved; refusals are rare, so a larger ratio).
        high_relative: The share of films above the reference's :data:`HIGH_QUANTILE` of P(pneumonia).
        tilt: The distributions' tilt, in (0, 1).
        limit: The alarm limit, in log-likelihood units.
    """

    relative: float = 1.25
    flagged_relative: float = 2.0
    high_relative: float = 1.5
    tilt: float = 0.3
    limit: float = 10.0

    def __post_init__(self) -> None:
        if not (self.relative > 1 and self.flagged_relative > 1 and self.high_relative > 1 and 0 < self.tilt < 1
                and 0 < self.limit <= 100):
            raise CxrError(f"--relative must be > 1 and --limit in (0, 100], got {self.relative} and {self.limit}")


@dataclass(frozen=True)
class Side:
    """One side of a CUSUM: the sum, and the run that built it (films since it left 0, their values summed and
    what the reference expected of them)."""

    total: float = 0.0
    since: int | None = None
    films: int = 0
    value_sum: float = 0.0
    expected_sum: float = 0.0

    def step(self, llr: float, film: int, value: float, expected: float) -> Side:
        total = max(0.0, self.total + llr)
        if total == 0.0:
            return Side()
        if self.since is None:
            return Side(total, film, 1, value, expected)
        return Side(total, self.since, self.films + 1, self.value_sum + value, self.expected_sum + expected)


@dataclass(frozen=True)
class Alarm:
    """What moved, by how much, since when.

    Attributes:
        series: The quantity (:data:`SERIES`).
        direction: ``up`` or ``down``.
        since_film: The film (counted over everything the monitor has seen) where the run that alarmed began.
        since_batch: The batch that film was in.
        at_film: The film at which the sum crossed the limit.
        observed: The quantity's mean over the run's films.
        expected: The reference's mean for the same films.
        films: Films in the run.
    """

    series: str
    direction: str
    since_film: int
    since_batch: str
    at_film: int
    observed: float
    expected: float
    films: int

    @property
    def relative(self) -> float:
        return self.observed / self.expected - 1 if self.expected else float("inf")

    def text(self) -> str:
        return (f"{self.series} {self.direction}: {self.observed:.4g} against {self.expected:.4g} expected "
                f"({self.relative:+.0%}) over {self.films} films since film {self.since_film} (batch "
                f"{self.since_batch}); alarmed at film {self.at_film}")


def _ecdf(sorted_ref: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mid-rank of ``v`` in the reference (uniform on (0, 1) when ``v`` is drawn like the reference)."""
    lo = np.searchsorted(sorted_ref, v, side="left")
    hi = np.searchsorted(sorted_ref, v, side="right")
    return (lo + hi) / (2.0 * len(sorted_ref))


@dataclass(frozen=True)
class Expectations:
    """What the reference expects of each quantity, film by film.

    Attributes:
        rates: Rate quantities (``flagged_rate``; ``positive_rate`` from a baseline): the expected share.
        positive: ``positive_rate`` from the claims at a stated prevalence: operating point -> (threshold,
            expected share answered Pneumonia at that point), so each row is judged at the point it was answered.
        distributions: Distribution quantities: the reference's values, sorted.
        what: Where the expectations come from (for the report).
    """

    rates: dict
    positive: dict
    distributions: dict
    what: str

    def __post_init__(self) -> None:
        for name, r in self.rates.items():
            if not 0 < r < 1:
                raise ValueError(f"expected {name} must be in (0, 1), got {r}")
        unknown = (set(self.rates) | set(self.distributions)) - set(SERIES)
        if unknown:
            raise ValueError(f"unknown series {sorted(unknown)}")

    def as_dict(self) -> dict:
        return {"rates": dict(self.rates), "positive": {k: list(v) for k, v in self.positive.items()},
                "distributions": {k: np.asarray(v, float).tolist() for k, v in self.distributions.items()},
                "what": self.what}

    @classmethod
    def from_dict(cls, d: dict) -> Expectations:
        return cls(rates=dict(d["rates"]), positive={k: tuple(v) for k, v in d["positive"].items()},
                   distributions={k: np.sort(np.asarray(v, float)) for k, v in d["distributions"].items()},
                   what=str(d["what"]))


def _floor_rate(k: float, n: int) -> float:
    """A rate estimated from ``k`` of ``n`` reference films, kept inside (0, 1) (half a film at either end)."""
    return min(max(k, 0.5), n - 0.5) / n


#: Fewest films of each class a source's reference needs before its mixture at a prevalence is judged against.
MIN_CLASS_FILMS = 20


def _mixture_quantiles(normal: np.ndarray, pneumonia: np.ndarray, prevalence: float, n: int) -> np.ndarray:
    """``n`` values whose empirical distribution is ``(1 - prevalence) F_normal + prevalence F_pneumonia`` (the
    mixture's quantiles at ``(i + 0.5) / n``), sorted."""
    a, b = np.sort(np.asarray(normal, float)), np.sort(np.asarray(pneumonia, float))
    grid = np.union1d(a, b)
    cdf = ((1 - prevalence) * np.searchsorted(a, grid, side="right") / len(a)
           + prevalence * np.searchsorted(b, grid, side="right") / len(b))
    q = (np.arange(n) + 0.5) / n
    return grid[np.minimum(np.searchsorted(cdf, q, side="left"), len(grid) - 1)]


def source_reference(reference: dict | None, source: str | None, prevalence: float) -> dict | None:
    """One hospital's population at a stated prevalence, from the model's ``reference.json``: that source's select
    films, Normal and Pneumonia mixed at ``prevalence`` (flagged rate, and the distributions of P(pneumonia) and
    ``ood_score`` as the mixture's quantiles, as many as the source has films). ``None`` when the reference has no
    such source, or fewer than :data:`MIN_CLASS_FILMS` films of either class."""
    by_class = ((reference or {}).get("by_source") or {}).get(source or "")
    if not by_class:
        return None
    normal, pneumonia = by_class.get(contract.LABELS[0]), by_class.get(contract.LABELS[1])
    if not normal or not pneumonia or min(normal["n"], pneumonia["n"]) < MIN_CLASS_FILMS:
        return None
    n = int(normal["n"] + pneumonia["n"])
    out = {"n": n, "what": f"{source}'s select films ({normal['n']} Normal, {pneumonia['n']} Pneumonia) mixed at "
                           f"prevalence {prevalence:.3f}",
           "flagged_rate": (1 - prevalence) * normal["flagged_rate"] + prevalence * pneumonia["flagged_rate"]}
    for name in ("probability", "ood_score"):
        if len(normal[name]) and len(pneumonia[name]):
            out[name] = _mixture_quantiles(normal[name], pneumonia[name], prevalence, n).tolist()
        else:
            out[name] = []
    return out


def expectations_from_baseline(rows: list[dict], *, what: str, threshold: float, rules: frozenset[str],
                               images: bool = False) -> Expectations:
    """A site's own earlier period as the reference of every quantity (its case mix and its population): the
    flagged and positive rates (each row at its own threshold, else ``threshold``), and the distributions of
    P(pneumonia), ``ood_score`` and, with ``images``, of the films' :data:`IMAGE_STATS`.

    Raises:
        DataError: No row the model judged.
    """
    kept, _ = split_header_refusals(rows, rules)
    answered = [r for r in kept if r["status"] is not contract.Status.ERROR]
    if not answered:
        raise DataError(f"{what}: no answered rows to use as a baseline")
    flagged = sum(r["status"] is contract.Status.NOT_ASSESSABLE for r in answered)
    judged = [r for r in answered if r["probability"] is not None]
    pos = sum(bool(contract.is_positive(r["probability"], r.get("threshold", threshold))) for r in judged)
    rates = {"flagged_rate": _floor_rate(flagged, len(answered))}
    if judged:
        rates["positive_rate"] = _floor_rate(pos, len(judged))
    dists = {"probability": np.sort([r["probability"] for r in judged]),
             "ood_score": np.sort([r["ood_score"] for r in answered if r["ood_score"] is not None])}
    if images:
        stats = [image_stats(r["path"]) for r in answered if r.get("path")]
        for name in IMAGE_STATS:
            dists[name] = np.sort([s[name] for s in stats if s is not None])
    return Expectations(rates=rates, positive={}, distributions={k: v for k, v in dists.items() if len(v) >= 20},
                        what=what)


def expected_positive_rates(claims: object, prevalence: float, *, source: str | None = None) -> dict:
    """Operating point -> (threshold, expected share answered Pneumonia) at ``prevalence`` (the share of
    Pneumonia among the site's films): ``prevalence * sensitivity + (1 - prevalence) * (1 - specificity)`` from
    the model's claims at that point (``claims``: a :class:`cxr.core.claims.Claims`). The claim is ``source``'s,
    else the one of the point's own population with both rates measured on the most films.

    Raises:
        CxrError: No claim with both rates at any point, or none of ``source``.
    """
    if not 0 < prevalence < 1:
        raise CxrError(f"--prevalence must be in (0, 1), got {prevalence}")
    out: dict[str, tuple[float, float]] = {}
    by_point: dict[str, list] = {}
    for c in getattr(claims, "claims", ()):
        if c.sensitivity is None or c.specificity is None or (source is not None and c.source != source):
            continue
        by_point.setdefault(c.operating_point, []).append(c)
    for point, cs in by_point.items():
        own = [c for c in cs if c.population == point] or cs
        c = max(own, key=lambda c: c.films)
        sens, spec = c.sensitivity.point, c.specificity.point
        out[point] = (float(c.threshold), prevalence * sens + (1 - prevalence) * (1 - spec))
    if not out:
        raise CxrError("the model's claims state no sensitivity and specificity" + (f" for source {source!r}"
                                                                                     if source else "")
                       + ": the expected positive rate at a prevalence cannot be known; give --baseline")
    return out


@dataclass(frozen=True)
class MonitorState:
    """What the monitor has seen: films, batches, every CUSUM's two sides and the alarms raised (a file a site
    keeps between batches, ``--state``; written whole or not at all).

    Attributes:
        model_sha256: The model whose answers these are (another model's answers start a new state).
        expectations: The reference (:class:`Expectations`).
        rule: The sequential rule.
        films: Films seen.
        batches: Batch names seen, with the film each began at.
        sides: ``{series: {"up": Side, "down": Side}}``.
        alarms: Alarms raised, oldest first (they stay until the state is reset).
    """

    model_sha256: str
    expectations: Expectations
    rule: SequentialRule = SequentialRule()
    films: int = 0
    batches: tuple[tuple[str, int], ...] = ()
    sides: dict | None = None
    alarms: tuple[Alarm, ...] = ()

    def as_dict(self) -> dict:
        return {"model_sha256": self.model_sha256, "expectations": self.expectations.as_dict(),
                "rule": asdict(self.rule), "films": self.films, "batches": [list(b) for b in self.batches],
                "sides": {k: {d: asdict(s) for d, s in v.items()} for k, v in (self.sides or {}).items()},
                "alarms": [asdict(a) for a in self.alarms]}

    @classmethod
    def from_dict(cls, d: dict) -> MonitorState:
        return cls(model_sha256=d["model_sha256"], expectations=Expectations.from_dict(d["expectations"]),
                   rule=SequentialRule(**d["rule"]), films=int(d["films"]),
                   batches=tuple((str(b), int(f)) for b, f in d["batches"]),
                   sides={k: {dd: Side(**s) for dd, s in v.items()} for k, v in d["sides"].items()},
                   alarms=tuple(Alarm(**a) for a in d["alarms"]))

    def save(self, path: Path) -> None:
        import json

        from cxr.core.durable import write_durably

        write_durably(Path(path), (json.dumps(self.as_dict()) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> MonitorState:
        import json

        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a monitor state ({type(exc).__name__})") from None


def _bernoulli(hit: float, p0: float, ratio: float) -> tuple[float, float]:
    """(up, down) log-likelihood ratios of one Bernoulli film: ``p0 * ratio`` and ``p0 / ratio`` against ``p0``."""
    up = min(p0 * ratio, 0.5 * (1 + p0))
    down = p0 / ratio
    return ((math.log(up / p0) if hit else math.log((1 - up) / (1 - p0))),
            (math.log(down / p0) if hit else math.log((1 - down) / (1 - p0))))


def _film_values(row: dict, exp: Expectations, threshold: float, stats: dict | None,
                 rule: SequentialRule) -> dict[str, tuple[float, float, float, float]]:
    """``{series: (up LLR, down LLR, raw value, expected raw value)}`` of one film for every quantity the
    reference can judge."""
    out: dict[str, tuple[float, float, float, float]] = {}
    flagged = row["status"] is contract.Status.NOT_ASSESSABLE
    if "flagged_rate" in exp.rates:
        p0 = exp.rates["flagged_rate"]
        out["flagged_rate"] = (*_bernoulli(float(flagged), p0, rule.flagged_relative), float(flagged), p0)
    prob = row["probability"]
    if prob is not None:
        thr = row.get("threshold", threshold)
        hit = float(bool(contract.is_positive(prob, thr)))
        p0 = None
        if exp.positive:
            point = row.get("operating_point")
            if point in exp.positive and math.isclose(exp.positive[point][0], thr, rel_tol=1e-6):
                p0 = exp.positive[point][1]
            elif point is None and len(exp.positive) == 1:
                p0 = next(iter(exp.positive.values()))[1]
        elif "positive_rate" in exp.rates:
            p0 = exp.rates["positive_rate"]
        if p0 is not None and 0 < p0 < 1:
            out["positive_rate"] = (*_bernoulli(hit, p0, rule.relative), hit, p0)
    ref_p = exp.distributions.get("probability")
    if prob is not None and ref_p is not None and len(ref_p):
        cut = ref_p[int(HIGH_QUANTILE * (len(ref_p) - 1))]
        p0 = _floor_rate(len(ref_p) - float(np.searchsorted(ref_p, cut, side="right")), len(ref_p))
        high = float(prob > cut)
        out["high_probability"] = (*_bernoulli(high, p0, rule.high_relative), high, p0)
    values = {"probability": prob, "ood_score": row["ood_score"], **(stats or {})}
    for name, v in values.items():
        ref = exp.distributions.get(name)
        if v is None or ref is None or not len(ref):
            continue
        tilt = rule.tilt * (2 * float(_ecdf(ref, np.array([v]))[0]) - 1)
        out[name] = (math.log1p(tilt), math.log1p(-tilt), float(v), float(np.mean(ref)))
    return out


def observe(state: MonitorState, rows: list[dict], *, batch: str, threshold: float, rules: frozenset[str],
            images: bool = False) -> MonitorState:
    """Feed one batch, film by film in its order, to every CUSUM; an alarm is raised when a sum crosses the
    limit (once per run: the sum starts again from 0). Header-rule refusals and errors are not films the model
    judged and are skipped. Returns the new state."""
    kept, _ = split_header_refusals(rows, rules)
    kept = [r for r in kept if r["status"] is not contract.Status.ERROR]
    sides = {name: dict(v) for name, v in (state.sides or {}).items()}
    alarms = list(state.alarms)
    film = state.films
    batches = (*state.batches, (batch, film + 1))
    for row in kept:
        film += 1
        st = image_stats(row["path"]) if images and row.get("path") else None
        for name, (up, down, value, expected) in _film_values(row, state.expectations, threshold, st,
                                                               state.rule).items():
            cur = sides.setdefault(name, {"up": Side(), "down": Side()})
            for direction, llr in (("up", up), ("down", down)):
                side = cur[direction].step(llr, film, value, expected)
                if side.total > state.rule.limit:
                    alarms.append(Alarm(name, direction, int(side.since or film),
                                        _batch_at(batches, int(side.since or film)), film,
                                        side.value_sum / side.films, side.expected_sum / side.films, side.films))
                    side = Side()
                cur[direction] = side
    return replace(state, films=film, batches=batches, sides=sides, alarms=tuple(alarms))


def _batch_at(batches: tuple[tuple[str, int], ...], film: int) -> str:
    name = ""
    for b, first in batches:
        if first <= film:
            name = b
    return name


def prometheus(state: MonitorState, *, model: str) -> str:
    """The state as Prometheus text exposition (a node-exporter textfile): films seen, every CUSUM sum over its
    limit, and the alarms raised, by series and direction."""
    lab = model.replace("\\", "\\\\").replace('"', '\\"')
    lines = ["# HELP cxr_monitor_films_total Films the drift monitor has judged.",
             "# TYPE cxr_monitor_films_total counter", f'cxr_monitor_films_total{{model="{lab}"}} {state.films}',
             "# HELP cxr_monitor_cusum_ratio A CUSUM sum over its alarm limit (1 alarms).",
             "# TYPE cxr_monitor_cusum_ratio gauge"]
    for name, sides in sorted((state.sides or {}).items()):
        for direction, side in sorted(sides.items()):
            lines.append(f'cxr_monitor_cusum_ratio{{model="{lab}",series="{name}",direction="{direction}"}} '
                         f"{side.total / state.rule.limit:.6g}")
    lines += ["# HELP cxr_monitor_alarms_total Alarms raised, by what moved.", "# TYPE cxr_monitor_alarms_total counter"]
    counts: dict[tuple[str, str], int] = {}
    for a in state.alarms:
        counts[(a.series, a.direction)] = counts.get((a.series, a.direction), 0) + 1
    for (name, direction), n in sorted(counts.items()):
        lines.append(f'cxr_monitor_alarms_total{{model="{lab}",series="{name}",direction="{direction}"}} {n}')
    lines.append(f'cxr_monitor_alarm{{model="{lab}"}} {int(bool(state.alarms))}')
    return "\n".join(lines) + "\n"


class CsvFollower:
    """Reads a predictions CSV that another process appends to (``cxr predict``, ``cxr listen --out``): each
    :meth:`poll` returns the rows completed since the last one (a last line without its newline waits)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.header: list[str] | None = None

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            if self.header is None:
                first = fh.readline()
                if not first.endswith(b"\n"):
                    return []
                self.header = next(csv.reader([first.decode("utf-8")]))
                if "status" not in self.header:
                    raise DataError(f"{self.path}: not a predictions CSV (no status column)")
                self.offset = max(self.offset, len(first))
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        if end == 0:
            return []
        self.offset += end
        text = data[:end].decode("utf-8")
        rows = [dict(zip(self.header, r)) for r in csv.reader(text.splitlines()) if r]
        return [parse_row(r, f"{self.path}") for r in rows]

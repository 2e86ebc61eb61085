"""``cxr evaluate`` and ``cxr calibrate``: metrics with bootstrap intervals, plots, reports, site calibration."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import CalibrationError, DataError
from cxr.train import data as data_mod
from cxr.train import metrics, run_log
from cxr.train.scoring import CALIBRATION_FILE, Calibration, KerasScorer, Scorer, load_scorer

logger = logging.getLogger(__name__)

#: Metrics reported with intervals, in report order.
REPORT_KEYS = (
    "accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc", "ece", "brier", "accuracy_at_0.5",
)


def load_labelled(
    folder: Path, *, cache_dir: Path | None = None, split_file: Path | None = None, refused: list[dict] | None = None,
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and paths of a ``{NORMAL,PNEUMONIA}`` folder (or a Kaggle root's ``test``/``val``).

    With ``split_file`` (a training run's ``split.json``), the validation side of
    that split is loaded instead (``folder`` is the Kaggle root, needed for splits without source roots).
    ``source`` keeps only that source's films of the split's validation side.
    With ``refused`` (a list), films the contract refuses or cannot read are left out and appended to it (each
    with its label), instead of ending the run.
    """
    folder = Path(folder)
    if split_file is not None:
        samples = data_mod.Split.load(split_file).samples("val", folder)
        if source is not None:
            samples = [s for s in samples if s.source == source]
            if not samples:
                raise DataError(f"{split_file}: no validation films of source {source!r}")
    else:
        if not any((folder / c).is_dir() for c in contract.CLASS_DIRS):
            for split in ("test", "val"):
                if (folder / split).is_dir():
                    folder = folder / split
                    break
        samples = data_mod.list_samples(folder)
    paths = [s.path for s in samples]
    if refused is None:
        x, kept = data_mod.load_images(paths, cache_dir=cache_dir), list(range(len(samples)))
    else:
        x, kept, out = data_mod.load_assessable(paths, cache_dir=cache_dir)
        refused.extend({**r, "label": samples[r["index"]].label} for r in out)
    y = np.array([samples[i].label for i in kept], dtype=int)
    return x, y, [str(paths[i]) for i in kept]


def load_pooled(folders: Path | list[Path], *, cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`load_labelled` of one folder, or of several pooled (e.g. two hospitals' labelled samples)."""
    parts = [load_labelled(f, cache_dir=cache_dir) for f in ([folders] if isinstance(folders, Path) else folders)]
    return (np.concatenate([x for x, _, _ in parts]), np.concatenate([y for _, y, _ in parts]),
            [p for _, _, ps in parts for p in ps])


def described(folders: Path | list[Path]) -> str:
    """The folders as the card names them (repository-relative, joined by ``+``)."""
    from cxr.core.paths import relative

    return " + ".join(relative(f) for f in ([folders] if isinstance(folders, Path) else folders))


def evaluate_arrays(y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point metrics, 95% bootstrap intervals and the confusion matrix."""
    point = metrics.all_metrics(y, p, threshold)
    ci = metrics.bootstrap_ci(y, p, lambda a, b: metrics.all_metrics(a, b, threshold), n_boot=n_boot, seed=seed)
    return {
        "threshold": threshold,
        "n": int(len(y)),
        "n_pneumonia": int(y.sum()),
        "n_normal": int(len(y) - y.sum()),
        "metrics": {k: {"value": point[k], "ci95": list(ci[k])} for k in REPORT_KEYS},
        "confusion": metrics.confusion(y, p, threshold),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "method": "percentile, resampling images stratified by class"},
    }


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def summary_lines(report: dict, *, title: str) -> list[str]:
    """The head of a report: model, data, threshold, refusals and the metric table (for the terminal and the
    Markdown report alike)."""
    refused = report.get("refused") or []
    lines = [
        f"# {title}",
        "",
        f"- model: `{report['model']}`",
        f"- data: `{report['data']}` ({report['n']} images: {report['n_normal']} Normal, {report['n_pneumonia']} Pneumonia)",
        f"- threshold: {report['threshold']:.4f} ({report.get('threshold_source', '')})",
        f"- refused (not assessable or unreadable), counted as referrals: {len(refused)}",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
    ]
    for k, m in report["metrics"].items():
        lines.append(f"| {k} | {_fmt(m['value'])} | {_fmt(m['ci95'][0])} - {_fmt(m['ci95'][1])} |")
    return lines


def markdown_report(report: dict, *, title: str) -> str:
    """Render an evaluation report as Markdown."""
    lines = summary_lines(report, title=title)
    c = report["confusion"]
    lines += [
        "",
        "Confusion matrix (rows true, columns predicted):",
        "",
        "| | pred Normal | pred Pneumonia |",
        "|---|---|---|",
        f"| true Normal | {c['tn']} | {c['fp']} |",
        f"| true Pneumonia | {c['fn']} | {c['tp']} |",
        "",
        f"Intervals: {report['bootstrap']['n_boot']} bootstrap resamples ({report['bootstrap']['method']}).",
        "",
    ]
    refused = report.get("refused") or []
    if refused:
        lines += [f"Refused films ({len(refused)}), counted as referrals (positive at every threshold):", ""]
        lines += [f"- `{r['path']}` ({r['label']}): {r['reason']}" for r in refused]
        lines.append("")
    lines += [f"![{name}]({fname})" for name, fname in report.get("plots", {}).items()]
    return "\n".join(lines) + "\n"


def report_dir(model_path: Path, data_dir: Path, *, split_file: Path | None = None, source: str | None = None) -> Path:
    """Where an evaluation's report goes by default: ``eval_<data name>`` (``eval_trainval``, ``eval_val_<source>``
    with a split) beside a training run's ``model.keras``, where ``cxr export`` collects it for the model card; for
    an exported model, in cxr's reports folder (``REPORTS_DIR/evaluate``: never a model repository, never the
    working directory)."""
    from cxr.core.paths import REPORTS_DIR

    name = ((f"eval_val_{source}" if source else "eval_trainval") if split_file
            else f"eval_{Path(data_dir).resolve().name}")
    model_path = Path(model_path)
    return model_path.parent / name if model_path.suffix == ".keras" else REPORTS_DIR / "evaluate" / name


def evaluate(
    model_path: Path, data_dir: Path, out_dir: Path, *, threshold: float | None = None,
    n_boot: int = 1000, cache_dir: Path | None = None, scorer: Scorer | None = None, split_file: Path | None = None,
    source: str | None = None,
) -> dict:
    """Evaluate a ``.keras`` or ``.onnx`` model on a labelled folder; write JSON, Markdown and PNGs."""
    from cxr.train import plots

    scorer = scorer or load_scorer(model_path, threshold=threshold)
    refused: list[dict] = []
    x, y, _ = load_labelled(data_dir, cache_dir=cache_dir, split_file=split_file, refused=refused, source=source)
    p = scorer(x) if len(x) else np.zeros(0)
    thr = float(threshold if threshold is not None else scorer.threshold)
    # a refused film goes to a reader: it counts as a referral (positive at any threshold)
    y = np.concatenate([y, np.array([r["label"] for r in refused], int)])
    p = np.concatenate([p, np.ones(len(refused))])
    report = evaluate_arrays(y, p, thr, n_boot=n_boot)
    report["refused"] = [{k: r[k] for k in ("path", "status", "rule", "reason")} | {"label": contract.LABELS[r["label"]]}
                         for r in refused]
    report.update(
        model=str(model_path),
        data=(f"{data_dir} (validation side of {split_file}" + (f", source {source})" if source else ")")) if split_file
        else str(data_dir),
        threshold_source="--threshold" if threshold is not None else "stored calibration (or 0.5 when none)",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (f"validation, {source}" if source else "train-validation") if split_file else Path(data_dir).name
    report["plots"] = plots.evaluation_plots(y, p, thr, out_dir, title=name)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    report["title"] = f"Evaluation on {name}"
    (out_dir / "report.md").write_text(markdown_report(report, title=report["title"]))
    return report


def fit_scaling(logits: np.ndarray, y: np.ndarray, scaling: str) -> tuple[float, float]:
    """Fit ``(scale, bias)`` minimising the log-loss of ``sigmoid(scale * z + bias)``.

    ``temperature`` fits the scale only; ``platt`` fits both (it also absorbs
    the prior shift between the class-weighted training and the site's
    prevalence); ``none`` returns ``(1, 0)``.
    """
    if scaling == "none":
        return 1.0, 0.0
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)

    def loss(a: float, b: float) -> float:  # mean log-loss of sigmoid(a z + b), computed stably
        s = a * z + b
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(200):  # damped Newton's method on a convex 1- or 2-parameter problem
        s = a * z + b
        p = 1.0 / (1.0 + np.exp(-s))
        w = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.sum((p - t) * z), np.sum(p - t)])
        h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-9 * np.eye(2)
        if scaling == "temperature":
            step = np.array([g[0] / h[0, 0], 0.0])
        else:
            step = np.linalg.solve(h, g)
        # A full Newton step can overshoot far from the optimum (logits all on one side, a prevalence shift)
        # and run off to a degenerate step function: halve it until the loss goes down.
        size = 1.0
        while size > 1e-8 and loss(a - size * step[0], b - size * step[1]) > current:
            size /= 2
        a, b = a - size * step[0], b - size * step[1]
        current = loss(a, b)
        if np.abs(size * step).max() < 1e-10:
            break
    if not (math.isfinite(a) and a > 0 and math.isfinite(b)):
        raise CalibrationError(f"probability scaling did not converge (scale {a}, bias {b})")
    return float(a), float(b)


def sensitivity_lower_bound(tp: int, n_pos: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a sensitivity ``tp / n_pos`` (exact binomial)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_pos < 1 or not 0 <= tp <= n_pos:
        raise ValueError(f"need 0 <= tp <= n_pos and n_pos >= 1, got tp={tp}, n_pos={n_pos}")
    from cxr.core.stats import lower_bound

    return lower_bound(tp, n_pos, confidence)


def choose_threshold(
    y: np.ndarray, p: np.ndarray, *, rule: str, target: float = 0.95, confidence: float = 0.9,
) -> float:
    """Decision threshold by a documented rule.

    ``sensitivity``: the highest threshold whose sensitivity on the sample is
    at least ``target`` (the best specificity that keeps the target).
    ``sensitivity_lcb``: the highest threshold whose one-sided Clopper-Pearson
    lower bound of sensitivity, at ``confidence``, is at least ``target``: the
    promise then holds on unseen data of the same kind with that confidence,
    not only in-sample.
    ``youden``: the threshold maximising sensitivity + specificity - 1.

    The threshold is placed midway to the next lower score, so that small
    score noise does not flip labels.

    Raises:
        CalibrationError: Unknown rule, a target out of range, or a sample
            too small for the bound to reach the target (a ``ValueError``).
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    fpr, tpr, thr = metrics.roc_curve(y, p)
    cand = np.sort(np.unique(p))[::-1]
    n_pos = int(y.sum())
    if rule in ("sensitivity", "sensitivity_lcb"):
        if not 0 < target <= 1:
            raise CalibrationError(f"target must be in (0, 1], got {target}")
        if rule == "sensitivity_lcb" and not 0 < confidence < 1:
            raise CalibrationError(f"confidence must be in (0, 1), got {confidence}")
        if rule == "sensitivity":
            ok = np.flatnonzero(tpr[1:] >= target)
        else:
            bounds = np.array([sensitivity_lower_bound(int(round(t * n_pos)), n_pos, confidence) for t in tpr[1:]])
            ok = np.flatnonzero(bounds >= target)
            if not ok.size:
                raise CalibrationError(
                    f"{n_pos} positives cannot show sensitivity >= {target} at {confidence:.0%} confidence "
                    f"(the bound with every positive found is {sensitivity_lower_bound(n_pos, n_pos, confidence):.4f}); "
                    "use a larger sample or a lower confidence"
                )
        i = int(ok[0])
    elif rule == "youden":
        i = int(np.argmax(tpr[1:] - fpr[1:]))
    else:
        raise CalibrationError(f"unknown rule {rule!r}")
    hi = float(thr[1:][i])
    lower = cand[cand < hi]
    t = (hi + float(lower[0])) / 2 if lower.size else hi
    return float(min(max(t, 1e-6), 1 - 1e-6))


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float, *, confidence: float = 0.9) -> dict[str, float]:
    """Point estimates at ``threshold`` plus the one-sided lower bounds of sensitivity and specificity."""
    y = np.asarray(y).astype(int)
    pred = contract.is_positive(np.asarray(p, dtype=np.float64), threshold)
    tp, n_pos = int((pred & (y == 1)).sum()), int((y == 1).sum())
    tn, n_neg = int((~pred & (y == 0)).sum()), int((y == 0).sum())
    out = dict(metrics.all_metrics(y, p, threshold))
    out["confidence"] = confidence
    out["sensitivity_lower_bound"] = sensitivity_lower_bound(tp, n_pos, confidence) if n_pos else float("nan")
    out["specificity_lower_bound"] = sensitivity_lower_bound(tn, n_neg, confidence) if n_neg else float("nan")
    out["tp"], out["n_pos"], out["tn"], out["n_neg"] = tp, n_pos, tn, n_neg
    return out


def calibrate(
    model_path: Path, data_dir: Path | list[Path], *, rule: str = "sensitivity_lcb", target: float = 0.95,
    confidence: float = 0.9, scaling: str = "platt", cache_dir: Path | None = None, command: str = "",
) -> Calibration:
    """Fit scaling and threshold on a labelled site sample (or several, pooled); write ``calibration.json`` beside
    the model and record ``command`` in the run's ``commands.txt``."""
    scorer = KerasScorer(model_path, Calibration())
    x, y, _ = load_pooled(data_dir, cache_dir=cache_dir)
    z = scorer.logits(x)
    scale, bias = fit_scaling(z, y, scaling)
    provisional = Calibration(scale=scale, bias=bias, scaling=scaling)
    p = provisional.apply(z)
    thr = choose_threshold(y, p, rule=rule, target=target, confidence=confidence)
    cal = Calibration(
        threshold=thr, scale=scale, bias=bias, rule=rule, target=target if rule.startswith("sensitivity") else None,
        confidence=confidence if rule == "sensitivity_lcb" else None,
        scaling=scaling, fitted_on=described(data_dir), n_images=int(len(y)),
        metrics=operating_point(y, p, thr, confidence=confidence),
    )
    cal.save(Path(model_path).parent / CALIBRATION_FILE)
    run_log.record(Path(model_path).parent, command)
    logger.info("calibration: %s", asdict(cal))
    return cal

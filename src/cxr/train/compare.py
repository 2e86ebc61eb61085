"""``cxr compare``: several models side by side on one labelled sample, with how each was trained.

Each model is a training run's ``model.keras`` (its ``history.json``,
``train_config.json`` and ``calibration.json`` beside it) or a served model
directory (``model_repository/<name>``: the FP32 ONNX, threshold and training
facts from its ``model_card.json``). Every model is scored on the same images at
its own stored threshold; quoted figures (a published accuracy) are rows of
their own, labelled as quoted and never mixed with measured ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxr.core.errors import CxrError
from cxr.core.model_dir import ModelDir
from cxr.core.paths import relative
from cxr.train import metrics
from cxr.train.evaluate import evaluate_arrays, load_labelled
from cxr.train.scoring import KerasScorer, Scorer, load_scorer
from cxr.train.trainer import epochs_done

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """How a model was trained, as its run directory or model card records it."""

    architecture: str
    seconds: float | None
    epochs_run: float | None
    max_epochs: int | None
    time_budget_s: float | None
    stopped_by: str | None
    imagenet_weights: bool
    threshold_rule: str | None
    parameters: int


@dataclass(frozen=True)
class Quoted:
    """A published figure that was not measured here."""

    label: str
    accuracy: float
    source: str

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a quoted row needs a label")
        if not 0 <= self.accuracy <= 1:
            raise ValueError(f"quoted accuracy must be a fraction in [0, 1], got {self.accuracy}")


def parse_quoted(text: str) -> Quoted:
    """``LABEL=ACCURACY[=SOURCE]`` (accuracy as a fraction or a percentage such as ``80.9%``)."""
    parts = text.split("=", 2)
    if len(parts) < 2:
        raise CxrError(f"--quoted {text!r}: expected LABEL=ACCURACY[=SOURCE]")
    raw = parts[1].strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CxrError(f"--quoted {text!r}: accuracy {raw!r} is not a number") from None
    return Quoted(parts[0].strip(), value, parts[2].strip() if len(parts) == 3 else "")


def _onnx_parameters(path: Path) -> int:
    """Weights of the classifier in an exported graph: the OOD head's own constants left out."""
    from cxr.core.graph import base_parameter_count

    return base_parameter_count(path)


def _from_run(model_path: Path) -> tuple[Trained, Scorer]:
    run = model_path.parent
    scorer = KerasScorer(model_path)
    hist = json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else {}
    cfg = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").exists() else {}
    trained = Trained(
        architecture=str(cfg.get("arch", "unknown")), seconds=hist.get("seconds"), epochs_run=epochs_done(hist),
        max_epochs=cfg.get("epochs"), time_budget_s=cfg.get("time_budget_s"), stopped_by=hist.get("stopped_by"),
        imagenet_weights=cfg.get("weights") is not None, threshold_rule=scorer.calibration.rule,
        parameters=int(scorer.model.count_params()),
    )
    return trained, scorer


def _from_repository(model_dir: Path) -> tuple[Trained, Scorer]:
    card = ModelDir(model_dir).card()
    onnx_path = model_dir / card.file
    scorer = load_scorer(onnx_path)  # threshold from the card
    training = card.training
    cfg = training.get("config", {})
    epochs_run = training.get("epochs_done")
    if epochs_run is None and training.get("best_epoch") is not None and training.get("best_epoch") == cfg.get("epochs"):
        epochs_run = training["best_epoch"]  # older cards: the best epoch was the last one allowed, so all of them ran
    trained = Trained(
        architecture=card.architecture, seconds=training.get("seconds"),
        epochs_run=None if epochs_run is None else float(epochs_run), max_epochs=cfg.get("epochs"),
        time_budget_s=cfg.get("time_budget_s"), stopped_by=training.get("stopped_by"),
        imagenet_weights=cfg.get("weights") is not None, threshold_rule=card.calibration.get("rule"),
        parameters=_onnx_parameters(onnx_path),
    )
    return trained, scorer


def load_entry(path: Path) -> tuple[Trained, Scorer]:
    """Training facts and a scorer for a run's ``model.keras`` or a served model directory."""
    path = Path(path)
    if path.suffix == ".keras" and path.is_file():
        return _from_run(path)
    if path.is_dir() and ModelDir(path).has_card():
        return _from_repository(path)
    raise CxrError(f"{path}: expected a training run's model.keras or a model-repository directory with model_card.json")


def compare(
    entries: list[tuple[str, Path]], data_dir: Path, out_dir: Path, *, quoted: list[Quoted] | None = None,
    notes: list[str] | None = None, n_boot: int = 1000, cache_dir: Path | None = None,
) -> dict:
    """Score every model on ``data_dir``; write ``comparison.json``, ``comparison.md`` and ``comparison_roc.png``."""
    if not entries:
        raise CxrError("nothing to compare: give at least one --model NAME=PATH")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise CxrError(f"model names must differ: {names}")
    x, y, _ = load_labelled(data_dir, cache_dir=cache_dir)
    rows, curves = [], []
    for name, path in entries:
        logger.info("scoring %s (%s) on %d images", name, path, len(y))
        trained, scorer = load_entry(path)
        p = scorer(x)
        report = evaluate_arrays(y, p, float(scorer.threshold), n_boot=n_boot)
        rows.append({"name": name, "model": relative(path), "trained": asdict(trained), "evaluation": report})
        curves.append((name, p))
    result = {
        "data": relative(data_dir), "n": int(len(y)), "n_pneumonia": int(y.sum()), "n_normal": int(len(y) - y.sum()),
        "measured": rows, "quoted": [asdict(q) for q in quoted or []], "notes": list(notes or []),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = _roc_plot(y, curves, out_dir / "comparison_roc.png", title=Path(data_dir).name)
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "comparison.md").write_text(markdown(result))
    return result


def _roc_plot(y: np.ndarray, curves: list[tuple[str, np.ndarray]], path: Path, *, title: str) -> str:
    from cxr.train.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p in curves:
        fpr, tpr, _ = metrics.roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC on {title} (n={len(y)})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path).name


def _ci(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} ({lo:.3f}-{hi:.3f})"


def _minutes(s: float | None) -> str:
    return "unknown" if s is None else f"{s / 60:.1f} min"


def _how(t: dict) -> str:
    base = "ImageNet base, frozen" if t["imagenet_weights"] else "from scratch"
    epochs = "?" if t["epochs_run"] is None else f"{t['epochs_run']:g}"
    budget = f", {t['time_budget_s'] / 60:g}-min budget" if t["time_budget_s"] else ""
    stop = f", stopped by {t['stopped_by'].replace('_', ' ')}" if t["stopped_by"] else ""
    return f"{base}; {epochs} of {t['max_epochs']} epochs{budget}{stop}"


def markdown(result: dict) -> str:
    """The comparison as Markdown: measured rows, then quoted rows, then how to read it."""
    lines = [
        f"# Model comparison on `{result['data']}`",
        "",
        f"{result['n']} images ({result['n_pneumonia']} pneumonia, {result['n_normal']} normal). Every measured row "
        "was scored here on the same images, at the model's own stored threshold; 95% intervals are stratified "
        "bootstrap. Written by `cxr compare`.",
        "",
        "| model | architecture | parameters | how trained | training time (2 CPU cores) | ROC AUC | accuracy at 0.5 "
        "| threshold (rule) | sensitivity | specificity | accuracy at threshold |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["measured"]:
        t, m = r["trained"], r["evaluation"]["metrics"]
        thr = r["evaluation"]["threshold"]
        lines.append(
            f"| {r['name']} (`{r['model']}`) | {t['architecture']} | {t['parameters']:,} | {_how(t)} | "
            f"{_minutes(t['seconds'])} | {_ci(m['roc_auc'])} | {_ci(m['accuracy_at_0.5'])} | "
            f"{thr:.4f} ({t['threshold_rule'] or 'none stored'}) | {_ci(m['sensitivity'])} | {_ci(m['specificity'])} | "
            f"{_ci(m['accuracy'])} |"
        )
    for q in result["quoted"]:
        src = f" ({q['source']})" if q["source"] else ""
        lines.append(
            f"| {q['label']}: **quoted, not measured**{src} | | | | | | {q['accuracy']:.3f} (quoted) | | | | |"
        )
    lines += [
        "",
        f"![ROC curves]({result['plot']})",
        "",
        "How to read it:",
        "- ROC AUC needs no threshold and does not change with probability scaling. Accuracy at 0.5 and the "
        "threshold columns use each model's stored scaling and operating point; where those were fitted on these "
        "same images (`cxr calibrate` on the site sample), they are in-sample.",
        "- A quoted row comes from its source, on its own images; it is not a measurement of this sample.",
        "- Parameters: Keras's count for a training run; for a served model, the ONNX graph's weights without the "
        "OOD head (batch normalisation folded into the convolutions, so slightly fewer than Keras counts).",
        "- Training time is the whole `cxr train` run (decoding, training, validation) on this machine's 2 cores.",
        *[f"- {n}" for n in result.get("notes", [])],
        "",
    ]
    return "\n".join(lines)

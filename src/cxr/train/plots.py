"""PNG figures: the report's training curves and the evaluation plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxr.core import contract  # noqa: E402
from cxr.train import metrics  # noqa: E402


def save_figure(fig: plt.Figure, path: Path, *, dpi: int = 110) -> Path:
    """Lay out, write as PNG and close a figure (every plot of the project ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def training_curves(history: dict[str, list[float]], out_dir: Path) -> list[Path]:
    """The report's two figures: "Model accuracy" and "Model loss", train vs validation."""
    paths = []
    for key, title, fname in (("accuracy", "Model accuracy", "accuracy.png"), ("loss", "Model loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, Path(out_dir) / fname))
    return paths


def evaluation_plots(y_true: np.ndarray, y_prob: np.ndarray, threshold: float, out_dir: Path, *, title: str) -> dict[str, str]:
    """ROC, precision-recall, reliability and confusion-matrix PNGs; returns name -> file name."""
    out_dir = Path(out_dir)
    files: dict[str, str] = {}

    fpr, tpr, _ = metrics.roc_curve(y_true, y_prob)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {metrics.roc_auc(y_true, y_prob):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    t = metrics.threshold_metrics(y_true, y_prob, threshold)
    ax.plot(1 - t["specificity"], t["sensitivity"], "o", color="red", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {title}")
    ax.legend(loc="lower right")
    files["roc"] = save_figure(fig, out_dir / "roc.png").name

    order = np.argsort(-y_prob)
    tp = np.cumsum(y_true[order])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / max(int(y_true.sum()), 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.step(recall, precision, where="post", label=f"AP {metrics.pr_auc(y_true, y_prob):.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"Precision-recall: {title}", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    files["pr"] = save_figure(fig, out_dir / "pr.png").name

    rel = metrics.reliability(y_true, y_prob)
    fig, ax = plt.subplots(figsize=(5, 5))
    mids = [(b["lo"] + b["hi"]) / 2 for b in rel]
    ax.bar(mids, [b["frac_pos"] if b["count"] else 0 for b in rel], width=0.09, alpha=0.7, label="observed")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.set(xlabel="predicted probability", ylabel="fraction pneumonia",
           title=f"Reliability (ECE {metrics.expected_calibration_error(y_true, y_prob):.3f})")
    ax.legend(loc="upper left")
    files["reliability"] = save_figure(fig, out_dir / "reliability.png").name

    c = metrics.confusion(y_true, y_prob, threshold)
    cm = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], [f"pred {lab}" for lab in contract.LABELS])
    ax.set_yticks([0, 1], [f"true {lab}" for lab in contract.LABELS])
    ax.set_title(f"Confusion at {threshold:.3f}")
    files["confusion"] = save_figure(fig, out_dir / "confusion.png").name
    return files

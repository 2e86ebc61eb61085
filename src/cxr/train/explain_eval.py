"""``cxr explain-eval``: which Grad-CAM stage explains the served model best, measured.

Faithfulness by deletion (Petsiuk et al. 2018): for films the model answers
Pneumonia, grey out the k% of pixels the map ranks highest and measure how far
P(pneumonia) falls; a map that points at the evidence makes it fall further
than a random map. Also reported: the model-randomisation sanity check
(Adebayo et al. 2018; the map must change when the head's weights are
randomised) and where the peaks fall (a map that always peaks at the image
centre explains nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cxr.core import contract

FRACTIONS = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class ExplainEvalConfig:
    """What ``cxr explain-eval`` runs.

    Attributes:
        repository: Model repository.
        model: Model folder.
        data: Labelled folder ({NORMAL,PNEUMONIA}/); its Pneumonia-answered films are used.
        out_dir: Where ``gradcam.md``, ``gradcam.json`` and ``gradcam_examples.png`` go.
        limit: Films used at most.
        layers: Layers compared (default: the architecture's, :data:`cxr.client.explain.LAYERS`).
    """

    repository: Path
    model: str
    data: Path
    out_dir: Path
    limit: int = 60
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.limit < 2:
            raise ValueError("limit must be >= 2")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def run(cfg: ExplainEvalConfig) -> dict:
    from cxr.client import PneumoniaClient
    from cxr.client.explain import LAYERS, GradCam, architecture
    from cxr.core.errors import CxrError
    from cxr.train.evaluate import load_labelled

    if not cfg.layers:
        arch = architecture(Path(cfg.repository) / cfg.model)
        if arch not in LAYERS:
            raise CxrError(f"{cfg.model}: no layers to compare for architecture {arch}")
        cfg = replace(cfg, layers=LAYERS[arch])

    x, y, paths = load_labelled(cfg.data)
    with PneumoniaClient(str(cfg.repository), protocol="embedded", model=cfg.model) as client:
        scores = client.infer_scores(x)
        info = client.info
        keep = [i for i in range(len(x)) if y[i] == 1 and contract.is_positive(float(scores.probability[i]), info.threshold)
                and not contract.is_out_of_distribution(float(scores.ood_score[i]) if scores.ood_score is not None else 0.0,
                                                        info.ood_threshold)][: cfg.limit]
        films = x[keep]
        base_p = scores.probability[keep].astype(np.float64)
        rng = np.random.default_rng(0)
        results: dict[str, dict] = {}
        maps_by_layer: dict[str, np.ndarray] = {}
        for layer in (*cfg.layers, "random"):
            if layer == "random":
                maps = rng.random((len(films), contract.IMAGE_SIZE, contract.IMAGE_SIZE)).astype(np.float32)
                cam = None
            else:
                cam = GradCam(Path(cfg.repository) / cfg.model, served_sha256=info.sha256, layer=layer)
                maps = np.stack([cam.heatmap(f) for f in films])
            maps_by_layer[layer] = maps
            drops = {}
            for frac in FRACTIONS:
                deleted = films.copy()
                k = int(frac * contract.IMAGE_SIZE**2)
                for i, m in enumerate(maps):
                    idx = np.argsort(m.ravel())[::-1][:k]
                    flat = deleted[i].reshape(-1)
                    flat[idx] = np.uint8(round(float(films[i].mean())))
                p = client.infer_batch(deleted).astype(np.float64)
                drops[f"{int(frac * 100)}%"] = float(np.mean(base_p - p))
            entry: dict = {"mean_drop_in_p": drops}
            if cam is not None:
                rand = cam.with_random_head(seed=1)
                entry["randomised_head_correlation"] = float(np.mean([_corr(cam.cam(f), rand.cam(f)) for f in films[:20]]))
                peaks = [np.unravel_index(int(m.argmax()), m.shape) for m in maps]
                centre = [abs(r - 112) < 34 and abs(c - 112) < 34 for r, c in peaks]  # central 30% square
                cells = {(int(r) // 16, int(c) // 16) for r, c in peaks}
                entry["peaks_in_centre"] = float(np.mean(centre))
                entry["distinct_peak_cells_of_196"] = len(cells)
                entry["resolution"] = list(cam.cam(films[0]).shape)
            results[layer] = entry
    report = {"model": cfg.model, "sha256": info.sha256, "data": str(cfg.data), "n_films": len(films),
              "threshold": info.threshold, "layers": results, "best_layer": choose(results, cfg.layers)}
    best = str(report["best_layer"])
    corr = float(results[best]["randomised_head_correlation"])
    report["passes_randomisation_check"] = corr < MAX_RANDOMISED_CORRELATION
    # the verdict travels with the model: the page and the listener say when its maps failed the check
    from cxr.core.model_dir import ModelDir

    folder = ModelDir(Path(cfg.repository) / cfg.model)
    folder.write_card(folder.card().replace(explain={
        "layer": best, "sha256": info.sha256, "randomised_head_correlation": corr,
        "max_randomised_correlation": MAX_RANDOMISED_CORRELATION,
        "passes_randomisation_check": report["passes_randomisation_check"],
        "report": str(Path(cfg.out_dir) / "gradcam.md")}))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradcam.json").write_text(json.dumps(report, indent=1) + "\n")
    _examples(films, maps_by_layer, cfg.layers, out / "gradcam_examples.png")
    (out / "gradcam.md").write_text(markdown(report))
    return report


#: A map that stays this correlated when the head is randomised fails the sanity check.
MAX_RANDOMISED_CORRELATION = 0.5


def choose(results: dict[str, dict], layers: tuple[str, ...]) -> str:
    """The rule: among layers that pass the model-randomisation check, the largest mean deletion drop at 5% and 10%
    (the smallest deletions: larger ones remove so much of the film that any map lowers P)."""
    passing = [L for L in layers if results[L]["randomised_head_correlation"] < MAX_RANDOMISED_CORRELATION] or list(layers)
    # no layer passing: the best of them is still chosen, and the card says its maps failed the check
    return max(passing, key=lambda L: (results[L]["mean_drop_in_p"]["5%"] + results[L]["mean_drop_in_p"]["10%"]) / 2)


def _examples(films: np.ndarray, maps: dict[str, np.ndarray], layers: tuple[str, ...], path: Path) -> None:
    from cxr.client.explain import overlay
    from cxr.train.plots import plt, save_figure  # the Agg backend is chosen there

    n = min(4, len(films))
    fig, axes = plt.subplots(n, len(layers), figsize=(3 * len(layers), 3 * n))
    axes = np.atleast_2d(axes)
    for i in range(n):
        for j, layer in enumerate(layers):
            axes[i, j].imshow(overlay(films[i][..., 0], maps[layer][i]))
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(layer, fontsize=9)
    save_figure(fig, path, dpi=90)


def markdown(rep: dict) -> str:
    lines = [
        "# Grad-CAM: which stage explains best",
        "",
        f"Generated by `cxr explain-eval` on {rep['n_films']} films of `{rep['data']}` that the served model "
        f"(`{rep['model']}`, sha256 `{rep['sha256'][:16]}...`) answers Pneumonia. Deletion: the top k% of pixels by "
        "the map are set to the film's mean grey level and the fall of P(pneumonia) is averaged (larger = the map "
        "points at what the model uses). A random map is the baseline.",
        "",
        "| map | resolution | P drop, 5% | 10% | 20% | corr. with randomised head | peaks in centre | distinct peak cells |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer, e in rep["layers"].items():
        d = e["mean_drop_in_p"]
        res = "x".join(map(str, e.get("resolution", []))) or "-"
        lines.append(
            f"| {layer} | {res} | {d['5%']:.3f} | {d['10%']:.3f} | {d['20%']:.3f} | "
            f"{e.get('randomised_head_correlation', float('nan')):.2f} | {e.get('peaks_in_centre', float('nan')):.0%} | "
            f"{e.get('distinct_peak_cells_of_196', '-')} |"
        )
    verdict = ("" if rep.get("passes_randomisation_check") else
               " **No map passes the randomisation check**, so the rule fell back to every map: the chosen one is "
               "the best of maps that fail it, and the page says so beside each map.")
    lines += [
        "",
        f"Chosen: **{rep['best_layer']}**.{verdict} Rule: among the maps that pass the model-randomisation check "
        f"(correlation with the randomised-head map below {MAX_RANDOMISED_CORRELATION}), the largest mean fall of "
        "P(pneumonia) at 5% and 10% deletion; at 20% so much of the film is greyed out that a coarse central blob "
        "lowers P whatever it marks. The page uses `cxr.client.explain.DEFAULT_LAYER`, which a test keeps equal to this choice.",
        "",
        "![examples](gradcam_examples.png)",
        "",
    ]
    return "\n".join(lines)

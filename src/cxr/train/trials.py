"""Trials on a locked split, side by side: per-source AUC on select patients, cost per film, leave-one-source-out, and
the source probe (``cxr trials``).

* Each trial is a training run (``cxr train --split``, optionally ``--leave-out``). Its Keras model scores the
  locked split's select side (never the test side, which only ``cxr claims`` reads); the report gives each
  source's AUC with a patient-bootstrap interval
  (:mod:`cxr.train.claims`). A source a run left out is marked: its figures there are leave-one-source-out.
* The source probe asks how well a model's penultimate features (the global average pool) tell the sources
  apart **among Pneumonia films**: a patient-grouped 5-fold cross-validated logistic regression per pair of
  sources, AUC out of fold. Near 0.5 the features carry no hospital; near 1 a classifier could learn the
  hospital instead of the disease (DeGrave et al., Nat. Mach. Intell. 2021).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.train import data as data_mod
from cxr.train import metrics

logger = logging.getLogger(__name__)

#: Folds of the source probe's patient-grouped cross-validation.
PROBE_FOLDS = 5


@dataclass(frozen=True)
class Trial:
    """One run to report: its name, its run directory (``model.keras``, ``train_config.json``) and what it is."""

    name: str
    run_dir: Path
    what: str = ""

    def __post_init__(self) -> None:
        if not (Path(self.run_dir) / "model.keras").exists():
            raise FileNotFoundError(f"{self.run_dir}: no model.keras")

    @property
    def left_out(self) -> tuple[str, ...]:
        cfg = json.loads((Path(self.run_dir) / "train_config.json").read_text())
        return tuple(cfg.get("leave_out") or ())


def probe_sources(features: np.ndarray, sources: Sequence[str], patients: Sequence[str], *,
                  seed: int = 0) -> dict[str, dict]:
    """Out-of-fold AUC of a logistic regression telling each pair of sources apart, patient-grouped folds."""
    from cxr.train.linear import fit_logistic, group_folds

    src = np.array(sources)
    out: dict[str, dict] = {}
    names = sorted(set(sources))
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            m = np.flatnonzero((src == a) | (src == b))
            y = (src[m] == b).astype(int)
            groups = [patients[j] for j in m]
            k = min(PROBE_FOLDS, len(set(groups)))
            if min(y.sum(), (1 - y).sum()) < 5 or k < 2:
                continue
            score = np.full(len(m), np.nan)
            for fold in group_folds(groups, k, seed=seed):
                train = np.setdiff1d(np.arange(len(m)), fold)
                if len(set(y[train].tolist())) < 2:
                    continue
                model = fit_logistic(features[m[train]], y[train], l2=10.0)
                score[fold] = model.logit(features[m[fold]])
            ok = np.isfinite(score)
            out[f"{a} vs {b}"] = {"auc": metrics.roc_auc(y[ok], 1 / (1 + np.exp(-score[ok]))),
                                  "films": [int((y == 0).sum()), int((y == 1).sum())],
                                  "patients": len(set(groups)), "folds": k}
    return out


def flops_per_film(model) -> float:
    """Floating-point operations of one film through a Keras model's convolutions and dense layers (a
    multiply-add counts 2), from the layers' shapes."""
    total = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        out_shape = layer.output.shape
        kernel = layer.get_weights()[0].shape
        if kind == "Dense":
            total += 2.0 * kernel[0] * kernel[1]
        elif kind == "Conv2D":
            total += 2.0 * kernel[0] * kernel[1] * kernel[2] * kernel[3] * out_shape[1] * out_shape[2]
        else:
            total += 2.0 * kernel[0] * kernel[1] * kernel[2] * out_shape[1] * out_shape[2]
    return total


def run(trials: Sequence[Trial], split_file: Path, out_dir: Path, *, cache_dir: Path | None = None,
        probe: str | None = None, n_boot: int = 1000, point_source: str = "nih", point_target: float = 0.9,
        speed: Callable[[list[Path]], list[float]] | None = None) -> dict:
    """Score every trial on the select side only (AUC per source), and run the source probe on the trial named
    ``probe`` (default: the first). The test side is not read: trials choose the recipe, and the locked test
    patients are read once, by ``cxr claims``, for the model that ships. Each trial also gets an operating point
    as the shipped adult one is chosen (the highest threshold whose sensitivity on ``point_source``'s select films
    reaches ``point_target``) and its sensitivity and specificity there on each source's select films (in-sample
    for ``point_source``). Per trial: parameters, GFLOP per film, training time, and, with ``speed`` (the CLI
    passes the served graphs' measurement, ONNX Runtime on this CPU, every trial side by side in one call), films
    per second. Writes ``trials.json``
    and ``trials.md`` into ``out_dir``."""
    import keras

    from cxr.core import contract
    from cxr.train import models  # noqa: F401  (registers custom layers)
    from cxr.train.claims import patient_bootstrap
    from cxr.train.evaluate import choose_threshold
    from cxr.train.scoring import KerasScorer

    split = data_mod.Split.load(split_file)
    images, select, _ = data_mod.load_samples(split.samples("select"), cache_dir=cache_dir, what="select")
    report: dict = {"split": str(split_file), "side": "select", "trials": {}, "probe": None,
                    "point": {"source": point_source, "target": point_target}}
    sources = sorted({s.source for s in select})
    rates = speed([Path(t.run_dir) / "model.keras" for t in trials]) if speed is not None else [None] * len(trials)
    for t, rate in zip(trials, rates):
        model_path = Path(t.run_dir) / "model.keras"
        model = keras.models.load_model(str(model_path), compile=False)
        hist = json.loads((Path(t.run_dir) / "history.json").read_text())
        row: dict = {"what": t.what, "left_out": list(t.left_out), "seconds": hist.get("seconds"),
                     "epochs_done": hist.get("epochs_done"), "best_epoch": hist.get("best_epoch"), "auc": {},
                     "at_point": {}, "architecture": model.name, "parameters": int(model.count_params()),
                     "gflop_per_film": round(flops_per_film(model) / 1e9, 3),
                     "films_per_s": round(rate, 1) if rate is not None else None}
        logits = KerasScorer(model_path).logits(images)
        p = 1 / (1 + np.exp(-logits.astype(np.float64)))
        for source in sources:
            idx = [i for i, s in enumerate(select) if s.source == source]
            y = np.array([select[i].label for i in idx])
            if len(set(y.tolist())) < 2:
                continue
            row["auc"][source] = list(patient_bootstrap(y, p[idx], [select[i].patient for i in idx], 0.5,
                                                        n_boot=n_boot)["auc"])
        chose = [i for i, s in enumerate(select) if s.source == point_source]
        thr = choose_threshold(np.array([select[i].label for i in chose]), p[chose], rule="sensitivity",
                               target=point_target)
        row["point_threshold"] = thr
        for source in sources:
            idx = [i for i, s in enumerate(select) if s.source == source]
            y = np.array([select[i].label for i in idx])
            pos = np.asarray(contract.is_positive(p[idx], thr), bool)
            row["at_point"][source] = {"films": len(idx),
                                       "sensitivity": float(pos[y == 1].mean()) if (y == 1).any() else None,
                                       "specificity": float((~pos[y == 0]).mean()) if (y == 0).any() else None}
        report["trials"][t.name] = row
        if (probe or trials[0].name) == t.name:
            gap = keras.Model(model.inputs, model.get_layer("gap").output)
            pneu = [i for i, s in enumerate(select) if s.label == 1]
            x = images[pneu].astype(np.float32)
            feats = np.concatenate([np.asarray(gap(x[i:i + 64], training=False)) for i in range(0, len(x), 64)])
            report["probe"] = {
                "model": t.name, "films": "Pneumonia films of the select side",
                "pairs": probe_sources(feats, [select[i].source for i in pneu], [select[i].patient for i in pneu]),
            }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trials.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "trials.md").write_text(markdown(report))
    return report


def _ci(v: list[float] | None) -> str:
    return "-" if not v else f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"


def markdown(report: dict) -> str:
    """The trials table (select AUC per source, a left-out source marked LOSO; the cost of each model), the
    operating-point table and the probe table."""
    sources = sorted({s for t in report["trials"].values() for s in t["auc"]})
    lines = ["# Trials on the locked split (select side)", "",
             f"Split: `{report['split']}`. Every run trained on its train side and chose its checkpoint on its select "
             "side; this table reads the **select side only** (the test side is read only by `cxr claims`, for the "
             "models that ship, and each read is recorded in their `claims.json`). AUC of the raw model output per source, 95% patient-bootstrap interval. *LOSO*: the "
             "run never saw that source (leave-one-source-out). Only sources with both classes have an AUC. "
             "GFLOP: per film, from the layers' shapes; films/s: the exported graph in ONNX Runtime on this CPU "
             "(batch 16, all cores), every trial side by side: the median of 5 interleaved rounds of 256 films each, so "
             "a load that comes and goes falls on every trial alike (read the ratios; the figures depend on the CPU "
             "and what else it ran).", "",
             "| run | what | parameters | GFLOP | films/s | training s | epochs | "
             + " | ".join(f"{s} select" for s in sources) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(sources)]
    for name, t in report["trials"].items():
        cells = [_ci(t["auc"].get(s)) + (" *LOSO*" if s in t["left_out"] else "") for s in sources]
        speed = "-" if t.get("films_per_s") is None else f"{t['films_per_s']:.0f}"
        params = "-" if t.get("parameters") is None else f"{t['parameters'] / 1e6:.2f} M"
        gflop = "-" if t.get("gflop_per_film") is None else f"{t['gflop_per_film']:.2f}"
        lines.append(f"| {name} | {t['what']} | {params} | {gflop} | {speed} | {t['seconds'] or 0:.0f} | "
                     f"{t['epochs_done']} | " + " | ".join(cells) + " |")
    pt = report.get("point")
    if pt:
        at = sorted({s for t in report["trials"].values() for s in t["at_point"]})
        lines += ["", f"At each run's own adult point chosen on `{pt['source']}` alone (sensitivity >= {pt['target']} on "
                  f"its `{pt['source']}` select films; the first lock's rule, not necessarily the shipped one's, which "
                  "the model card states), sensitivity / specificity on each source's select films (in-sample for "
                  f"`{pt['source']}`, which chose the point):", "",
                  "| run | threshold | " + " | ".join(at) + " |", "|---|---|" + "---|" * len(at)]
        for name, t in report["trials"].items():
            cells = []
            for s in at:
                v = t["at_point"].get(s)
                if v is None:
                    cells.append("-")
                    continue
                se = "-" if v["sensitivity"] is None else f"{v['sensitivity']:.3f}"
                sp = "-" if v["specificity"] is None else f"{v['specificity']:.3f}"
                cells.append(f"{se} / {sp} ({v['films']})" + (" *LOSO*" if s in t["left_out"] else ""))
            lines.append(f"| {name} | {t['point_threshold']:.4f} | " + " | ".join(cells) + " |")
    pr = report.get("probe")
    if pr:
        lines += ["", f"## Source probe ({pr['model']})", "",
                  f"{pr['films']}: how well a logistic regression on the penultimate features (global average pool) "
                  f"tells two sources apart, out-of-fold AUC of a patient-grouped {PROBE_FOLDS}-fold cross-validation. "
                  "0.5: the features carry no hospital.", "",
                  "| pair | Pneumonia films | patients | AUC |", "|---|---|---|---|"]
        for pair, v in pr["pairs"].items():
            lines.append(f"| {pair} | {v['films'][0]} + {v['films'][1]} | {v['patients']} | {v['auc']:.3f} |")
    return "\n".join(lines) + "\n"

"""Trials on a locked split, side by side: per-source AUC on select and test patients, leave-one-source-out, and
the source probe (``cxr trials``).

* Each trial is a training run (``cxr train --split``, optionally ``--leave-out``). Its Keras model scores the
  locked split's select and test sides; the report gives each source's AUC with a patient-bootstrap interval
  (:mod:`cxr.train.claims`). A source a run left out is marked: its figures there are leave-one-source-out.
* The source probe asks how well a model's penultimate features (the global average pool) tell the sources
  apart **among Pneumonia films**: a patient-grouped 5-fold cross-validated logistic regression per pair of
  sources, AUC out of fold. Near 0.5 the features carry no hospital; near 1 a classifier could learn the
  hospital instead of the disease (DeGrave et al., Nat. Mach. Intell. 2021).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
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


def run(trials: Sequence[Trial], split_file: Path, out_dir: Path, *, cache_dir: Path | None = None,
        probe: str | None = None, n_boot: int = 1000, point_source: str = "nih", point_target: float = 0.9) -> dict:
    """Score every trial on the select and test sides (AUC per source), and run the source probe on the trial
    named ``probe`` (default: the first). Each trial also gets an operating point as the shipped adult one is
    chosen (the highest threshold whose sensitivity on ``point_source``'s select films reaches ``point_target``),
    and its sensitivity and specificity there on each source's test films (a one-class source: its select and
    test films together, sensitivity only). Writes ``trials.json`` and ``trials.md`` into ``out_dir``."""
    import keras

    from cxr.train import models  # noqa: F401  (registers custom layers)
    from cxr.train.claims import patient_bootstrap
    from cxr.train.scoring import KerasScorer

    split = data_mod.Split.load(split_file)
    sides = {side: split.samples(side) for side in ("select", "test")}
    images = {side: data_mod.load_images([s.path for s in ss], cache_dir=cache_dir) for side, ss in sides.items()}
    report: dict = {"split": str(split_file), "trials": {}, "probe": None,
                    "point": {"source": point_source, "target": point_target}}
    for t in trials:
        scorer = KerasScorer(Path(t.run_dir) / "model.keras")
        hist = json.loads((Path(t.run_dir) / "history.json").read_text())
        row: dict = {"what": t.what, "left_out": list(t.left_out), "seconds": hist.get("seconds"),
                     "epochs_done": hist.get("epochs_done"), "best_epoch": hist.get("best_epoch"), "auc": {},
                     "at_point": {}}
        probs = {}
        for side, ss in sides.items():
            logits = scorer.logits(images[side])
            p = 1 / (1 + np.exp(-logits.astype(np.float64)))
            probs[side] = p
            for source in sorted({s.source for s in ss}):
                idx = [i for i, s in enumerate(ss) if s.source == source]
                y = np.array([ss[i].label for i in idx])
                if len(set(y.tolist())) < 2:
                    continue
                ci = patient_bootstrap(y, p[idx], [ss[i].patient for i in idx], 0.5, n_boot=n_boot)["auc"]
                row["auc"].setdefault(source, {})[side] = list(ci)
        from cxr.core import contract
        from cxr.train.evaluate import choose_threshold

        sel = [i for i, s in enumerate(sides["select"]) if s.source == point_source]
        y_sel = np.array([sides["select"][i].label for i in sel])
        thr = choose_threshold(y_sel, probs["select"][sel], rule="sensitivity", target=point_target)
        row["point_threshold"] = thr
        one_class = {src for src in {s.source for s in sides["test"]}
                     if len({s.label for s in sides["test"] if s.source == src}) < 2}
        for source in sorted({s.source for s in sides["test"]}):
            use = [("test", i) for i, s in enumerate(sides["test"]) if s.source == source]
            if source in one_class:
                use += [("select", i) for i, s in enumerate(sides["select"]) if s.source == source]
            y = np.array([sides[sd][i].label for sd, i in use])
            pos = np.asarray(contract.is_positive(np.array([probs[sd][i] for sd, i in use]), thr), bool)
            row["at_point"][source] = {"films": len(use),
                                       "sensitivity": float(pos[y == 1].mean()) if (y == 1).any() else None,
                                       "specificity": float((~pos[y == 0]).mean()) if (y == 0).any() else None}
        report["trials"][t.name] = row
        if (probe or trials[0].name) == t.name:
            model = keras.models.load_model(str(Path(t.run_dir) / "model.keras"), compile=False)
            gap = keras.Model(model.inputs, model.get_layer("gap").output)
            pneu = [(side, i) for side, ss in sides.items() for i, s in enumerate(ss) if s.label == 1]
            x = np.stack([images[side][i] for side, i in pneu]).astype(np.float32)
            feats = np.concatenate([np.asarray(gap(x[i:i + 64], training=False)) for i in range(0, len(x), 64)])
            report["probe"] = {
                "model": t.name, "films": "Pneumonia films of the select and test sides",
                "pairs": probe_sources(feats, [sides[side][i].source for side, i in pneu],
                                       [sides[side][i].patient for side, i in pneu]),
            }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trials.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "trials.md").write_text(markdown(report))
    return report


def _ci(v: list[float] | None) -> str:
    return "-" if not v else f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"


def markdown(report: dict) -> str:
    """The trials table (AUC per source and side; a left-out source is marked LOSO) and the probe table."""
    sources = sorted({s for t in report["trials"].values() for s in t["auc"]})
    lines = ["# Trials on the locked split", "",
             f"Split: `{report['split']}`. Every run trained on its train side and chose its checkpoint on its select "
             "side; the test side was read only for this table. AUC of the raw model output per source, 95% patient-"
             "bootstrap interval. *LOSO*: the run never saw that source (leave-one-source-out). Only sources with "
             "both classes have an AUC.", "",
             "| run | what | seconds | epochs | " + " | ".join(f"{s} select | {s} test" for s in sources) + " |",
             "|---|---|---|---|" + "---|---|" * len(sources)]
    for name, t in report["trials"].items():
        cells = []
        for s in sources:
            mark = " *LOSO*" if s in t["left_out"] else ""
            a = t["auc"].get(s, {})
            cells += [_ci(a.get("select")) + mark, _ci(a.get("test")) + mark]
        lines.append(f"| {name} | {t['what']} | {t['seconds'] or 0:.0f} | {t['epochs_done']} | " + " | ".join(cells) + " |")
    pt = report.get("point")
    if pt:
        lines += ["", f"At each run's own operating point chosen as the shipped adult one (sensitivity >= {pt['target']} "
                  f"on its `{pt['source']}` select films), sensitivity / specificity on each source's test films "
                  "(a one-class source: its select and test films, sensitivity only):", "",
                  "| run | threshold | " + " | ".join(sorted({s for t in report["trials"].values()
                                                              for s in t["at_point"]})) + " |",
                  "|---|---|" + "---|" * len({s for t in report["trials"].values() for s in t["at_point"]})]
        for name, t in report["trials"].items():
            cells = []
            for s in sorted({s for tt in report["trials"].values() for s in tt["at_point"]}):
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

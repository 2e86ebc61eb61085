#!/usr/bin/env python3
"""How a model's OOD distance treats films its fit never saw, at a threshold (the card's, or --threshold).

    .venv/bin/python scripts/ood_unseen.py --repository model_repository --name pneumonia_accurate \
        --split docs/model/adult_lock/split.json [--threshold 60.0216] [--out report.json]

Refits the distance as the card states it (the tapped features, every training source at equal mass, the card's
shrinkage), then prints per source: the median distance of its training films and of its select films as a share
of the threshold (a fit memorises a small source's films: the first is far below the second), and the share of
its training films above the threshold when scored by fits that did not see them (`new_patients`: five folds of
patients; `new_hospital`: the other sources only; `cxr.export.ood_head.unseen_scores`). Reads the train and select
sides only, never the test side. docs/model/adult_lock/README.md ("A fourth read") quotes its output for the
accurate model's earlier threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--split", type=Path, required=True, help="the model's locked split.json")
    ap.add_argument("--threshold", type=float, help="the threshold to read the distances at (default: the card's)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON")
    a = ap.parse_args(argv)

    from cxr.core.graph import strip_ood
    from cxr.export import ood_head
    from cxr.export.repository import read_card, verified_onnx
    from cxr.train import data as data_mod

    folder = a.repository / a.name
    card = read_card(folder)
    ood = card.ood
    split = data_mod.Split.load(a.split)
    x_train, tr, _ = data_mod.load_samples(split.samples("train"), what="train")
    x_val, va, _ = data_mod.load_samples(split.samples("val"), what="select")
    import onnx

    base = strip_ood(onnx.load(str(verified_onnx(folder, card))))
    extract = ood_head.FeatureExtractor(base, tuple(ood["taps"]))
    f_train, f_val = extract(x_train), extract(x_val)
    sources = np.array([s.source for s in tr])
    a_ = float(ood["shrinkage"])
    fit = ood_head.at_shrinkage(*ood_head.moments(f_train, ood_head.source_weights(sources)), a_, n_train=len(f_train))

    thr = float(a.threshold if a.threshold is not None else ood["threshold"])
    d_train, d_val = fit.distance(f_train), fit.distance(f_val)
    val_sources = np.array([s.source for s in va])
    unseen = ood_head.unseen_scores(f_train, [s.source for s in tr], [s.patient for s in tr], a_)
    out: dict = {"model": a.name, "sha256": card.sha256, "threshold": thr, "sources": {}}
    for name in sorted(set(sources) | set(val_sources)):
        row: dict = {}
        if (sources == name).any():
            row["train_median_over_threshold"] = float(np.median(d_train[sources == name]) / thr)
        if (val_sources == name).any():
            row["select_median_over_threshold"] = float(np.median(d_val[val_sources == name]) / thr)
            row["select_flagged"] = float(np.mean(d_val[val_sources == name] > thr))
        for u in unseen:
            if u.source == name:
                row[f"{u.kind}_flagged"] = float(np.mean(u.distances > thr))
                row[f"{u.kind}_films"] = len(u.distances)
        out["sources"][name] = row
    print(f"{a.name} (sha256 {card.sha256[:12]}), distance threshold {thr:.4f} (the body-part check not included)")
    for name, row in out["sources"].items():
        print(f"  {name:12s} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items()))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

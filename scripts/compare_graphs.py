"""Two ONNX graphs of the served contract on one labelled folder, by patient: each one's ROC AUC with DeLong's
one-sided 95% lower bound and two-sided 95% interval (both on the logit scale), and the paired difference (the same patients; DeLong's paired variance) with its one-sided
95% lower bound and a two-sided interval. A patient is one case (label: any Pneumonia film; score: its largest).

    .venv/bin/python scripts/compare_graphs.py FOLDER A.onnx B.onnx [--names a b] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cxr.core import contract, stats
from cxr.core.ort_session import make_session
from cxr.train import data as data_mod
from cxr.train.evaluate import load_labelled


def probabilities(graph: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    sess = make_session(str(graph))
    return np.concatenate([sess.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: x[i : i + batch]})[0][:, 0]
                           for i in range(0, len(x), batch)]).astype(np.float64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--names", nargs=2, default=["a", "b"])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    x, y, paths = load_labelled(args.folder)
    named = data_mod.manifest_patients(args.folder)
    patients = [named.get(Path(f).name, Path(f).name) for f in paths]
    pa, pb = probabilities(args.a, x), probabilities(args.b, x)
    ya, sa, keep_a = stats.per_patient(y, pa, patients)
    yb, sb, keep_b = stats.per_patient(y, pb, patients)
    assert keep_a == keep_b and np.array_equal(ya, yb)
    z = stats.z_of(0.975)
    out: dict = {"folder": str(args.folder), "films": int(len(y)), "patients": len(keep_a),
                 "pneumonia_patients": int(ya.sum())}
    for name, s in zip(args.names, (sa, sb)):
        b = stats.auc_bound(ya, s)
        # DeLong's two-sided 95% interval on the logit scale, from the one bound: the lower end is the 97.5% bound,
        # the upper end the same bound of the reversed scores (AUC(-s) = 1 - AUC(s), one variance)
        low, up = stats.auc_bound(ya, s, 0.975).lower, 1 - stats.auc_bound(ya, -s, 0.975).lower
        out[name] = {"auc": b.auc, "se": b.se, "lower_one_sided_95": b.lower, "two_sided_95": [low, up]}
    d = stats.paired_auc_difference(ya, sa, sb)
    out["difference"] = {"a_minus_b": d.difference, "se": d.se, "lower_one_sided_95": d.lower,
                         "two_sided_95": [d.difference - z * d.se, d.difference + z * d.se]}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

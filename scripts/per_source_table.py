"""Print the per-source results of a model as a Markdown table, from its committed report JSONs.

    .venv/bin/python scripts/per_source_table.py NAME=REPORT_OR_AUDIT.json ...

An evaluation report (cxr evaluate) gives AUC, sensitivity, specificity and counts; a site audit (cxr site-audit)
also gives the flagged share, with refused films counted as referrals.
"""

from __future__ import annotations

import json
import math
import sys


def fmt(v: float | None, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def row(name: str, path: str) -> str:
    with open(path) as fh:
        r = json.load(fh)
    if "checks" in r:  # a site audit
        s, sp, auc, fl = r["sensitivity"], r["specificity"], r["roc_auc"], r["flagged"]
        return (f"| {name} | {r['n']} | {s['n']} | {fmt(fl['value'] * 100, 1)}% | {fmt(auc['value'])} "
                f"({fmt(auc['ci95'][0])}-{fmt(auc['ci95'][1])}) | {fmt(s['value'])} ({s['k']}/{s['n']}) | "
                f"{fmt(sp['value'])} ({sp['k']}/{sp['n']}) | {fmt(r['threshold'], 4)} |")
    m, c = r["metrics"], r["confusion"]
    return (f"| {name} | {r['n']} | {r['n_pneumonia']} | {len(r.get('refused') or [])} refused | "
            f"{fmt(m['roc_auc']['value'])} ({fmt(m['roc_auc']['ci95'][0])}-{fmt(m['roc_auc']['ci95'][1])}) | "
            f"{fmt(m['sensitivity']['value'])} ({c['tp']}/{c['tp'] + c['fn']}) | "
            f"{fmt(m['specificity']['value'])} ({c['tn']}/{c['tn'] + c['fp']}) | {fmt(r['threshold'], 4)} |")


def main() -> int:
    print("| set | films | Pneumonia | flagged | AUC (95% CI) | sensitivity | specificity | threshold |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        name, _, path = arg.partition("=")
        print(row(name, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lay out one side of a training run's split, optionally one source's, as a labelled folder of symlinks.

    .venv/bin/python scripts/split_side.py RUN/split.json OUT [--side val] [--source nih] [--data KAGGLE_ROOT]
        [--patients N --seed S] [--exclude OTHER_SAMPLE ...]

``--patients N`` keeps N patients drawn at random (``--seed``) with all their films, as a site's sample comes:
its class mix is what the side's is, not stratified. ``--exclude`` leaves out the patients of another sample laid
out by this script (its ``MANIFEST.csv``), so that a second sample shares no patient with the first.

OUT/{NORMAL,PNEUMONIA}/ then holds links to the films (and OUT/MANIFEST.csv their patients), so that the
commands that take a labelled folder (cxr site-audit, cxr evaluate, cxr adapt) run on held-out patients.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from cxr.core import contract
from cxr.train.data import Split, write_manifest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("split", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--side", choices=["train", "val", "select", "test"], default="val",
                   help="val and select are one side (a locked split calls it select)")
    p.add_argument("--source", action="append", help="only this source's films (repeatable)")
    p.add_argument("--data", type=Path, help="Kaggle root, for splits without source roots")
    p.add_argument("--patients", type=int, help="keep this many patients, drawn at random (with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", type=Path, action="append", default=[],
                   help="a sample folder this script wrote: none of its patients is drawn (repeatable)")
    a = p.parse_args()
    samples = [s for s in Split.load(a.split).samples(a.side, a.data) if a.source is None or s.source in a.source]
    excluded: set[str] = set()
    for folder in a.exclude:
        manifest = folder / "MANIFEST.csv"
        if not manifest.is_file():
            print(f"--exclude {folder}: no MANIFEST.csv there", file=sys.stderr)
            return 2
        with manifest.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "patient" not in rows[0]:
            print(f"--exclude {folder}: its MANIFEST.csv has no patient column", file=sys.stderr)
            return 2
        excluded |= {row["patient"] for row in rows}
    if excluded and not excluded & {s.patient for s in samples}:
        print(f"warning: --exclude: none of the {len(excluded)} patients named is on this side, so nothing is left out "
              "(another side, split or source?)", file=sys.stderr)
    samples = [s for s in samples if s.patient not in excluded]
    if a.patients is not None:
        patients = sorted({s.patient for s in samples})
        if not 0 < a.patients <= len(patients):
            print(f"--patients {a.patients}: the side has {len(patients)} patients", file=sys.stderr)
            return 2
        keep = set(random.Random(a.seed).sample(patients, a.patients))
        samples = [s for s in samples if s.patient in keep]
    if not samples:
        print(f"no films on the {a.side} side" + (f" of source {a.source}" if a.source else ""), file=sys.stderr)
        return 2
    rows = []
    for s in samples:
        d = a.out / contract.CLASS_DIRS[s.label]
        d.mkdir(parents=True, exist_ok=True)
        name = f"{s.source}_{s.path.name}"
        (d / name).symlink_to(s.path.resolve())
        rows.append({"label": contract.CLASS_DIRS[s.label], "file_name": name, "patient": s.patient})
    write_manifest(a.out, rows)
    print(f"{len(samples)} films in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Take off a locked split's test side every film whose content (sha256) is also on its train or select side.

    .venv/bin/python scripts/drop_duplicated_tests.py docs/model/adult_lock/split.json

A lock made before `cxr lock-split` joined identical files under one patient could hold the same image on two
sides under two ids (SIIM has films that appear under two studies). Such a test film trained or chose the model, so
it cannot test it. Prints each entry removed; rewrites the split only when there is one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cxr.train.data import Split, without_duplicated_tests


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0])
    split, removed = without_duplicated_tests(Split.load(path))
    for entry in removed:
        print(f"removed from test: {entry}")
    if removed:
        split.save(path)
    print(f"{len(removed)} test films removed; {len(split.test)} remain")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

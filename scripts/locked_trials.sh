#!/usr/bin/env bash
# The trials of docs/model/locked: every run trains on the locked split's train side and chooses its checkpoint
# on its select side (mean per-source select AUC); none reads the test side. The same number of epochs for each
# (an epoch is as many draws as the run's training films), so runs compare side by side whatever else the
# machine was doing.
#   ./scripts/locked_trials.sh [EPOCHS] [RUN...]     runs: all no_covid loso_nih loso_kaggle
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-14}; shift || true
RUNS=${*:-all no_covid loso_nih loso_kaggle}
SPLIT=docs/model/locked/split.json
for r in $RUNS; do
  case $r in
    all) extra=() ;;
    no_covid) extra=(--leave-out covid) ;;
    loso_nih) extra=(--leave-out nih) ;;
    loso_kaggle) extra=(--leave-out kaggle --leave-out kaggle_site) ;;
    *) echo "unknown run $r" >&2; exit 2 ;;
  esac
  .venv/bin/cxr train --split $SPLIT "${extra[@]}" --no-flip --epochs "$EPOCHS" --out "runs/locked_$r"
done

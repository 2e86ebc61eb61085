#!/usr/bin/env bash
# Publish a model trained on the locked split (docs/model/locked): Platt scaling and the operating points on its
# select patients, the OOD and body-part checks on its train and select sides, then claims.json on its test
# patients (read once, last). Writes REPOSITORY/pneumonia and REPOSITORY/pneumonia_int8.
#   ./scripts/build_locked_model.sh RUN_DIR [REPOSITORY]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?run directory (cxr train --split ...)}
OUT=${2:-runs/locked_repository}
D=../shared/data
CXR=.venv/bin/cxr
SIDES=$RUN/sides
rm -rf "$SIDES" "$OUT" "$OUT.previous"  # (the steps after export write into its folders: --overwrite keeps copies)
# the card names the split it was built on: a committed copy (the locked split itself when the run left nothing out)
SPLIT=docs/model/locked/split.json
if ! cmp -s "$RUN/split.json" "$SPLIT"; then
  SPLIT=docs/model/locked/$(basename "$RUN")/split.json
  mkdir -p "$(dirname "$SPLIT")"; cp "$RUN/split.json" "$SPLIT"
fi
# Platt scaling on every source's select patients but Kaggle's own train folder (the deployment-site sample
# stands for the children; the adults are NIH and COVID)
.venv/bin/python scripts/split_side.py "$SPLIT" "$SIDES/select" --side select \
  --source kaggle_site --source nih --source covid
$CXR calibrate --model "$RUN/model.keras" --data "$SIDES/select" --rule youden
$CXR export --model "$RUN/model.keras" --data $D/chest_xray --repository "$OUT" --not-chest $D/not_chest_radiographs \
  --split "$SPLIT"
$CXR operating-points --repository "$OUT" --name pneumonia --also pneumonia_int8 --split "$SPLIT" \
  --point pediatric=kaggle_site:sensitivity:0.97 --point adult=nih:sensitivity:0.9 --overwrite
for m in pneumonia pneumonia_int8; do
  $CXR claims --repository "$OUT" --name $m --split "$SPLIT" \
    --population kaggle_site=pediatric --population nih=adult --population covid=adult --overwrite
done

#!/usr/bin/env bash
# Publish a model trained on the adult lock (docs/model/adult_lock: Kaggle, the Kaggle site sample, NIH, COVID and
# SIIM): Platt scaling and the operating points on its select patients (adult: sensitivity >= 0.90 on SIIM's and on
# NIH's select patients, each; pediatric: >= 0.97 on the Kaggle site's), the OOD and body-part checks on its train
# and select sides, then claims.json on its test patients (read once, last).
#   ./scripts/build_adult_model.sh RUN_DIR REPOSITORY NAME [--no-int8]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?run directory (cxr train --split docs/model/adult_lock/split.json ...)}
OUT=${2:?model repository to write into}
NAME=${3:?model folder name}
INT8=${4:-}
D=../shared/data
CXR=.venv/bin/cxr
SPLIT=docs/model/adult_lock/split.json
SIDES=$RUN/sides
cmp -s "$RUN/split.json" "$SPLIT" || { echo "$RUN was not trained on $SPLIT (or left a source out)" >&2; exit 2; }
rm -rf "$SIDES" "$OUT/$NAME" "$OUT/${NAME}_int8"  # (the steps after export write into its folder: --overwrite)
# Platt scaling on every source's select patients but Kaggle's own train folder (the deployment-site sample stands
# for the children; the adults are NIH, COVID and SIIM)
.venv/bin/python scripts/split_side.py "$SPLIT" "$SIDES/select" --side select \
  --source kaggle_site --source nih --source covid --source siim
$CXR calibrate --model "$RUN/model.keras" --data "$SIDES/select" --rule youden
$CXR export --model "$RUN/model.keras" --data $D/chest_xray --repository "$OUT" --name "$NAME" \
  --not-chest $D/not_chest_radiographs --split "$SPLIT" $INT8
ALSO=()
[ -z "$INT8" ] && [ -d "$OUT/${NAME}_int8" ] && ALSO=(--also "${NAME}_int8")
$CXR operating-points --repository "$OUT" --name "$NAME" "${ALSO[@]}" --split "$SPLIT" \
  --point pediatric=kaggle_site:sensitivity:0.97 --point adult=siim,nih:sensitivity:0.9 --overwrite
for m in "$NAME" "${ALSO[@]:1}"; do
  $CXR claims --repository "$OUT" --name "$m" --split "$SPLIT" \
    --population kaggle_site=pediatric --population nih=adult --population covid=adult --population siim=adult \
    --overwrite
done

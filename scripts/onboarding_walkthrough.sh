#!/usr/bin/env bash
# docs/onboarding.md's walk-through, rerunnable: a hospital (SIIM) meets a model that never saw it.
# The model in service is validation/model_repository/pneumonia_without_siim (`cxr train --leave-out siim` on the
# adult lock, built by scripts/build_adult_model.sh: no SIIM film in its provenance). The site's sample is 600 SIIM
# studies drawn at random (seed 33) from the SIIM train side of the lock (no SIIM film trained that model; the
# shipped models' SIIM test side is not touched). Writes everything under OUT (default runs/onboarding).
#   ./scripts/onboarding_walkthrough.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/onboarding}
CXR=.venv/bin/cxr
PY=.venv/bin/python
VREPO=validation/model_repository
BASE=pneumonia_without_siim
SAMPLE=$OUT/siim_sample
for f in "$OUT/adapt/attempts.jsonl" "$OUT/adapt2/attempts.jsonl"; do  # attempts are evidence: a rerun goes into a fresh folder
  if [ -e "$f" ]; then echo "$OUT already holds attempts ($f): give a fresh folder" >&2; exit 2; fi
done
# the site's own targets (steps 4 and 6), stated here before any attempt on the second sample
SITE_TARGETS=(sensitivity=0.80 specificity=0.20 roc_auc=0.70 flagged=0.02)
mkdir -p "$OUT"
[ -d "$SAMPLE" ] || $PY scripts/split_side.py docs/model/adult_lock/split.json "$SAMPLE" --side train --source siim \
  --patients 600 --seed 33
run() {  # the command, its exit code and its output, into OUT/log.md
  echo "\$ $*" | sed "s#$PWD/##g" >> "$OUT/log.md"
  set +e; "$@" > "$OUT/last.out" 2>&1; rc=$?; set -e
  tail -n 25 "$OUT/last.out" | sed 's/^/    /' >> "$OUT/log.md"
  echo "exit $rc" >> "$OUT/log.md"; echo >> "$OUT/log.md"
}
: > "$OUT/log.md"
# 1. plan
run $CXR site-audit --plan --model-repository $VREPO --model $BASE
# 2. audit the model in service at the adult point
run $CXR site-audit "$SAMPLE" --protocol embedded --url $VREPO --model $BASE --model-repository $VREPO \
  --operating-point adult --out "$OUT/audit"
# 3. adapt: the card's targets, then a second seed (the same audit patients; the report lists the first attempt)
run $CXR adapt "$SAMPLE" --model-repository $VREPO --model $BASE --out-repository "$OUT/R" --name pneumonia_siim \
  --population adult --report "$OUT/adapt"
if [ -f "$OUT/adapt/unpublished.onnx" ]; then cp "$OUT/adapt/unpublished.onnx" "$OUT/adapted_seed0.onnx"; fi
run $CXR adapt "$SAMPLE" --model-repository $VREPO --model $BASE --out-repository "$OUT/R" --name pneumonia_siim \
  --population adult --report "$OUT/adapt" --seed 1
# 4. the site states its own targets (a third attempt on the sample: the report and the published card list all three)
run $CXR adapt "$SAMPLE" --model-repository $VREPO --model $BASE --out-repository "$OUT/R" --name pneumonia_siim \
  --population adult --report "$OUT/adapt" --targets "${SITE_TARGETS[@]}"
# 5. both graphs on films of the hospital outside the sample (SIIM's select side of the lock: 601 films, no study of
#    the sample) and on the Kaggle site's select side (children: what the site model must not forget), by patient,
#    paired; the adapted graph is the first attempt's (published or not)
ADAPTED=$OUT/adapted_seed0.onnx
if [ -d "$OUT/R/pneumonia_siim" ]; then ADAPTED=$OUT/R/pneumonia_siim/1/model.onnx; fi
for src in siim kaggle_site; do
  S=$OUT/check_$src
  [ -d "$S" ] || $PY scripts/split_side.py docs/model/adult_lock/split.json "$S" --side select --source $src
  run $PY scripts/compare_graphs.py "$S" "$ADAPTED" $VREPO/$BASE/1/model.onnx --names adapted in_service \
    --out "$OUT/compare_$src.json"
done
# 6. a second sample of the same hospital (600 other studies of the SIIM train side, none of the first sample's), with
#    the site's targets of step 4 stated before any attempt on it (they are in this script, committed before the run)
SAMPLE2=$OUT/siim_sample2
[ -d "$SAMPLE2" ] || $PY scripts/split_side.py docs/model/adult_lock/split.json "$SAMPLE2" --side train --source siim \
  --patients 600 --seed 34 --exclude "$SAMPLE"
run $CXR adapt "$SAMPLE2" --model-repository $VREPO --model $BASE --out-repository "$OUT/R2" --name pneumonia_siim \
  --population adult --report "$OUT/adapt2" --targets "${SITE_TARGETS[@]}"
# 7. its graph (published or not), on the hospital's films outside both samples (the select side) and on the children,
#    against the model in service; if it was published, also at its own threshold there (its claims' bounds are the
#    audit part's; these films show whether they hold)
ADAPTED2=$OUT/adapt2/unpublished.onnx
if [ -d "$OUT/R2/pneumonia_siim" ]; then ADAPTED2=$OUT/R2/pneumonia_siim/1/model.onnx; fi
for src in siim kaggle_site; do
  run $PY scripts/compare_graphs.py "$OUT/check_$src" "$ADAPTED2" $VREPO/$BASE/1/model.onnx --names adapted in_service \
    --out "$OUT/compare2_$src.json"
  if [ -d "$OUT/R2/pneumonia_siim" ]; then
    run $CXR evaluate --model "$ADAPTED2" --data "$OUT/check_$src" --out "$OUT/check2_eval_$src"
  fi
done
echo "log: $OUT/log.md"

#!/usr/bin/env bash
# Publish a model trained on the adult lock (docs/model/adult_lock: Kaggle, the Kaggle site sample, NIH, COVID and
# SIIM): Platt scaling and the operating points on its select patients (adult: sensitivity >= 0.90 on SIIM's and on
# NIH's select patients, each; pediatric: >= 0.97 on the Kaggle site's), the OOD and body-part checks on its train
# and select sides, then claims.json on its test patients (read once, last).
# A run that left sources out (`cxr train --leave-out siim`, the onboarding model of docs/onboarding.md) is built
# on its own split (the lock less those sources): nothing of a left-out source calibrates, chooses a point or is
# claimed on, so its provenance lists none of its films.
# --no-claims stops before the test side is read: to compare on select first, or to measure claims in a folder
# whose earlier claims.json (and so its record of earlier test reads) is kept, with the `cxr claims` line this
# script prints.
#   ./scripts/build_adult_model.sh RUN_DIR REPOSITORY NAME [--no-int8] [--no-claims]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?run directory (cxr train --split docs/model/adult_lock/split.json ...)}
OUT=${2:?model repository to write into}
NAME=${3:?model folder name}
INT8=
CLAIMS=1
for opt in "${@:4}"; do
  case $opt in
    --no-int8) INT8=--no-int8;;
    --no-claims) CLAIMS=;;
    *) echo "unknown option $opt (--no-int8, --no-claims)" >&2; exit 2;;
  esac
done
D=../shared/data
CXR=.venv/bin/cxr
SPLIT=docs/model/adult_lock/split.json
SIDES=$RUN/sides
LEFT=$(.venv/bin/python -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1])).get("leave_out") or []))' \
  "$RUN/train_config.json")
if [ -n "$LEFT" ]; then
  # the run's split must be the lock less the left-out sources (cxr train wrote it so)
  .venv/bin/python - "$SPLIT" "$RUN/split.json" $LEFT <<'PY' || { echo "$RUN's split is not $SPLIT less: $LEFT" >&2; exit 2; }
import json, sys
lock, run, left = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), set(sys.argv[3:])
keep = lambda e: e.split("/", 1)[0] not in left
assert lock["seed"] == run["seed"], "seed"
for side in ("train", "val", "test"):
    assert [e for e in lock[side] if keep(e)] == run[side], side
PY
  SPLIT=$RUN/split.json
elif ! cmp -s "$RUN/split.json" "$SPLIT"; then
  echo "$RUN was not trained on $SPLIT" >&2; exit 2
fi
has() { case " $LEFT " in *" $1 "*) return 1;; *) return 0;; esac; }
SELECT=(); POPS=(); ADULT=()
for s in kaggle_site nih covid siim; do
  has $s || continue
  SELECT+=(--source $s)
  [ $s = kaggle_site ] && POPS+=(--population $s=pediatric) || POPS+=(--population $s=adult)
  case $s in nih|siim) ADULT+=($s);; esac
done
ADULT_SOURCES=$(IFS=,; echo "${ADULT[*]}")
rm -rf "$SIDES" "$OUT/$NAME" "$OUT/${NAME}_int8"  # (the steps after export write into its folder: --overwrite)
# Platt scaling on every source's select patients but Kaggle's own train folder (the deployment-site sample stands
# for the children; the adults are NIH, COVID and SIIM)
.venv/bin/python scripts/split_side.py "$SPLIT" "$SIDES/select" --side select \
  "${SELECT[@]}"
$CXR calibrate --model "$RUN/model.keras" --data "$SIDES/select" --rule youden
$CXR export --model "$RUN/model.keras" --data $D/chest_xray --repository "$OUT" --name "$NAME" \
  --not-chest $D/not_chest_radiographs --split "$SPLIT" $INT8
ALSO=()
[ -z "$INT8" ] && [ -d "$OUT/${NAME}_int8" ] && ALSO=(--also "${NAME}_int8")
$CXR operating-points --repository "$OUT" --name "$NAME" "${ALSO[@]}" --split "$SPLIT" \
  --point pediatric=kaggle_site:sensitivity:0.97 --point adult=$ADULT_SOURCES:sensitivity:0.9 --overwrite
for m in "$NAME" "${ALSO[@]:1}"; do
  if [ -z "$CLAIMS" ]; then
    echo "not read (--no-claims): $CXR claims --repository $OUT --name $m --split $SPLIT ${POPS[*]} --overwrite"
    continue
  fi
  $CXR claims --repository "$OUT" --name "$m" --split "$SPLIT" \
    "${POPS[@]}" \
    --overwrite
done

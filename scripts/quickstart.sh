#!/usr/bin/env bash
# The main job on a fresh machine: install the serving + client extras, start the embedded CPU Triton
# with the shipped model, classify X-rays over gRPC and HTTP, stop the server.
#   ./scripts/quickstart.sh [IMAGES_OR_FOLDERS...]
# Without arguments it classifies ../shared/data/chest_xray_fullres when present, else the films in examples/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/cxr" ] || ! "$VENV/bin/python" -c "import pytriton, onnxruntime, tritonclient.grpc" 2>/dev/null; then
  echo "== installing into $VENV (serving + client extras; no TensorFlow)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[serve,client]'
fi
CXR="$VENV/bin/cxr"

inputs=("$@")
if [ ${#inputs[@]} -eq 0 ]; then
  if [ -d ../shared/data/chest_xray_fullres ]; then
    inputs=(../shared/data/chest_xray_fullres)
  else
    # No ../shared: the shipped example films (examples/README.md): Normal and Pneumonia films from two hospitals,
    # a chest DICOM, and an image that is not a chest X-ray (refused as not assessable).
    echo "== no ../shared data: classifying the example films in examples/ (pass your own files as arguments)"
    inputs=(examples)
  fi
fi

HTTP_PORT=${HTTP_PORT:-8000}; GRPC_PORT=${GRPC_PORT:-8001}; METRICS_PORT=${METRICS_PORT:-8002}
mkdir -p out
echo "== starting the embedded Triton (model_repository/, config 'cpu') on 127.0.0.1"
"$CXR" serve --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" > out/triton.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  if grep -q "Triton ready" out/triton.log 2>/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then cat out/triton.log; exit 1; fi
  sleep 0.5
done
grep -q "Triton ready" out/triton.log || { echo "Triton did not become ready"; cat out/triton.log; exit 1; }
sed -n '/Triton ready/,/metrics/p' out/triton.log

echo "== cxr health (gRPC)"
"$CXR" health --url "127.0.0.1:$GRPC_PORT"
echo "== cxr predict over gRPC"
"$CXR" predict "${inputs[@]}" --url "127.0.0.1:$GRPC_PORT" --protocol grpc || true
echo "== cxr predict over HTTP, CSV written to out/predictions.csv"
rm -f out/predictions.csv
"$CXR" predict "${inputs[@]}" --url "127.0.0.1:$HTTP_PORT" --protocol http --format csv --out out/predictions.csv || true
head -5 out/predictions.csv
echo "== done; stopping Triton"

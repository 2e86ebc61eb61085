#!/usr/bin/env bash
# The test command: install every extra into .venv, then run the whole suite (slow tests included).
#   ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[all]'
"$VENV/bin/python" -m pip check
export TF_CPP_MIN_LOG_LEVEL=2
exec "$VENV/bin/python" -m pytest "$@"

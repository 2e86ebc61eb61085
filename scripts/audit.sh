#!/usr/bin/env bash
# Dependency audit of the installed environment (needs PyPI's vulnerability JSON API, i.e. internet access).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -m pip install -q pip-audit
"$VENV/bin/pip-audit" --progress-spinner off --strict "$@"

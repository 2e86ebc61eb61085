#!/usr/bin/env bash
# The test command: install every extra (all, and the development tools: dev) into .venv, then run the whole suite (slow tests included).
#   ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[all,dev]'
"$VENV/bin/python" -m pip check
# Real parts the tests start: Debian's Chromium (the UI test drives it with Playwright; Playwright's own browser
# download is not used), nginx (the TLS-terminating proxy test) and Orthanc (the PACS of the cxr listen tests).
# Their packages may start system services on install; the tests run their own instances on loopback ports.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
# Orthanc's DICOMweb plugin (the QIDO/WADO/STOW tests) and Node.js (the FHIR server the FHIR tests POST to)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
# promtool (Debian's prometheus package) runs the alert rules' unit tests (tests/test_alerts.py)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    # policy-rc.d 101: the packages' own services (nginx on :80, Orthanc on :8042/:4242, Prometheus on :9090) are
    # never started
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_added=1; fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
  else
    echo "warning: ${need[*]} not installed and not root; their tests will fail (apt-get install ${need[*]})" >&2
  fi
fi
# The FHIR server of the tests: Medplum's FHIR router and validator from npm (tests/fhir_server, pinned by its lock)
if [ ! -d tests/fhir_server/node_modules/@medplum/fhir-router ]; then
  npm ci --prefix tests/fhir_server --no-audit --no-fund --silent
fi
export TF_CPP_MIN_LOG_LEVEL=2
# Folders are layers: the import-linter contracts of pyproject.toml (lint-imports) and no import cycle (grimp).
"$VENV/bin/python" scripts/check_imports.py
# The documentation builds with no warning (broken links, missing pages), into the ignored out/site.
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --quiet
# Everything (slow tests and static checks included) on this interpreter.
rc=0
"$VENV/bin/python" -m pytest "$@" || rc=$?
# The unit tests (not slow, no static checks) on the supported floor and the newest supported Python, each in its
# own venv, when the whole suite was asked for (no test named): requires-python says 3.10, and numpy<2 (the
# Triton Python backend) caps it at 3.12. A missing interpreter fails the run: nothing is skipped silently.
whole=1
for arg in "$@"; do case $arg in -*) ;; *) whole=0 ;; esac; done
if [ "$whole" = 1 ] && [ "${CXR_TEST_MATRIX:-1}" != 0 ]; then
  for v in 3.10 3.12; do
    py=$(command -v "python$v" || true)  # on PATH, else an interpreter pyenv installed (its shims need activating)
    if [ -z "$py" ] || ! "$py" -c 'import sys' 2>/dev/null; then
      py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1)
    fi
    if [ -z "$py" ] || ! "$py" -c 'import sys' 2>/dev/null; then
      echo "test.sh: python$v not found: the unit tests cannot run on it (install it, or CXR_TEST_MATRIX=0)" >&2
      rc=1; continue
    fi
    mv="$VENV-py$v"
    [ -x "$mv/bin/python" ] || "$py" -m venv "$mv"
    "$mv/bin/python" -m pip install -q --upgrade pip
    "$mv/bin/python" -m pip install -q -e '.[all,dev]'
    echo "== unit tests on Python $v =="
    "$mv/bin/python" -m pytest -m "not slow and not lint" -p no:cacheprovider "$@" || rc=1
  done
fi
exit $rc

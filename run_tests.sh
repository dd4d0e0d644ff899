#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=${PYTHON:-python3}
$PY -m pytest -q tests "$@"

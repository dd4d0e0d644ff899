#!/usr/bin/env bash
# Sets up a fresh machine, then generates the synthetic demo data and runs the bundle on it:
# train briefly, evaluate, infer; prints where every output is.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=${PYTHON:-python3}
$PY -m scripts.demo "$@"

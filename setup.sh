#!/usr/bin/env bash
# Installs everything the bundle and its tests need into the current Python (a venv is fine).
# torch comes first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check torch==2.13.0
$PY -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

#!/usr/bin/env bash
# Create .venv and install prefkit with its test extras. Idempotent: a second run is quick.
# torch is installed first, pinned to the CPU build that lies on this machine's disk
# (an unpinned torch would pull a multi-GB CUDA build); set PREFKIT_TORCH to choose another,
# e.g. PREFKIT_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet --disable-pip-version-check ${PREFKIT_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

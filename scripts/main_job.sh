#!/usr/bin/env bash
# The main job: install prefkit into .venv if it is not there yet, then run the `main` experiment
# (conf/experiment/main.yaml) on the embedded task, CPU, offline, into outputs/main (RUN=... to change).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prefkit ] || bash scripts/install.sh
exec .venv/bin/prefkit run experiment=main "run.name=${RUN:-main}" "$@"

#!/usr/bin/env bash
# The main job: the whole embedded pipeline on a CPU, offline, into outputs/$RUN (default: main).
#   sft -> sample N=2 -> judge label -> reward (DRDO oracle) -> align sweeps (dpo, exo, tdpo2, edpo
#   over three β; drdo over three α) -> sample -> judge -> frontier
# Every stage is an ordinary prefkit command; rerunning skips what is complete. Wall time per
# stage goes to outputs/$RUN/timings.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prefkit ] || bash scripts/install.sh
RUN=${RUN:-main}
PK=.venv/bin/prefkit
mkdir -p "outputs/$RUN"
TIMINGS="outputs/$RUN/timings.tsv"
: > "$TIMINGS"
start=$(date +%s)

stage() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name: prefkit $* run.name=$RUN"
  "$PK" "$@" "run.name=$RUN"
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$TIMINGS"
}

stage sft            sft
stage sample_pool    sample job=pairs 'sample.policies=[sft]' sample.split=train sample.n=2
stage label          judge job=label judge.task=label judge.samples=pairs
stage reward         reward dataset=labeled reward.kind=drdo_oracle
stage align_beta     align -m dataset=labeled objective=dpo,exo,tdpo2,edpo objective.beta=0.1,0.3,1.0
stage align_drdo     align -m dataset=labeled objective=drdo objective.alpha=0.1,0.5,1.0 rewards.source=model
stage sample_eval    sample job=eval sample.n=4 sample.n_reference=64
stage judge          judge job=eval judge.samples=eval
stage frontier       frontier job=frontier

printf 'total\t%s\n' "$(( $(date +%s) - start ))" >> "$TIMINGS"
echo "== wall time per stage (s):"; column -t "$TIMINGS"
echo "== frontier plot: outputs/$RUN/frontier/frontier/frontier.png"

#!/usr/bin/env bash
# EXO §4.2: TL;DR summarisation with Pythia-2.8B. SFT on the human summaries, a reward model on the
# summarize_from_feedback comparisons, EXO-pref vs DPO-pref on the comparisons (β_π = 0.5, ε = 1e-3,
# τ = 0.8, Adam lr 1e-6, batch 64); win rates judged by the reward model against the SFT samples and
# against the chosen summaries (512 test prompts, 4 samples, τ = 0.8, ≤ 75 new tokens). GPT-4 win rates:
# judge.winrate.judge=llm judge_template=tldr with PREFKIT_JUDGE_* set (100 prompts, both orders).
set -euo pipefail
RUN=${RUN:-exo-tldr}; EXTRA=${EXTRA:-}
COMMON="run.name=$RUN model=pythia2.8b dataset=tldr hardware=gpu $EXTRA"
TRAIN="train.lr=1e-6 train.betas=[0.9,0.95] train.scheduler=cosine train.warmup_steps=0 train.batch_size=64 train.epochs=1"
prefkit sft $COMMON train.lr=1e-5 train.epochs=1 train.max_steps=null train.batch_size=128
prefkit reward $COMMON train.lr=1e-5 train.epochs=1 train.batch_size=128
prefkit align $COMMON $TRAIN objective=exo objective.beta=0.5 objective.temperature=0.8 objective.label_smoothing=1e-3
prefkit align $COMMON $TRAIN objective=dpo objective.beta=0.5
prefkit sample $COMMON job=eval sample.n=4 sample.temperature=0.8 sample.max_new_tokens=75 sample.max_prompts=512
prefkit judge $COMMON job=vs-sft judge.task=winrate judge.samples=eval judge.scorer=reward_model \
  judge.winrate.baseline=sft judge.winrate.pairs=all
prefkit judge $COMMON job=vs-chosen judge.task=winrate judge.samples=eval judge.scorer=reward_model \
  judge.winrate.baseline=dataset judge.winrate.pairs=all
cat <<'NUMBERS'
EXO Table 1 (TL;DR), RM win rate vs SFT / vs chosen (%): DPO_pref 68.3 / 23.7, EXO_pref 92.5 / 60.1;
GPT-4 vs SFT / vs chosen: DPO_pref 57.0 / 30.5, EXO_pref 83.0 / 55.0.
NUMBERS

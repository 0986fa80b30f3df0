#!/usr/bin/env bash
# TDPO §5.2: Anthropic HH with Pythia-2.8B; SFT on chosen, then DPO / TDPO1 / TDPO2 (α 0.5, β 0.1),
# RMSprop lr 5e-6, warmup 150, batch 64. Alignment accuracy = held-out implicit-reward accuracy
# (eval_rewards/accuracies; TDPO's own reward β(h + SeqKL) is logged as tdpo/rewards_*).
set -euo pipefail
RUN=${RUN:-tdpo-hh}; EXTRA=${EXTRA:-}
COMMON="run.name=$RUN model=pythia2.8b dataset=hh dataset.on_bad_row=skip hardware=gpu $EXTRA"
prefkit sft $COMMON train.lr=5e-6 train.epochs=1 train.max_steps=null train.batch_size=64
prefkit align -m $COMMON objective=dpo,tdpo1,tdpo2 train.optimizer=rmsprop train.lr=5e-6 train.warmup_steps=150 \
  train.scheduler=constant train.batch_size=64 train.epochs=1
prefkit sample $COMMON job=eval sample.n=25 sample.top_p=0.95 sample.max_new_tokens=256 sample.max_prompts=512
cat <<'NUMBERS'
TDPO Table 1 (HH): accuracy % / entropy — f-DPO(FKL) 54.71 / 4.708, DPO 59.43 / 3.196,
TDPO1 60.08 / 4.727, TDPO2 67.33 / 4.915. Entropy: judge summaries report entropy_per_token.
NUMBERS

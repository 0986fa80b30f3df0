#!/usr/bin/env bash
# DRDO (Nath et al. 2024) §3.1: TL;DR with Phi-3-mini. SFT on the human summaries; the oracle: Phi-3
# with a reward head trained with (1−α)·BT + α·NLL(y_w), α 0.01, lr 1e-5, one epoch; DRDO α 0.1, γ 2,
# lr 5e-6, cosine, weight decay 0.05, effective batch 64, 1000 steps; baselines DPO (β 0.1) and e-DPO
# (an ensemble of 3 reward models). Out-of-distribution test: CNN/DM articles (dataset.site=news).
set -euo pipefail
RUN=${RUN:-drdo-tldr}; EXTRA=${EXTRA:-}
COMMON="run.name=$RUN model=phi3-mini dataset=tldr dataset.null_confidence=drop hardware=gpu $EXTRA"
TRAIN="train.lr=5e-6 train.scheduler=cosine train.warmup_steps=100 train.weight_decay=0.05 train.batch_size=64 train.max_steps=1000"
prefkit sft $COMMON train.lr=1e-5 train.epochs=1 train.max_steps=null train.warmup_steps=100
prefkit reward $COMMON job=oracle reward.kind=drdo_oracle reward.sft_weight=0.01 train.lr=1e-5 train.epochs=1
prefkit align $COMMON $TRAIN objective=drdo objective.alpha=0.1 objective.gamma=2 rewards.source=model rewards.job=oracle
prefkit align $COMMON $TRAIN objective=dpo objective.beta=0.1
prefkit sample $COMMON job=ood dataset.site=news sample.n=1 sample.top_p=0.8 sample.temperature=0.7 \
  sample.max_new_tokens=256 sample.max_prompts=1000
prefkit judge $COMMON job=oracle-winrate judge.task=winrate judge.samples=ood judge.scorer=reward_model \
  judge.reward_job=oracle dataset.site=news
cat <<'NUMBERS'
DRDO Table 1 (GPT-4o judge, CNN/DM, 1,000 prompts): DRDO vs DPO 80.78% (D_all), DRDO vs e-DPO 78.27%;
Gold vs DRDO 52.82%, vs DPO 58.54%. Table 2 (oracle judge): Phi-3 student vs DPO 0.80–0.88 across T.
NUMBERS

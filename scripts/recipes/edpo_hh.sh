#!/usr/bin/env bash
# ε-DPO (Lee et al. 2025) §3.2: Anthropic HH. SFT on the chosen responses, then DPO, ε-DPO (ε 0.01),
# TR-DPOτ (τ 128) and TR-DPOα (α 0.6) at β ∈ {0.01, 0.05, 0.1, 0.5}; AdamW lr 1e-6, cosine, batch 128,
# one epoch. The paper's SFT base is google/gemma-2-2b with the gemma-2-2b-it template and judges with
# PairRM against the chosen responses; here Pythia-2.8B and a reward-model (or LLM) judge stand in.
set -euo pipefail
RUN=${RUN:-edpo-hh}; EXTRA=${EXTRA:-}
COMMON="run.name=$RUN model=pythia2.8b dataset=hh dataset.on_bad_row=skip hardware=gpu $EXTRA"
TRAIN="train.lr=1e-6 train.scheduler=cosine train.warmup_steps=30 train.batch_size=128 train.epochs=1"
prefkit sft $COMMON train.lr=2e-5 train.epochs=1 train.max_steps=null train.batch_size=128
prefkit reward $COMMON train.lr=1e-5 train.epochs=1
prefkit align -m $COMMON $TRAIN objective=dpo,edpo objective.beta=0.01,0.05,0.1,0.5
prefkit align -m $COMMON $TRAIN objective=tr_dpo objective.update=hard objective.sync_steps=128 objective.beta=0.01,0.05,0.1,0.5
prefkit align -m $COMMON $TRAIN objective=tr_dpo objective.update=soft objective.alpha=0.6 objective.beta=0.01,0.05,0.1,0.5
prefkit sample $COMMON job=eval sample.n=1 sample.max_new_tokens=1024 sample.max_prompts=512
prefkit judge $COMMON job=vs-chosen judge.task=winrate judge.samples=eval judge.scorer=reward_model judge.winrate.baseline=dataset
prefkit judge $COMMON job=eval judge.samples=eval judge.scorer=reward_model
prefkit frontier run.name=$RUN job=frontier
cat <<'NUMBERS'
ε-DPO Fig. 5 (qualitative): TR-DPO reaches larger KL without matching ε-DPO's win rate at the same KL;
ε-DPO's best win rate is above DPO's best.
NUMBERS

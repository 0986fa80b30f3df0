#!/usr/bin/env bash
# ε-DPO §3.1, the SimPO "Instruct" setting: Llama-3-8B-Instruct as policy and reference (no SFT),
# princeton-nlp/llama3-ultrafeedback (PairRM-labelled on-policy pairs), β 0.01, ε 0.01, AdamW lr 7e-7,
# cosine with 10% warmup, batch 128, one epoch, bf16. 8 GPUs with FSDP, or LoRA on one GPU.
set -euo pipefail
RUN=${RUN:-edpo-uf}; EXTRA=${EXTRA:-}
COMMON="run.name=$RUN model=llama3-8b-instruct dataset=ultrafeedback dataset.path=princeton-nlp/llama3-ultrafeedback \
  dataset.splits.train=train dataset.splits.eval=test $EXTRA"
accelerate launch --multi_gpu --num_processes ${GPUS:-8} -m prefkit.cli align $COMMON policy.init=base hardware=fsdp objective=edpo \
  objective.beta=0.01 objective.epsilon=0.01 train.lr=7e-7 train.scheduler=cosine train.warmup_steps=47 \
  train.batch_size=128 train.epochs=1 train.max_grad_norm=1.0
accelerate launch --multi_gpu --num_processes ${GPUS:-8} -m prefkit.cli align $COMMON policy.init=base hardware=fsdp objective=dpo job=dpo \
  objective.beta=0.01 train.lr=7e-7 train.scheduler=cosine train.warmup_steps=47 train.batch_size=128 train.epochs=1
prefkit sample $COMMON job=eval sample.n=1 sample.temperature=0.9 sample.max_new_tokens=4096 hardware=gpu
# AlpacaEval 2 needs its own harness; a pairwise LLM judge against DPO is built in:
prefkit judge $COMMON job=vs-dpo judge.task=winrate judge.samples=eval judge.winrate.judge=llm judge_template=hh \
  judge.winrate.baseline=align/dpo
cat <<'NUMBERS'
ε-DPO Table 1 (Llama-3-Instruct): AlpacaEval 2 LC / WR 46.4 / 44.9, Arena-Hard 36.7 (DPO: 40.3 / 37.9, 32.6;
SFT: 26.0 / 25.3, 22.3). Mistral-Instruct: LC / WR 35.6 / 29.6, Arena-Hard 17.2.
NUMBERS

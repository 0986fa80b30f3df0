#!/usr/bin/env bash
# TDPO (Zeng et al. 2024) §5.1: controlled sentiment generation on IMDB with GPT-2 Large.
# Reward: siebert/sentiment-roberta-large-english, P(POSITIVE). Policy frontier traced by checkpoints
# every 100 steps at fixed β = 0.1 (not a β sweep). App. B: RMSprop, lr 5e-6, 150 warmup steps then
# constant, batch 64. The paper does not give IMDB prefix lengths or generation settings; prefkit
# samples untruncated (T = 1, top-k off) so that the exact token KL is the sequence KL.
set -euo pipefail
RUN=${RUN:-tdpo-imdb}; EXTRA=${EXTRA:-}
PK="prefkit"; COMMON="run.name=$RUN model=gpt2-large dataset=imdb hardware=gpu $EXTRA"
CLS="judge.scorer=classifier judge.classifier.path=siebert/sentiment-roberta-large-english judge.classifier.label=POSITIVE"
$PK sft $COMMON train.lr=1e-5 train.epochs=1 train.max_steps=null train.batch_size=64
$PK sample $COMMON job=pool 'sample.policies=[sft]' sample.split=train sample.n=2 sample.max_new_tokens=60
$PK judge $COMMON job=label judge.task=label judge.samples=pool $CLS judge.classifier.output=logodds
TRAIN="train.optimizer=rmsprop train.lr=5e-6 train.warmup_steps=150 train.scheduler=constant train.batch_size=64 \
  train.epochs=1 train.save_every=100 train.keep_checkpoints=1000 train.keep_checkpoints_after_training=true"
$PK align -m $COMMON dataset=labeled dataset.max_length=512 $TRAIN objective=dpo,tdpo1 objective.beta=0.1
$PK align -m $COMMON dataset=labeled dataset.max_length=512 $TRAIN objective=tdpo2 objective.beta=0.1 \
  objective.alpha=0.1,0.3,0.5,0.7
$PK sample $COMMON job=eval sample.checkpoints=true sample.n=4 sample.n_reference=64 sample.max_new_tokens=60
$PK judge $COMMON job=eval judge.samples=eval $CLS judge.classifier.output=prob
$PK frontier run.name=$RUN job=frontier
cat <<'NUMBERS'
TDPO Fig. 3(a), reward P(positive) at KL ≈ 2.5 (eyeballed): TDPO2 α=0.7 ≈ 0.97, α=0.5 ≈ 0.96,
α=0.3 and TDPO1 ≈ 0.92–0.93, α=0.1 ≈ 0.90, DPO ≈ 0.88; DPO reaches ≈ 0.95 only near KL 5–6.
Fig. 3(b–d): sequential KL on chosen/rejected (prefkit logs kl/chosen, kl/rejected, kl/margin).
NUMBERS

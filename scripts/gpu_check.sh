#!/usr/bin/env bash
# One prepared check of prefkit on one CUDA GPU, offline, in at most 8 minutes of wall time (each step
# has its own limit):
#
#   bash scripts/gpu_check.sh [WHEELS_DIR]
#
# Expects torch (a CUDA build), transformers, accelerate and peft preinstalled. prefkit's other
# needs are installed from wheels in WHEELS_DIR (default: ./wheels) with --no-index, so nothing is
# downloaded; make them on a machine with internet:
#   pip download --no-deps -d wheels hydra-core omegaconf antlr4-python3-runtime datasets typer rich \
#       wandb matplotlib scipy jinja2 safetensors tokenizers trl==1.16.0 pytest
# (skip what the GPU machine already has). Every step prints its own RATIOS: line; the step's exit
# status is printed after it, and a failed step does not stop the others.
set -u
cd "$(dirname "$0")/.."
WHEELS="${1:-wheels}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"

step() {  # step <seconds> <what> <command...>
  local limit="$1" what="$2"; shift 2
  echo "=== $what"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $what: exit $? after $((SECONDS - t0)) s"
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
if [ -d "$WHEELS" ]; then
  step 30 "install from $WHEELS" "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps -e .
else
  echo "no $WHEELS directory: assuming prefkit's dependencies are installed"
fi

# the CPU suite's model-independent parts on this machine (objectives, token statistics, TRL parity)
step 45 "unit tests" "$PY" -m pytest -q -m "not slow" tests/test_objectives.py tests/test_tokenstats.py \
  tests/test_trl_losses.py tests/test_modifiers.py tests/test_unpaired.py tests/test_precision.py
# the GPU tests: bf16/fp16 training, sdpa/flash attention, gradient checkpointing, QLoRA, a 410m-shaped align
step 75 "gpu tests" "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py -k "not pythia_410m"
step 75 "gpu test: pythia-410m-shaped align" "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py -k pythia_410m
# s/step, tokens/s, peak memory and MFU of DPO against TRL at Pythia-410m and -1.4b shapes, bf16 mixed precision
step 150 "bench_align 410m, 1.4b bf16" "$PY" scripts/bench_align.py --device cuda --dtype bf16 --threads 8 \
  --sizes 410m,1.4b --seq-len 512 --prompt-len 128
# peak memory of a TDPO2 / e-DPO step against the official code's
step 45 "bench_tdpo_memory" "$PY" scripts/bench_tdpo_memory.py --device cuda
# batched sampling with per-sample statistics against one-prompt-at-a-time generate
step 50 "bench_sample 410m" "$PY" scripts/bench_sample.py --device cuda --dtype bf16 --threads 8 --sizes 410m \
  --no-vllm

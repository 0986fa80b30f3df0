"""Scale-out paths that can run on a CPU: two processes with gloo (DDP), the refusal of FSDP there, and LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import TEST_CONF, TINY_ALIGN, prefkit
from omegaconf import OmegaConf
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # the CLI end to end

STEPS = "train.max_steps=4"


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(sft_run):
    # one process: global batch 16 = micro-batch 8 × 2 accumulation steps
    prefkit("align", "run.name=shared", "job=one", *TINY_ALIGN, STEPS, cwd=sft_run)
    # two processes (gloo): global batch 16 = micro-batch 8 × 2 processes; same examples per micro-batch
    env = {**os.environ, "PREFKIT_CONFIG_PATH": str(TEST_CONF), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "prefkit.cli", "align", "run.name=shared", "job=two", "hardware.distributed=ddp", *TINY_ALIGN, STEPS]
    proc = subprocess.run(cmd, cwd=sft_run, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((sft_run / "outputs/shared/align/two/plan.json").read_text())
    assert plan["world_size"] == 2 and plan["accumulation"] == 1
    one = load_file(sft_run / "outputs/shared/align/one/model/model.safetensors")
    two = load_file(sft_run / "outputs/shared/align/two/model/model.safetensors")
    start = load_file(sft_run / "outputs/shared/sft/" / _sft_job(sft_run) / "model/model.safetensors")
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-4  # training changed the weights...
    assert diff < 1e-5, diff  # ...identically, up to the order of floating-point sums


def _launch(cwd, *args: str, check: bool = True) -> str:
    env = {**os.environ, "PREFKIT_CONFIG_PATH": str(TEST_CONF), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
           "-m", "prefkit.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_processes_match_one_with_an_online_and_a_moving_reference_and_resume(sft_run):
    """Two CPU processes (DDP, gloo) against one with the same global batch: TDPO2 (the reference run
    online on every micro-batch) and TR-DPO (the reference moved toward the policy every 2 steps) end
    at the same weights; TR-DPO killed after its step-3 checkpoint and rerun ends where it ended
    straight through."""
    common = ["run.name=shared", *TINY_ALIGN, STEPS]
    _launch(sft_run, "align", *common, "hardware.distributed=ddp", "job=ddp_tdpo2", "objective=tdpo2")
    tr_dpo = [*common, "hardware.distributed=ddp", "job=ddp_tr", "objective=tr_dpo", "objective.sync_steps=2",
              "train.keep_checkpoints_after_training=true"]
    _launch(sft_run, "align", *tr_dpo)
    prefkit("align", *common, "job=single_tdpo2", "objective=tdpo2", cwd=sft_run)
    prefkit("align", *common, "job=single_tr", "objective=tr_dpo", "objective.sync_steps=2", cwd=sft_run)
    align = sft_run / "outputs/shared/align"
    start = load_file(sft_run / "outputs/shared/sft/" / _sft_job(sft_run) / "model/model.safetensors")
    for two, one in (("ddp_tdpo2", "single_tdpo2"), ("ddp_tr", "single_tr")):
        assert json.loads((align / two / "plan.json").read_text())["world_size"] == 2, two
        a, b = load_file(align / one / "model/model.safetensors"), load_file(align / two / "model/model.safetensors")
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4, two
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, two
    logged = [json.loads(line) for line in (align / "ddp_tr/metrics.jsonl").read_text().splitlines()]
    assert any(row.get("tr_dpo/reference_updates") for row in logged)

    # the job as a kill after its step-3 checkpoint leaves it (no final model, not complete), rerun
    job = align / "ddp_tr"
    straight = load_file(job / "model/model.safetensors")
    shutil.rmtree(job / "model")
    for name in ("lineage.json", "summary.json", "plan.json"):
        (job / name).unlink()
    assert [p.name for p in (job / "checkpoints").iterdir()] == ["step-3"]
    assert "resumed from" in _launch(sft_run, "align", *tr_dpo)
    resumed = load_file(job / "model/model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


def test_fsdp_on_cpu_processes_stops_with_one_line(sft_run):
    """accelerate applies FSDP (and DeepSpeed) only on GPU-class devices: on CPU processes it would run
    plain data parallel under the name. prefkit refuses before any job directory exists."""
    out = _launch(sft_run, "align", "run.name=shared", *TINY_ALIGN, STEPS, "hardware=fsdp", "hardware.device=cpu",
                  "hardware.precision=fp32", "job=fsdp_cpu", check=False)
    assert "hardware.distributed=fsdp did not take effect (accelerate runs this as MULTI_CPU)" in out
    assert not (sft_run / "outputs/shared/align/fsdp_cpu").exists()


def _sft_job(root) -> str:
    return next(p.name for p in (root / "outputs/shared/sft").iterdir() if p.is_dir())


def test_lora_align_uses_the_adapter_free_model_as_reference(sft_run):
    pytest.importorskip("peft")
    prefkit("align", "run.name=shared", "job=lora", "peft=lora", "objective=tdpo2", *TINY_ALIGN, STEPS,
            "train.lr=1e-2", cwd=sft_run)
    job = sft_run / "outputs/shared/align/lora"
    assert (job / "model/adapter/adapter_config.json").exists()
    merged = load_file(job / "model/model.safetensors")
    start = load_file(sft_run / "outputs/shared/sft/" / _sft_job(sft_run) / "model/model.safetensors")
    assert set(merged) == set(start)  # a plain model directory: the adapter is merged in
    assert max((merged[k] - start[k]).abs().max().item() for k in merged) > 1e-5
    metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert any("kl/chosen" in m for m in metrics)


def test_the_lora_reference_is_the_policy_with_its_adapter_off(sft_run, tmp_path):
    """align's reference for a LoRA policy gives the SFT model's numbers, not the adapted policy's,
    and holds no second copy of the weights."""
    pytest.importorskip("peft")
    import torch

    from prefkit import reference
    from prefkit.data import collate, encode
    from prefkit.models import load_causal_lm, load_model, load_tokenizer
    from prefkit.modules import final_hidden, reference_hidden
    from prefkit.objectives import build
    from prefkit.tokenstats import response_positions

    init = str(sft_run / "outputs/shared/sft" / _sft_job(sft_run) / "model")
    peft_cfg = OmegaConf.create({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    model_cfg = OmegaConf.create({"dtype": "float32", "reference_dtype": "float32"})
    lm = load_model(model_cfg, init, "policy", peft_cfg)
    with torch.no_grad():  # a trained adapter
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    cfg = OmegaConf.create({"reference": {"cache": "false"}, "model": model_cfg, "hardware": {"micro_batch_size": 4}})
    objective = build({"name": "tdpo2"})[0]
    setup = reference.Setup(cfg, objective.needs, "tdpo2", _OneCPU(), lm, init, {}, tmp_path, 0, None)
    ref = reference.choose(setup)
    assert isinstance(ref, reference.AdapterOff) and ref.module is None
    tok = load_tokenizer(init)
    batch = collate([encode(tok, "the movie", " was great", max_length=16, max_prompt_length=8)], tok.pad_token_id)
    got, _ = ref.for_batch(batch, "train", [0])
    rows, cols, _ = response_positions(batch["labels"])
    sft = load_causal_lm(init)
    want = reference_hidden(sft, **batch)
    torch.testing.assert_close(got.hidden, want.hidden)
    torch.testing.assert_close(got.head.weight, want.head.weight)
    adapted = final_hidden(lm, batch["input_ids"], batch["attention_mask"])[rows, cols]
    assert (adapted - want.hidden).abs().max() > 1e-3  # the policy itself has moved away


class _OneCPU:
    device, num_processes, distributed_type = __import__("torch").device("cpu"), 1, "NO"

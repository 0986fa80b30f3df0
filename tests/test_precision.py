"""bf16 on CPU: `hardware.precision=bf16` (accelerate's autocast over float32 master weights) for
sft and align, with the token statistics kept where the README says: log-softmax and token KLs in
float32 (the LM head's bf16 logits are upcast chunk by chunk), sequence sums in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TEST_CONF, TINY, TINY_ALIGN

from prefkit import api
from prefkit.modules import StatsLM
from prefkit.tokenstats import Head, Reference, TokenRequest, token_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64))


def test_token_statistics_stay_float32_and_sums_float64_under_bf16_autocast():
    policy, reference = tiny_lm(), tiny_lm()
    ids = torch.randint(0, 97, (4, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    model = StatsLM(policy)
    req = TokenRequest(kl=True, entropy=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = policy.gpt_neox(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_hidden = reference.gpt_neox(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.nn.functional.linear(hidden, Head.of(policy).weight).dtype == torch.bfloat16  # logits are bf16
        ref = Reference(hidden=ref_hidden[:, 5:-1].reshape(-1, 32), head=Head.of(reference))
        per_token = token_stats(hidden[:, 5:-1].reshape(-1, 32), ids[:, 6:].reshape(-1), Head.of(policy),
                                reference=ref, req=req)
        stats, _ = model(ids, mask, labels, req=TokenRequest(entropy=True))
    for key in ("logps", "kl", "entropy"):
        assert per_token[key].dtype == torch.float32, key
    assert stats.logps.dtype == torch.float64 and stats.entropy.dtype == torch.float64
    assert stats.logps.requires_grad
    full, _ = model(ids, mask, labels)  # float32 throughout: bf16 differs by bf16's rounding, no more
    assert torch.allclose(stats.logps, full.logps, rtol=0.02, atol=0.2)


@pytest.mark.slow
def test_sft_and_align_train_in_bf16_on_cpu(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(sft_run)
    monkeypatch.setenv("PREFKIT_CONFIG_PATH", str(TEST_CONF))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sft = api.sft(["run.name=bf16", *TINY, "train.max_steps=2", "train.batch_size=16", "hardware.micro_batch_size=16",
                   "hardware.precision=bf16"])
    assert math.isfinite(sft.summary["eval_loss"])
    for objective in ("dpo", "tdpo2"):
        job = api.align(["run.name=bf16", *TINY_ALIGN, "hardware.precision=bf16", f"objective={objective}"])
        assert math.isfinite(job.summary["eval_loss"]) and job.config.hardware.precision == "bf16"
        rows = [json.loads(line) for line in (job.path / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    # the setting is not ignored: the same job in float32 ends close to, but not exactly at, the bf16 one
    fp32 = api.align(["run.name=bf16", *TINY_ALIGN, "objective=tdpo2", "job=tdpo2_fp32"])
    assert fp32.summary["eval_loss"] != job.summary["eval_loss"]
    assert fp32.summary["eval_loss"] == pytest.approx(job.summary["eval_loss"], abs=0.05)

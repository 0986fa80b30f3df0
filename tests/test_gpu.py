"""On one CUDA GPU (`pytest -m gpu`, which scripts/gpu_check.sh runs; skipped where torch sees no
CUDA device): bf16 and fp16 training through the CLI's stages, sdpa and flash attention against
eager (padded and packed), gradient checkpointing, QLoRA, and a two-objective align of a
Pythia-410m-shaped random-init model.

PREFKIT_TEST_DEVICE=cpu runs them on the CPU instead, to check the tests themselves: fp16, flash
attention and QLoRA skip there, and the Pythia-410m shape keeps 2 of its 24 layers.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from conftest import TINY_ALIGN, TINY_SFT
from families import endoftext_tokenizer, family_model

from prefkit import api, packing, synthetic
from prefkit.data import collate, encode
from prefkit.models import load_causal_lm, load_tokenizer
from prefkit.modules import StatsLM, backbone

DEVICE = os.environ.get("PREFKIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_GPU = DEVICE is not None and DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU")]
HARDWARE = ["hardware=gpu", f"hardware.device={DEVICE}"]


def _losses(job) -> list[float]:
    losses = job.metrics()["loss"].dropna().tolist()  # the logged training losses (eval rows have none)
    assert losses, f"{job.path} logged no training loss"
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sft_and_align_train_in_half_precision(precision, in_run_dir):
    if precision == "fp16" and not ON_GPU:
        pytest.skip("fp16 autocast with loss scaling is a GPU path")
    sft = api.sft(["run.name=half", *TINY_SFT, *HARDWARE, f"hardware.precision={precision}"])
    assert math.isfinite(sft.summary["eval_loss"])
    for objective in ("dpo", "tdpo2", "edpo"):
        job = api.align(["run.name=half", *TINY_ALIGN, *HARDWARE, f"hardware.precision={precision}",
                         f"objective={objective}"])
        assert job.config.hardware.precision == precision
        assert math.isfinite(job.summary["eval_loss"]) and all(math.isfinite(x) for x in _losses(job))
    # the setting is not ignored: the same job in float32 ends close to, not exactly at, the half-precision one
    fp32 = api.align(["run.name=half", *TINY_ALIGN, *HARDWARE, "hardware.precision=fp32", "objective=edpo",
                      "job=edpo_fp32"])
    assert fp32.summary["eval_loss"] != job.summary["eval_loss"]
    assert fp32.summary["eval_loss"] == pytest.approx(job.summary["eval_loss"], abs=0.05)


def _batch(tok, n: int = 8) -> dict[str, torch.Tensor]:
    rows = synthetic.preference_examples(n, 0, "train")
    seqs = [encode(tok, r["prompt"], c, max_length=64, max_prompt_length=24) for r in rows for c in r["completions"]]
    return {k: v.to(DEVICE) for k, v in collate(seqs, tok.pad_token_id).items()}


def sharpen(path: str) -> None:
    """Scale a random-init model's matrices up, so attention is peaked and every token's log-prob
    depends on what it attends to (at init it is about -log V whatever attention does)."""
    lm = load_causal_lm(path, "float32")
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    lm.save_pretrained(path)


@pytest.mark.parametrize("impl", ["sdpa", "flash_attention_2"])
def test_attention_implementations_match_eager_padded_and_packed(impl, tmp_path):
    """Sequence log-probs of a Llama-3-shaped model (grouped-query attention) in bf16 under `impl`,
    padded and packed, against eager attention in float32, padded."""
    if impl == "flash_attention_2" and not (ON_GPU and importlib.util.find_spec("flash_attn")):
        pytest.skip("flash attention needs CUDA and the flash-attn package")
    path = str(family_model("llama3", tmp_path / "llama3"))
    sharpen(path)
    batch = _batch(load_tokenizer(path))
    eager = StatsLM(load_causal_lm(path, "float32", attn_implementation="eager").to(DEVICE)).eval()
    with torch.no_grad():
        want, _ = eager(**batch)
    lm = load_causal_lm(path, "bfloat16", attn_implementation=impl).to(DEVICE).eval()
    for packed in (False, True):
        assert packing.enable(backbone(lm), packed) == packed  # the packing probe passes under `impl`
        with torch.no_grad():
            got, _ = StatsLM(lm)(**batch)
        assert got.logps.dtype == torch.float64  # sums stay float64 under bf16 weights
        torch.testing.assert_close(got.logps.float(), want.logps.float(), rtol=2e-2, atol=0.3)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    path = str(family_model("gpt_neox", tmp_path / "neox"))
    batch = _batch(load_tokenizer(path))
    grads = []
    for checkpointing in (False, True):
        lm = load_causal_lm(path, "float32", attn_implementation="eager").to(DEVICE)  # deterministic backward
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
        stats, _ = StatsLM(lm)(**batch)
        stats.logps.sum().backward()
        grads.append({n: p.grad.detach().clone() for n, p in lm.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_aligns_with_a_4bit_base(in_run_dir):
    if not (ON_GPU and importlib.util.find_spec("bitsandbytes") and importlib.util.find_spec("peft")):
        pytest.skip("QLoRA needs CUDA, bitsandbytes and peft")
    path = family_model("gpt_neox", in_run_dir / "neox")
    common = ["model=pythia160m", f"model.name_or_path={path}", "run.name=qlora", "dataset=synthetic_test", *HARDWARE]
    short = ["train.max_steps=4", "train.batch_size=8", "hardware.micro_batch_size=8", "train.eval_every=4",
             "train.save_every=0"]
    api.sft([*common, *short])
    job = api.align([*common, *short, "peft=qlora", "objective=dpo"])
    assert math.isfinite(job.summary["eval_loss"]) and all(math.isfinite(x) for x in _losses(job))
    assert (job.path / "model/adapter/adapter_config.json").exists()


def test_two_objectives_align_a_pythia_410m_shaped_model(in_run_dir):
    """Pythia-410m's shape (24 layers of 1024, 16 heads, vocabulary 50,304), random init, through
    the CLI's stages with conf/model/pythia410m.yaml and hardware=gpu: sft, then dpo and tdpo2."""
    import transformers as tf

    path = in_run_dir / "pythia410m"
    tok = endoftext_tokenizer(path)
    config = tf.GPTNeoXConfig(hidden_size=1024, num_hidden_layers=24 if ON_GPU else 2, num_attention_heads=16,
                              intermediate_size=4096, vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.GPTNeoXForCausalLM(config).save_pretrained(path)
    common = ["model=pythia410m", f"model.name_or_path={path}", "run.name=p410m", "dataset=synthetic_test", *HARDWARE]
    short = ["train.max_steps=4", "train.batch_size=16", "hardware.micro_batch_size=8", "train.eval_every=4",
             "train.save_every=0"]
    api.sft([*common, *short, "train.lr=1e-4"])
    aligned = api.align([*common, *short, "objective=dpo,tdpo2"], multirun=True)
    assert sorted(j.config.objective.name for j in aligned) == ["dpo", "tdpo2"]
    for job in aligned:
        assert job.config.hardware.precision == "bf16"
        assert math.isfinite(job.summary["eval_loss"]) and all(math.isfinite(x) for x in _losses(job))

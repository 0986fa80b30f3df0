"""Sampling: explicit generation settings, and restart after a kill without lost or duplicated rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TEST_CONF, TINY, prefkit
from omegaconf import OmegaConf

from prefkit.embedded import build_word_tokenizer
from prefkit.stages.sample import generation_config
from prefkit.synthetic import lexicon


def _processors(top_k: int, top_p: float):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = build_word_tokenizer(lexicon())
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=136, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    s = OmegaConf.create({"temperature": 0.7, "top_k": top_k, "top_p": top_p, "max_new_tokens": 5})
    gen, _ = model._prepare_generation_config(generation_config(s, tok))
    procs = model._get_logits_processor(generation_config=gen, input_ids_seq_length=3, encoder_input_ids=None,
                                        prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu")
    return [type(p).__name__ for p in procs]


def test_top_k_zero_means_no_top_k_at_all():
    # transformers fills an unset top_k with 50; prefkit always sets it, so 0 really is "off"
    assert _processors(0, 1.0) == ["TemperatureLogitsWarper"]
    assert "TopKLogitsWarper" in _processors(5, 1.0)
    assert "TopPLogitsWarper" in _processors(0, 0.9)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_killed_sample_run_restarts_without_losing_or_duplicating_rows(sft_run):
    args = ["sample", "run.name=shared", "sample.policies=[sft]", "sample.max_prompts=16", "sample.batch_size=1",
            "sample.n=2", "sample.max_new_tokens=24", *TINY]
    prefkit(*args, "job=straight", cwd=sft_run)
    env = {**os.environ, "PREFKIT_CONFIG_PATH": str(TEST_CONF), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "prefkit.cli", *args, "job=killed"], cwd=sft_run, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((sft_run / "outputs/shared/sample/killed").glob("sft/*/samples.partial.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 6:  # three prompts in
            partial = found[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert partial is not None, "the run finished before it could be killed"
    assert not (partial.parent / "samples.jsonl").exists()
    assert not (sft_run / "outputs/shared/sample/killed/lineage.json").exists()
    prefkit(*args, "job=killed", cwd=sft_run)
    straight = _rows(next((sft_run / "outputs/shared/sample/straight").glob("sft/*/samples.jsonl")))
    resumed = _rows(partial.parent / "samples.jsonl")
    assert len(resumed) == 32 and not partial.exists()
    assert [(r["prompt_id"], r["sample"]) for r in resumed] == sorted({(r["prompt_id"], r["sample"]) for r in resumed})
    assert resumed == straight


def test_statistics_from_generation_logits_equal_a_second_forward():
    """The sample stage keeps the policy's logits from generation instead of running it again:
    every statistic must match the teacher-forced pass (left-padded KV-cached decoding vs one
    right-padded forward)."""
    import pytest
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from prefkit.stages.sample import _add_stats, generate_batch
    from prefkit.tokenstats import TokenRequest

    tok = build_word_tokenizer(lexicon())
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    policy, reference = GPTNeoXForCausalLM(config).eval(), GPTNeoXForCausalLM(config).eval()
    s = OmegaConf.create({"temperature": 0.9, "top_k": 0, "top_p": 1.0, "max_new_tokens": 12})
    gen = generation_config(s, tok)
    words = lexicon()[:20]
    batch = [(i, (tok.bos_token_id, *tok.convert_tokens_to_ids(words[i:i + 2 + i % 3]))) for i in range(6)]
    req = TokenRequest(temperature=0.9, kl=True, reverse_kl=True, entropy=True)
    for ref in (reference, policy):  # an aligned policy, and the reference sampling itself
        rows, seqs, logits = generate_batch(policy, tok, batch, gen, 2, 7, torch.device("cpu"), keep_logits=True)
        assert len({len(s.ids) for s in seqs}) > 1  # different lengths: padding on both sides is exercised
        assert all(len(lg) == r["n_tokens"] for lg, r in zip(logits, rows, strict=True))
        kept = [dict(r) for r in rows]
        again = [dict(r) for r in rows]
        _add_stats(kept, seqs, policy, ref, tok.pad_token_id, torch.device("cpu"), req, logits)
        _add_stats(again, seqs, policy, ref, tok.pad_token_id, torch.device("cpu"), req)
        for a, b in zip(kept, again, strict=True):
            for key in ("logp_policy", "logp_ref", "kl_exact", "kl_forward", "entropy"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
        assert any(r["kl_exact"] > 1e-3 for r in kept) == (ref is reference)

"""Padding-free packing (prefkit.packing, hardware.packing): a packed pass gives every objective
input a padded pass gives, in float32 within 1e-5, gradients too: sequence log-probs, token KLs
(both directions), entropies, log Σ p², ε-DPO's logit mixtures, shared-prefix sums, the reward
head's last token, cached reference log-probs. And the traps packing implementations have fallen
into: the chosen/rejected boundary, the first token of every sequence, a sequence cut at
max_length, a model whose attention ignores the restarting positions.
"""

from __future__ import annotations

import itertools
import logging
import random

import pytest
import torch
from conftest import TEST_CONF
from families import family_model
from torch import nn

from prefkit import packing, refcache, synthetic
from prefkit.data import Encoded, collate, encode
from prefkit.embedded import embedded_dir
from prefkit.models import load_causal_lm, load_tokenizer
from prefkit.modules import StatsLM, backbone, final_hidden, reference_hidden
from prefkit.tokenstats import TokenRequest

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 128}
EVERYTHING = TokenRequest(kl=True, reverse_kl=True, entropy=True, mixtures=(1.1, 0.9, 0.5), log_sum_sq_probs=True,
                          shared_prefix=True)
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(embedded_dir("packing", ARCH, tmp_path_factory.mktemp("cache")))
    tok = load_tokenizer(path)
    reference = load_causal_lm(path).eval()
    policy = StatsLM(load_causal_lm(path), reward_head=True)
    with torch.no_grad():  # a policy away from its reference, a reward head that is not zero
        g = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    rows = synthetic.preference_examples(6, 0, "train")
    seqs = [encode(tok, r["prompt"], c, max_length=48, max_prompt_length=20) for r in rows for c in r["completions"]]
    # a pair cut at max_length (no EOS left) and a response that starts at the very first token
    cut = encode(tok, rows[0]["prompt"], rows[0]["completions"][0] + " and more" * 30, max_length=48,
                 max_prompt_length=20)
    assert len(cut.ids) == 48 and cut.ids[-1] != tok.eos_token_id
    no_prompt = Encoded(tuple(tok(rows[1]["completions"][1], add_special_tokens=False)["input_ids"]), 0)
    seqs += [cut, no_prompt]
    return {"tok": tok, "reference": reference, "policy": policy, "seqs": seqs,
            "batch": collate(seqs, tok.pad_token_id)}


def set_packing(module: nn.Module, on: bool) -> None:
    assert packing.enable(backbone(module), on) == on


def run(models, packed: bool):
    """Every statistic, the rewards and the gradients of a loss that uses them all."""
    policy, reference, batch = models["policy"], models["reference"], models["batch"]
    set_packing(policy.lm, packed)
    set_packing(reference, packed)
    policy.zero_grad(set_to_none=True)
    ref = reference_hidden(reference, **batch)
    stats, rewards = policy(**batch, reference=ref, req=EVERYTHING, chunk_size=16, group_size=2)
    out = {key: getattr(stats, key) for key in ("logps", "lengths", "ref_logps", "kl", "reverse_kl", "entropy",
                                                 "log_sum_sq_probs", "prefix_logps", "ref_prefix_logps")}
    out.update({f"mix{lam}": v for lam, v in stats.mixture_logps.items()}, rewards=rewards,
               last_hidden=stats.last_hidden)
    w = torch.linspace(-1, 1, len(models["seqs"]), dtype=torch.float64)
    ((w * stats.logps).sum() + (w.flip(0) * stats.kl).sum() + (w * stats.prefix_logps).sum()
     + (w.float() * rewards).sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    return out, grads


def test_the_batch_really_packs(models):
    lengths = models["batch"]["attention_mask"].sum(-1).tolist()
    rows = packing.bins(lengths, max(lengths))
    assert len(rows) <= len(lengths) / 2  # several sequences per row: the boundaries are exercised
    # some row holds a chosen completion right before its own rejected one, or the other way round
    assert any(abs(a - b) == 1 and min(a, b) % 2 == 0 for r in rows for a, b in itertools.pairwise(r))


def test_every_objective_input_packed_equals_padded(models):
    padded, padded_grads = run(models, packed=False)
    packed, packed_grads = run(models, packed=True)
    for key, want in padded.items():
        assert want is not None, key
        torch.testing.assert_close(packed[key], want, **TOL, msg=key)
    assert padded_grads.keys() == packed_grads.keys()
    for name, want in padded_grads.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], want, **TOL, msg=name)


def test_each_sequence_packed_is_the_sequence_alone(models):
    """The first token of each sequence sees nothing before it, the last sees only its own
    sequence: packed hidden states equal those of each sequence run alone, with no padding."""
    lm, batch, seqs = models["reference"], models["batch"], models["seqs"]
    set_packing(lm, True)
    hidden = final_hidden(lm, batch["input_ids"], batch["attention_mask"])
    set_packing(lm, False)
    for i, seq in enumerate(seqs):
        ids = torch.tensor([seq.ids])
        alone = final_hidden(lm, ids, torch.ones_like(ids))[0]
        torch.testing.assert_close(hidden[i, :len(seq.ids)], alone, **TOL, msg=f"sequence {i}")
        assert (hidden[i, len(seq.ids):] == 0).all()


def test_cached_reference_logps_packed_equal_padded(models):
    groups = [models["seqs"][i:i + 2] for i in range(0, len(models["seqs"]), 2)]
    pad = models["tok"].pad_token_id
    results = []
    for packed in (False, True):
        set_packing(models["reference"], packed)
        results.append(refcache.compute(models["reference"], groups, pad, torch.device("cpu"), 6, 1.0, None))
    torch.testing.assert_close(results[1], results[0], **TOL)


def test_bins_are_first_fit_decreasing():
    assert packing.bins([5, 9, 3, 12, 7], 12) == [[3], [1, 2], [4, 0]]
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
        capacity = max(lengths)
        rows = packing.bins(lengths, capacity)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
        assert len(rows) <= len(lengths)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama3", "mistral", "qwen2.5", "phi3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_model_family_keeps_packed_sequences_apart(family, attention, tmp_path):
    lm = load_causal_lm(str(family_model(family, tmp_path / family)), attn_implementation=attention).eval()
    assert packing.honours_packed_positions(backbone(lm))
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 9, 3, 12, 7, 1])
    ids = torch.randint(1, lm.config.vocab_size, (6, 12), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    with torch.no_grad():
        padded = final_hidden(lm, ids, mask) * mask[..., None]
        set_packing(lm, True)
        packed = final_hidden(lm, ids, mask)
    torch.testing.assert_close(packed, padded, **TOL)


class IgnoresPositions(nn.Module):
    """A backbone whose attention spans the whole row whatever the positions say."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=use_cache)


def test_a_backbone_that_mixes_packed_sequences_runs_padded_with_a_warning(models, caplog):
    body = IgnoresPositions(backbone(models["reference"]))
    with caplog.at_level(logging.WARNING, logger="prefkit"):
        assert not packing.enable(body, True)
    assert "does not keep packed sequences apart" in caplog.text
    assert not packing.is_enabled(body)


def test_the_stages_pack_when_the_hardware_says_so(models, tmp_path):
    from hydra import compose, initialize_config_dir

    from prefkit import recipe
    from prefkit.config import conf_dir, register_resolvers

    register_resolvers()
    path = str(embedded_dir("packing", ARCH, tmp_path))
    for setting in (None, "true", "false"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="align", overrides=[f"hydra.searchpath=[file://{TEST_CONF}]", "model=tiny_test",
                                                          *([f"hardware.packing={setting}"] if setting else [])])
        assert packing.is_enabled(backbone(recipe.prepare_model(cfg, path).lm)) == (setting != "false")

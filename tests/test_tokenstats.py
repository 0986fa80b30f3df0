"""prefkit.tokenstats (and the models of prefkit.modules) against a naive full-vocabulary computation in float64.

Token level: random hidden states and LM heads, every statistic (log-probs, reference log-probs,
forward KL, reverse KL, entropy, ε-DPO's logit mixtures) and the gradients, for both backward
paths and several chunk sizes. Sequence level: a tiny GPT-NeoX policy and reference, compared
with log-softmaxes of the models' own full logits, under re-padding and temperature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefkit import synthetic
from prefkit.data import IGNORE, Encoded, collate, encode
from prefkit.embedded import embedded_dir
from prefkit.models import load_causal_lm, load_tokenizer
from prefkit.modules import StatsLM, final_hidden, sequence_stats
from prefkit.objectives import Groups, build
from prefkit.tokenstats import Head, Reference, TokenRequest, sum_by_sequence, token_stats

ARCH = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 64}
LAMBDAS = (1.1, 0.9, 0.5, 1.0)
FULL = dict(kl=True, reverse_kl=True, entropy=True, mixtures=LAMBDAS)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- token level ------------------------------------------------------------------------------------

M, H, V = 11, 6, 13


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64))

    return {"hidden": rnd(M, H), "weight": rnd(V, H), "bias": rnd(V, scale=0.5), "ref_hidden": rnd(M, H),
            "ref_weight": rnd(V, H), "targets": torch.randint(0, V, (M,), generator=g),
            "a": rnd(M), "b": rnd(M)}


def naive_tokens(d, hidden, weight, bias, temperature=1.0):
    """Every statistic from full [M, V] log-softmaxes, float64."""
    z = (hidden @ weight.T + bias) / temperature
    zr = (d["ref_hidden"] @ d["ref_weight"].T) / temperature
    logp, ref = F.log_softmax(z, -1), F.log_softmax(zr, -1)
    y = d["targets"][:, None]
    out = {"logps": logp.gather(-1, y)[:, 0], "ref_logps": ref.gather(-1, y)[:, 0],
           "kl": (ref.exp() * (ref - logp)).sum(-1), "reverse_kl": (logp.exp() * (logp - ref)).sum(-1),
           "entropy": -(logp.exp() * logp).sum(-1)}
    for lam in LAMBDAS:
        out[f"mix{lam}"] = F.log_softmax(lam * z + (1 - lam) * zr, -1).gather(-1, y)[:, 0]
    return out


def run_tokens(d, hidden, weight, bias, *, chunk, recompute, temperature=1.0, dtype=torch.float64, **req):
    req = TokenRequest(temperature=temperature, mixture_dtype=dtype, **(req or FULL))
    reference = Reference(d["ref_hidden"], Head(d["ref_weight"]))
    return token_stats(hidden, d["targets"], Head(weight, bias), reference=reference, req=req, chunk_size=chunk,
                       recompute=recompute)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_match_the_full_vocabulary(tokens, recompute, chunk, temperature):
    d = tokens
    got = run_tokens(d, d["hidden"], d["weight"], d["bias"], chunk=chunk, recompute=recompute,
                     temperature=temperature)
    want = naive_tokens(d, d["hidden"], d["weight"], d["bias"], temperature)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == torch.float64, key
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_temperature_divides_both_models_logits(tokens):
    d = tokens
    cold = run_tokens(d, d["hidden"], d["weight"], d["bias"], chunk=4096, recompute=True, temperature=0.5)
    # dividing by τ is multiplying both heads by 1/τ
    scaled = dict(d, ref_weight=d["ref_weight"] * 2.0)
    warm = run_tokens(scaled, d["hidden"], d["weight"] * 2.0, d["bias"] * 2.0, chunk=4096, recompute=True)
    for key in cold:
        torch.testing.assert_close(cold[key], warm[key], rtol=1e-12, atol=1e-12, msg=key)
    plain = run_tokens(d, d["hidden"], d["weight"], d["bias"], chunk=4096, recompute=True)
    assert not torch.allclose(cold["ref_logps"], plain["ref_logps"])  # the reference is tempered too


def test_mixtures_in_float32_by_default(tokens):
    d = tokens
    got = run_tokens(d, d["hidden"], d["weight"], d["bias"], chunk=4, recompute=True, dtype=torch.float32)
    want = naive_tokens(d, d["hidden"], d["weight"], d["bias"])
    for lam in LAMBDAS:
        assert got[f"mix{lam}"].dtype == torch.float32
        torch.testing.assert_close(got[f"mix{lam}"].double(), want[f"mix{lam}"], rtol=1e-5, atol=1e-5)


def token_grads(d, mode, chunk=4096, temperature=1.0):
    hidden = d["hidden"].clone().requires_grad_(True)
    weight = d["weight"].clone().requires_grad_(True)
    bias = d["bias"].clone().requires_grad_(True)
    if mode == "naive":
        out = naive_tokens(d, hidden, weight, bias, temperature)
    else:
        out = run_tokens(d, hidden, weight, bias, chunk=chunk, recompute=mode == "recompute", temperature=temperature)
    total = (d["a"] * out["logps"]).sum() + (d["b"] * out["kl"]).sum()
    return torch.autograd.grad(total, [hidden, weight, bias])


@pytest.mark.parametrize("mode", ["recompute", "keep"])
@pytest.mark.parametrize("chunk", [1, 3, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_gradients_match_naive_autograd(tokens, mode, chunk, temperature):
    want = token_grads(tokens, "naive", temperature=temperature)
    got = token_grads(tokens, mode, chunk, temperature)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)


def test_no_gradient_reaches_the_no_gradient_statistics(tokens):
    d = tokens
    hidden = d["hidden"].clone().requires_grad_(True)
    for recompute in (True, False):
        out = run_tokens(d, hidden, d["weight"], d["bias"], chunk=4, recompute=recompute)
        for key in ("ref_logps", "reverse_kl", "entropy", *(f"mix{lam}" for lam in LAMBDAS)):
            assert not out[key].requires_grad, (key, recompute)
        assert out["logps"].requires_grad and out["kl"].requires_grad


@pytest.mark.parametrize("recompute", [True, False])
def test_head_logit_scale_and_softcap(tokens, recompute):
    # the model's own logit post-processing (Gemma-2's soft-capping, Cohere's logit_scale) on both paths
    d = tokens
    hidden = d["hidden"].clone().requires_grad_(True)
    head = Head(d["weight"], d["bias"], scale=0.5, softcap=2.0)
    out = token_stats(hidden, d["targets"], head, req=TokenRequest(entropy=True), chunk_size=4, recompute=recompute)
    z = torch.tanh(0.5 * (hidden @ d["weight"].T + d["bias"]) / 2.0) * 2.0
    logp = F.log_softmax(z, -1)
    want = logp.gather(-1, d["targets"][:, None])[:, 0]
    torch.testing.assert_close(out["logps"], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["entropy"], -(logp.exp() * logp).sum(-1).detach(), rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad((d["a"] * out["logps"]).sum(), hidden)
    (expected,) = torch.autograd.grad((d["a"] * want).sum(), hidden)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recompute", [True, False])
def test_forward_kl_gradient_is_softmax_minus_reference(tokens, recompute):
    # ∂KL(p_ref ‖ softmax(z))/∂z = softmax(z) − p_ref: an identity head makes hidden = logits
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(M, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    zr = 3 * torch.randn(M, V, generator=g, dtype=torch.float64)
    eye = torch.eye(V, dtype=torch.float64)
    out = token_stats(z, tokens["targets"], Head(eye), reference=Reference(zr, Head(eye)),
                      req=TokenRequest(kl=True), chunk_size=4, recompute=recompute)
    (grad,) = torch.autograd.grad(out["kl"].sum(), z)
    torch.testing.assert_close(grad, torch.softmax(z.detach(), -1) - torch.softmax(zr, -1), rtol=1e-12, atol=1e-12)
    # zero where the policy is the reference
    out = token_stats(zr.clone().requires_grad_(True), tokens["targets"], Head(eye), reference=Reference(zr, Head(eye)),
                      req=TokenRequest(kl=True), recompute=recompute)
    assert out["kl"].abs().max() < 1e-12


@pytest.mark.parametrize("recompute", [True, False])
def test_kl_is_finite_when_reference_probabilities_underflow(recompute):
    # a reference row with a logit gap of 250: softmax(ref) underflows to 0 in float32 (softmax().log() is NaN there)
    ref_logits = torch.zeros(3, 8)
    ref_logits[:, 1:] = -250.0
    ref_logits[2, 2] = -600.0
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    eye = torch.eye(8)
    targets = torch.tensor([0, 3, 2])
    req = TokenRequest(kl=True, reverse_kl=True, entropy=True, mixtures=(1.01, 0.99))
    out = token_stats(z, targets, Head(eye), reference=Reference(ref_logits, Head(eye)), req=req, recompute=recompute)
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    ref64, logp64 = F.log_softmax(ref_logits.double(), -1), F.log_softmax(z.detach().double(), -1)
    kl = (ref64.exp() * (ref64 - logp64)).sum(-1)  # the underflowed terms are exactly 0 here
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-5, atol=1e-5)
    rev = (logp64.exp() * (logp64 - ref64)).sum(-1)
    torch.testing.assert_close(out["reverse_kl"].double(), rev, rtol=1e-5, atol=1e-3)
    (grad,) = torch.autograd.grad(out["kl"].sum(), z)
    assert torch.isfinite(grad).all()


# --- sequence level ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(embedded_dir("logprobs", ARCH, tmp_path_factory.mktemp("cache")))
    tok = load_tokenizer(path)
    reference = load_causal_lm(path).double().eval()
    policy = load_causal_lm(path).double().eval()
    with torch.no_grad():  # move the policy away from the reference
        g = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    rows = synthetic.preference_examples(4, 0, "train")
    seqs = [encode(tok, r["prompt"], c, max_length=40, max_prompt_length=12) for r in rows for c in r["completions"]]
    return {"path": path, "tok": tok, "policy": policy, "reference": reference, "seqs": seqs,
            "batch": collate(seqs, tok.pad_token_id)}


def naive_sequences(policy, reference, batch, temperature=1.0, lambdas=LAMBDAS):
    """Per-sequence sums from the models' own full logits, float64."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    z = policy(**kwargs).logits[:, :-1] / temperature
    zr = reference(**kwargs).logits[:, :-1].detach() / temperature
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    y = labels.clamp(min=0)[..., None]
    logp, ref = F.log_softmax(z, -1), F.log_softmax(zr, -1)

    def total(x):
        return (x * mask).sum(-1)

    out = {"logps": total(logp.gather(-1, y)[..., 0]), "ref_logps": total(ref.gather(-1, y)[..., 0]),
           "kl": total((ref.exp() * (ref - logp)).sum(-1)),
           "reverse_kl": total((logp.exp() * (logp - ref)).sum(-1)).detach(),
           "entropy": total(-(logp.exp() * logp).sum(-1)).detach(), "lengths": mask.sum(-1)}
    for lam in lambdas:
        out[lam] = total(F.log_softmax(lam * z + (1 - lam) * zr, -1).gather(-1, y)[..., 0]).detach()
    return out


def stats_dict(stats) -> dict:
    out = {k: getattr(stats, k) for k in ("logps", "ref_logps", "kl", "reverse_kl", "entropy", "lengths")}
    out.update(stats.mixture_logps)
    return out


def full_request(temperature=1.0):
    return TokenRequest(temperature=temperature, mixture_dtype=torch.float64, **FULL)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("recompute", [True, False])
def test_sequence_stats_match_the_models_full_logits(tiny, temperature, recompute):
    got = stats_dict(sequence_stats(tiny["policy"], **tiny["batch"], reference=tiny["reference"],
                                    req=full_request(temperature), want_ref_logps=True, chunk_size=16,
                                    recompute=recompute))
    want = naive_sequences(tiny["policy"], tiny["reference"], tiny["batch"], temperature)
    assert (want["lengths"] == torch.tensor([len(s.ids) - s.prompt_len for s in tiny["seqs"]])).all()
    for key, value in want.items():
        torch.testing.assert_close(got[key].to(value.dtype), value.detach(), rtol=1e-10, atol=1e-10, msg=str(key))


def test_reference_log_probs_alone(tiny):
    stats = sequence_stats(tiny["policy"], **tiny["batch"], reference=tiny["reference"], want_ref_logps=True)
    want = naive_sequences(tiny["policy"], tiny["reference"], tiny["batch"])
    torch.testing.assert_close(stats.ref_logps, want["ref_logps"], rtol=1e-10, atol=1e-10)
    assert stats.kl is None and stats.reverse_kl is None and stats.mixture_logps == {}
    with pytest.raises(ValueError):
        sequence_stats(tiny["policy"], **tiny["batch"], want_ref_logps=True)


def model_grads(tiny, mode, chunk=4096):
    policy = tiny["policy"]
    policy.zero_grad(set_to_none=True)
    weights_lp = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    weights_kl = torch.linspace(0.5, -0.3, 8, dtype=torch.float64)
    if mode == "naive":
        out = naive_sequences(policy, tiny["reference"], tiny["batch"])
        logps, kl = out["logps"], out["kl"]
    else:
        stats = sequence_stats(policy, **tiny["batch"], reference=tiny["reference"], req=TokenRequest(kl=True),
                               chunk_size=chunk, recompute=mode == "recompute")
        logps, kl = stats.logps, stats.kl
    ((weights_lp * logps).sum() + (weights_kl * kl).sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    return grads


def test_model_gradients_are_the_same_on_every_path(tiny):
    want = model_grads(tiny, "naive")
    assert any(g.abs().max() > 1e-3 for g in want.values())
    for mode, chunk in (("recompute", 4096), ("recompute", 16), ("keep", 16)):
        got = model_grads(tiny, mode, chunk)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=f"{mode} {chunk} {name}")


def repad(batch, extra, pad_id):
    """The same sequences with `extra` more columns of right padding."""
    n = batch["input_ids"].shape[0]
    return {"input_ids": torch.cat([batch["input_ids"], torch.full((n, extra), pad_id)], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(n, extra, dtype=torch.long)], 1),
            "labels": torch.cat([batch["labels"], torch.full((n, extra), IGNORE)], 1)}


def test_extra_right_padding_changes_no_response_statistic(tiny):
    req = full_request()
    base = stats_dict(sequence_stats(tiny["policy"], **tiny["batch"], reference=tiny["reference"], req=req,
                                     want_ref_logps=True))
    padded = stats_dict(sequence_stats(tiny["policy"], **repad(tiny["batch"], 6, tiny["tok"].pad_token_id),
                                       reference=tiny["reference"], req=req, want_ref_logps=True))
    for key in base:
        torch.testing.assert_close(padded[key], base[key], rtol=1e-10, atol=1e-10, msg=str(key))
    # each sequence alone (no padding at all) gives the same numbers as in the padded batch
    for i in (0, 5):
        alone = stats_dict(sequence_stats(tiny["policy"], **collate([tiny["seqs"][i]], tiny["tok"].pad_token_id),
                                          reference=tiny["reference"], req=req, want_ref_logps=True))
        for key in base:
            torch.testing.assert_close(alone[key][0], base[key][i], rtol=1e-10, atol=1e-10, msg=str(key))


def test_reward_head_reads_the_last_non_pad_token(tiny):
    module = StatsLM(tiny["policy"], reward_head=True).double()
    with torch.no_grad():
        module.reward_head.weight.normal_(generator=torch.Generator().manual_seed(4))
    pad = tiny["tok"].pad_token_id
    _, rewards = module(**tiny["batch"])
    assert rewards.shape == (8,) and rewards.requires_grad
    _, rewards_padded = module(**repad(tiny["batch"], 5, pad))
    torch.testing.assert_close(rewards_padded, rewards, rtol=1e-10, atol=1e-10)
    for i, seq in enumerate(tiny["seqs"]):
        ids = torch.tensor([seq.ids])
        last = final_hidden(tiny["policy"], ids, torch.ones_like(ids))[0, -1]  # the sequence alone, unpadded
        expected = module.reward_head(last)[0]
        torch.testing.assert_close(rewards[i], expected, rtol=1e-10, atol=1e-10)
    # a pad token's hidden state would give something else
    assert len({len(s.ids) for s in tiny["seqs"]}) > 1
    no_head = StatsLM(tiny["policy"])
    assert no_head(**tiny["batch"])[1] is None


def test_policy_equal_to_reference_gives_zero_kl_and_dpo_ln2(tiny):
    ref = tiny["reference"]
    stats = sequence_stats(ref, **tiny["batch"], reference=ref, req=TokenRequest(kl=True, reverse_kl=True),
                           want_ref_logps=True)
    assert stats.kl.abs().max() < 1e-12 and stats.reverse_kl.abs().max() < 1e-12
    torch.testing.assert_close(stats.logps, stats.ref_logps, rtol=0, atol=1e-12)
    g = Groups(logps=stats.logps.view(4, 2), lengths=stats.lengths.view(4, 2), ref_logps=stats.ref_logps.view(4, 2),
               kl=stats.kl.view(4, 2))
    for name in ("tdpo1", "tdpo2", "dpo"):
        assert build({"name": name})[0].loss(g).loss.item() == pytest.approx(0.6931471805599453, abs=1e-10)


def test_mixtures_equal_the_policy_when_policy_is_reference():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(256, 16, generator=g)  # float32, as in training; logits of a few nats
    weight = torch.randn(64, 16, generator=g)
    targets = torch.randint(0, 64, (256,), generator=g)
    obj = build({"name": "edpo", "epsilon": 0.01})[0]
    out = token_stats(hidden, targets, Head(weight), reference=Reference(hidden, Head(weight)), req=obj.needs.tokens)
    # 32 pairs of 4-token responses, policy = reference (step 0)
    seq = {k: v.view(64, 4).sum(-1).view(32, 2) for k, v in out.items()}
    g = Groups(logps=seq["logps"], lengths=torch.full((32, 2), 4), ref_logps=seq["ref_logps"],
               mixture_logps={lam: seq[f"mix{lam}"] for lam in obj.needs.tokens.mixtures})
    for lam in obj.needs.tokens.mixtures:
        assert torch.equal(out[f"mix{lam}"], out["logps"]), lam
    assert (obj.steps(g) == 0).all()


def official_bf16_steps(pol_logits, ref_logits, labels, mask, eps):
    """The official ε-DPO trainer's decision (oddqueue/e-dpo, concatenated_forward on TRL 0.13,
    a bf16 model), op by op: bf16 logits, the mixtures (1+ε)·logits − ε·ref_logits and
    (1−ε)·logits + ε·ref_logits in bf16, log_softmax, gather, masked sum, chosen − rejected, and
    the strict comparisons of Eqs. 1–2, all in bf16."""
    logits, ref = pol_logits.to(torch.bfloat16), ref_logits.to(torch.bfloat16)

    def seq(z):
        per_token = torch.gather(z.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
        return (per_token * mask).sum(-1)

    b = labels.shape[0] // 2
    cur, lo, hi = seq(logits), seq(((1 + eps) * logits) - (eps * ref)), seq(((1 - eps) * logits) + (eps * ref))
    z, z_lo, z_hi = cur[:b] - cur[b:], lo[:b] - lo[b:], hi[:b] - hi[b:]
    return ((z_lo > z) & (z > z_hi)).long() - ((z_hi > z) & (z > z_lo)).long()


@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_edpo_bf16_decisions_are_the_official_arithmetic(eps):
    g = torch.Generator().manual_seed(3)
    b, t, v = 48, 40, 96
    ref_logits = 2.0 * torch.randn(2 * b, t, v, generator=g)
    drift = torch.linspace(0.0, 3.0, b).repeat(2)[:, None, None]  # from policy = reference to far from it
    pol_logits = ref_logits + drift * torch.randn(2 * b, t, v, generator=g)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    mask = torch.arange(t)[None, :] >= torch.randint(5, 20, (2 * b, 1), generator=g)  # prompts of 5–19 tokens
    want = official_bf16_steps(pol_logits, ref_logits, labels, mask, eps)

    def prefkit_steps(dtype):
        obj = build({"name": "edpo", "epsilon": eps, "perturb_dtype": dtype})[0]
        rows = mask.nonzero(as_tuple=True)[0]
        eye = Head.identity(v)
        out = token_stats(pol_logits[mask], labels[mask], eye, reference=Reference(ref_logits[mask], eye),
                          req=obj.needs.tokens, recompute=False)
        seq = {k: sum_by_sequence(val, rows, 2 * b).view(2, b).T for k, val in out.items()}
        grp = Groups(logps=seq["logps"], lengths=torch.ones(b, 2), ref_logps=seq["ref_logps"],
                     mixture_logps={lam: seq[f"mix{lam}"] for lam in obj.needs.tokens.mixtures})
        return obj.steps(grp)

    got = prefkit_steps("bfloat16")
    assert torch.equal(got, want), (got != want).sum()
    assert (want != 0).any() and (want == 0).any()  # the bf16 dead zone and decisions beyond it
    assert not torch.equal(prefkit_steps("float32"), want)  # exact maths decides otherwise: the option matters


def test_auto_recompute_keeps_the_logits_of_small_micro_batches():
    """hardware.recompute_lm_head=auto: a micro-batch with fewer response tokens than keep_below keeps
    its chunk logits for backward (faster); a larger one recomputes them (memory)."""
    from prefkit.stages.align import AlignStep

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, *args, recompute, **kwargs):
            seen.append(recompute)
            raise StopIteration  # nothing after the forward matters here

    objective, _ = build({"name": "tdpo2", "beta": 0.1, "alpha": 0.5})
    pair = [Encoded((1, 5, 6, 7, 2), 2), Encoded((1, 5, 8, 2), 2)]  # 3 + 2 response tokens
    for keep_below, recompute, want in ((6, True, False), (5, True, True), (0, True, True), (99, False, False)):
        step = AlignStep(objective, {"train": [pair]}, 0, torch.device("cpu"), None, recompute,
                         keep_below=keep_below)
        with pytest.raises(StopIteration):
            step(Spy(), "train", [0], True)
        assert seen.pop() is want, (keep_below, recompute)

"""`objective=mix`: weighted sums of objectives on one forward pass (MPO, RPO; TRL 1.16's
`loss_type=[...]` with `loss_weights`).

(a) values on small hand-made tensors, from the parts' formulas with `math`; (b) a finite-difference
check of the gradient; (c) TRL's DPOTrainer._compute_loss with several loss types on the same
per-token log-probs (float64), and end to end on a tiny model: loss and gradients agree;
(d) the union of the parts' needs, and every mixture that cannot run is one clear UserError at
build time; (e) each part's metrics under its name, its state kept, checkpointed, restored;
(f) the YAML and command-line lists reach the constructor; the align step fills what the parts need.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FakeAccelerator
from safetensors.torch import load_file, save_file
from test_modifiers import (
    LENS,
    LOGPS,
    LSQ,
    PREFIX,
    REF,
    REF_PREFIX,
    close,
    desensitised,
    logsig,
    mean,
    prefkit_side,
    tiny_trl,  # noqa: F401  (a fixture)
    token_data,  # noqa: F401  (a fixture)
    trl_side,
    wpo,
)
from torch.autograd import gradcheck

from prefkit import checkpoint
from prefkit.errors import UserError
from prefkit.objectives import REGISTRY, Groups, LossOutput, Needs, Objective, build, register
from prefkit.objectives.mix import MPO, REWARD_METRICS, Mix

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-12
LOGPS_B = [[-1.0, -3.0], [-2.0, -2.5], [-1.0, -1.5], [-3.0, -1.0]]


def t64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).requires_grad_(grad)


def groups(logps=LOGPS, grad: bool = False, training: bool = True) -> Groups:
    return Groups(logps=t64(logps, grad), lengths=torch.tensor(LENS), ref_logps=t64(REF), prefix_logps=t64(PREFIX),
                  ref_prefix_logps=t64(REF_PREFIX), log_sum_sq_probs=t64(LSQ), training=training)


def mix(*parts: dict, **options) -> Mix:
    obj, _ = build({"name": "mix", "parts": list(parts), **options})
    return obj


# --- independent scalar maths (close, logsig, mean: tests/test_modifiers.py) ------------------

def hs(logps=LOGPS, ref=REF):
    return [(lp[0] - rf[0], lp[1] - rf[1]) for lp, rf in zip(logps, ref, strict=True)]


def dpo_value(beta, logps=LOGPS, ref=REF, weights=None):
    weights = weights or [1.0] * len(logps)
    return mean(w * -logsig(beta * (hw - hl)) for w, (hw, hl) in zip(weights, hs(logps, ref), strict=True))


def bco_value(beta, delta, logps=LOGPS, ref=REF):
    return mean(-logsig(beta * hw - delta) - logsig(-(beta * hl - delta)) for hw, hl in hs(logps, ref))


def batch_mean_reward(beta, logps=LOGPS, ref=REF):
    return mean(beta * x for pair in hs(logps, ref) for x in pair)


def sft_value(logps=LOGPS):
    return -sum(lp[0] for lp in logps) / sum(n[0] for n in LENS)


# --- (a) values -----------------------------------------------------------------------------------

def test_mpo_default_is_08_dpo_02_bco_1_sft():
    obj = build({"name": "mix"})[0]
    assert [(p.key, p.weight) for p in obj.parts] == [("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    out = obj.loss(groups())
    delta = batch_mean_reward(0.1)  # bco_pair's δ moves before the batch uses it
    close(out.loss, 0.8 * dpo_value(0.1) + 0.2 * bco_value(0.1, delta) + sft_value())


def test_parts_take_their_own_options():
    obj = mix({"name": "dpo", "weight": 1.0, "beta": 0.2}, {"name": "bco_pair", "weight": 0.5, "beta": 0.3},
              {"name": "sft", "weight": 1.0})
    out = obj.loss(groups())
    close(out.loss, dpo_value(0.2) + 0.5 * bco_value(0.3, batch_mean_reward(0.3)) + sft_value())
    # the top-level rewards (TRL's rewards/*) are the first part's: β h at its β
    torch.testing.assert_close(out.rewards, 0.2 * (t64(LOGPS) - t64(REF)), rtol=TOL, atol=TOL)


def test_weight_defaults_to_one_and_a_single_part_is_the_part():
    g = groups(training=False)
    one = mix({"name": "ipo", "beta": 0.25}).loss(g)
    alone = build({"name": "ipo", "beta": 0.25})[0].loss(g)
    assert torch.equal(one.loss, alone.loss) and torch.equal(one.rewards, alone.rewards)


def test_parts_with_modifiers():
    obj = mix({"name": "dpo", "beta": 0.3, "ld_alpha": 0.5}, {"name": "dpo", "beta": 0.3, "use_weighting": True,
                                                              "weight": 0.5})
    assert [p.key for p in obj.parts] == ["dpo", "dpo_2"]
    lp, rf = desensitised(LOGPS, PREFIX, 0.5), desensitised(REF, REF_PREFIX, 0.5)
    out = obj.loss(groups())
    close(out.loss, dpo_value(0.3, lp, rf) + 0.5 * dpo_value(0.3, weights=wpo()))
    assert obj.needs.tokens.shared_prefix and obj.needs.tokens.log_sum_sq_probs and obj.needs.reference == "logits"


def test_a_reference_free_part_sees_no_reference():
    g = groups(training=False)
    out = mix({"name": "simpo", "beta": 2.0, "gamma": 0.5}, {"name": "slic", "beta": 0.8, "reference_free": True},
              {"name": "dpo"}).loss(g)
    simpo = build({"name": "simpo", "beta": 2.0, "gamma": 0.5})[0].loss(g).loss
    slic = build({"name": "slic", "beta": 0.8, "reference_free": True})[0].loss(g).loss
    close(out.loss, float(simpo + slic) + dpo_value(0.1))


# --- (b) finite differences -----------------------------------------------------------------------

@pytest.mark.parametrize("parts", [
    [{"name": "dpo", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2}, {"name": "sft", "weight": 1.0}],
    [{"name": "ipo", "f_divergence": "js", "weight": 0.3}, {"name": "nca_pair", "ld_alpha": 0.5},
     {"name": "simpo", "weight": 2.0}],
])
def test_gradcheck(parts):
    obj = mix(*parts)
    if obj.parts[1].objective.name == "bco_pair":
        obj.parts[1].objective.load_state_dict({"delta": -0.37, "count": 3})

    def fn(lp, prefix):
        g = Groups(logps=lp, lengths=torch.tensor(LENS), ref_logps=t64(REF), prefix_logps=prefix,
                   ref_prefix_logps=t64(REF_PREFIX), training=False)
        return obj.loss(g).loss

    assert gradcheck(fn, (t64(LOGPS, True), t64(PREFIX, True)), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- (c) TRL 1.16: loss_type=[...] with loss_weights ------------------------------------------------

TRL_MIXES = [
    # MPO (TRL's documented example); TRL ≥ 1.0's bco_pair has no reward shift
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"beta": 0.5},
     [{"name": "dpo", "weight": 0.8, "beta": 0.5}, {"name": "bco_pair", "weight": 0.2, "beta": 0.5,
                                                   "reward_shift": False}, {"name": "sft", "weight": 1.0}]),
    # RPO: DPO + NLL
    (["sigmoid", "sft"], None, {"beta": 0.5}, [{"name": "dpo", "beta": 0.5}, {"name": "sft"}]),
    (["ipo", "hinge", "robust"], [1.0, 0.5, 0.25], {"beta": 0.5, "f_divergence_type": "js_divergence",
                                                     "label_smoothing": 0.2},
     [{"name": "ipo", "beta": 0.5, "f_divergence": "js"}, {"name": "slic", "beta": 0.5, "f_divergence": "js",
                                                           "weight": 0.5},
      {"name": "robust_dpo", "beta": 0.5, "f_divergence": "js", "label_smoothing": 0.2, "weight": 0.25}]),
    (["sigmoid", "nca_pair", "apo_zero"], [1.0, 0.3, 0.6], {"beta": 0.5, "ld_alpha": 0.4, "use_weighting": True},
     [{"name": n, "beta": 0.5, "ld_alpha": 0.4, "use_weighting": True, "weight": w}
      for n, w in (("dpo", 1.0), ("nca_pair", 0.3), ("apo_zero", 0.6))]),
    (["aot", "sppo_hard"], [0.7, 0.1], {"beta": 0.5, "ld_alpha": 0.2},
     [{"name": "aot", "beta": 0.5, "ld_alpha": 0.2, "weight": 0.7},
      {"name": "sppo_hard", "beta": 0.5, "ld_alpha": 0.2, "weight": 0.1}]),
]


@pytest.mark.parametrize("loss_types, weights, settings, parts", TRL_MIXES,
                         ids=["+".join(c[0]) for c in TRL_MIXES])
def test_trl_loss_type_lists(token_data, loss_types, weights, settings, parts):  # noqa: F811
    assert trl.__version__ == "1.16.0"
    d = token_data
    logits = d["logits"].clone().requires_grad_(True)
    trl_loss, trl_logged = trl_side(d, logits, loss_types, weights, **settings)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    ours, logged = prefkit_side(d, {"name": "mix", "parts": parts}, logits)
    (grad,) = torch.autograd.grad(ours, logits)
    assert abs(trl_loss.item()) > 1e-3 and float(trl_grad.abs().max()) > 1e-4
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-10)
    for key in REWARD_METRICS:  # TRL logs β h once; the mixture's top level is its first part's
        assert float(logged[key]) == pytest.approx(trl_logged[key], rel=1e-10, abs=1e-10), key


def test_mpo_end_to_end_on_a_tiny_model(tiny_trl):  # noqa: F811
    from test_trl_parity import assert_same_grads, dpo_trainer, grads

    from prefkit.data import IGNORE
    from prefkit.modules import StatsLM, reference_hidden

    trainer, reference, batch = dpo_trainer(tiny_trl, loss_type=["sigmoid", "bco_pair", "sft"],
                                            loss_weights=[0.8, 0.2, 1.0], beta=0.1)
    model = trainer.model
    n = batch["input_ids"].shape[0] // 2
    order = torch.arange(2 * n).view(2, n).T.flatten()  # TRL's [chosen; rejected] -> prefkit's pairs
    parts = [{"name": "dpo", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2, "reward_shift": False},
             {"name": "sft", "weight": 1.0}]

    def ours():
        obj = mix(*parts)
        ids, mask = batch["input_ids"][order], batch["attention_mask"][order]
        labels = ids.masked_fill(batch["completion_mask"][order] == 0, IGNORE)
        stats, _ = StatsLM(model)(ids, mask, labels, reference=reference_hidden(reference, ids, mask, labels),
                                  req=obj.needs.tokens, chunk_size=8, group_size=2)
        return obj.loss(Groups(logps=stats.logps.view(n, 2), lengths=stats.lengths.view(n, 2),
                               ref_logps=stats.ref_logps.view(n, 2))).loss

    trl_loss = trainer._compute_loss(model, batch, False)
    torch.testing.assert_close(ours(), trl_loss, rtol=1e-5, atol=1e-5, check_dtype=False)
    assert_same_grads(grads(model, trl_loss), grads(model, ours()))


# --- (d) needs ------------------------------------------------------------------------------------

def test_needs_are_the_union_of_the_parts():
    needs = build({"name": "mix"})[0].needs
    assert (needs.reference, needs.group_size, needs.cacheable, needs.rewards) == ("logps", 2, True, False)
    assert mix({"name": "simpo"}, {"name": "sft"}).needs.reference == "none"
    n = mix({"name": "dpo"}, {"name": "tdpo2"}).needs
    assert n.reference == "logits" and n.tokens.kl and n.tokens.reverse_kl
    n = mix({"name": "edpo"}, {"name": "tdpo1"}).needs
    assert n.tokens.mixtures == (1.01, 0.99) and n.tokens.kl
    n = mix({"name": "exo_rw"}, {"name": "listwise_dpo"}).needs
    assert n.rewards and n.group_size is None  # any K: both take groups
    n = mix({"name": "exo_rw"}, {"name": "dpo"}).needs
    assert n.rewards and n.group_size == 2  # pairs: exo_rw takes any K, so K = 2 too
    assert not mix({"name": "tr_dpo"}, {"name": "dpo"}).needs.cacheable
    n = mix({"name": "drdo"}, {"name": "dpo"}).needs
    assert n.reward_head and n.rewards and n.reference == "logps"
    n = mix({"name": "kto"}, {"name": "apo_zero_unpaired"}).needs
    assert n.rows == "unpaired"
    n = mix({"name": "exo", "temperature": 0.8}, {"name": "exo_rw", "temperature": 0.8}).needs
    assert n.tokens.temperature == 0.8


class K3(Objective):
    needs = Needs(group_size=3)

    def loss(self, g: Groups) -> LossOutput:
        return LossOutput(g.logps.sum())


@pytest.fixture
def k3_objective():
    register("k3_test")(K3)
    yield
    REGISTRY.pop("k3_test")


@pytest.mark.parametrize("parts, match", [
    ([], "parts must be a non-empty list"),
    ("dpo", "parts must be a non-empty list"),
    ([{"weight": 1.0}], "part 1 must be a mapping with a name"),
    (["dpo"], "part 1 must be a mapping with a name"),
    ([{"name": "nope"}], "unknown objective 'nope'"),
    ([{"name": "mix", "parts": [{"name": "dpo"}]}], "a part cannot itself be a mix"),
    ([{"name": "dpo"}, {"name": "k3_test"}], r"different numbers of completions per prompt \(dpo: 2, k3_test: 3\)"),
    ([{"name": "kto"}, {"name": "dpo"}], r"different kinds of rows \(kto: unpaired, dpo: preference\)"),
    ([{"name": "exo", "temperature": 0.8}, {"name": "dpo"}], "different logit temperatures"),
    ([{"name": "tr_dpo"}, {"name": "tr_dpo", "alpha": 0.3}], "tr_dpo and tr_dpo_2 would each move the one shared"),
    ([{"name": "edpo"}, {"name": "edpo", "perturb_dtype": "bfloat16"}], "logit mixtures in different dtypes"),
    ([{"name": "dpo", "weight": -1.0}], "mix part dpo: weight must be a number >= 0"),
    ([{"name": "dpo", "weight": "high"}], "mix part dpo: weight must be a number >= 0"),
    ([{"name": "dpo", "weight": True}], "mix part dpo: weight must be a number >= 0"),
    ([{"name": "dpo", "weight": float("nan")}], "mix part dpo: weight must be a number >= 0"),
    ([{"name": "dpo", "sft_weight": 1.0}], "sft_weight belongs to the mixture, not a part"),
    ([{"name": "dpo", "beta": 0.0}], r"mix part dpo: bad value for beta: 0.0 \(must be a number > 0\)"),
    ([{"name": "dpo"}, {"name": "dpo", "beta": -1.0}], "mix part dpo_2: bad value for beta"),
    ([{"name": "dpo", "betta": 0.1}], "objective dpo has no option betta"),
    ([{"name": "nca_pair", "f_divergence": "js"}], "objective nca_pair does not take f_divergence"),
    ([{"name": "dpo", "f_divergence": "alpha", "f_alpha": 1.5}], r"f_alpha must be a number in \(0, 1\)"),
    ([{"name": "aot", "use_weighting": True}], "objective aot does not take use_weighting"),
    ([{"name": "bco_pair", "momentum": 0.9}], "objective bco_pair: .*momentum"),
])
def test_mixtures_that_cannot_run_are_one_clear_user_error(k3_objective, parts, match):
    with pytest.raises(UserError, match=match) as err:
        build({"name": "mix", "parts": parts})
    assert "\n" not in str(err.value)


def test_unknown_mixture_options_are_user_errors():
    with pytest.raises(UserError, match="mix"):
        build({"name": "mix", "parts": MPO, "beta": 0.1})
    with pytest.raises(UserError, match=r"objective mix does not take f_divergence: each part takes its own"):
        build({"name": "mix", "parts": MPO, "f_divergence": "js"})


# --- (e) metrics and state ---------------------------------------------------------------------------

def test_each_parts_metrics_under_its_name_and_declared():
    from prefkit.diagnostics import logged_metrics

    obj = mix({"name": "dpo", "beta": 0.2}, {"name": "bco_pair", "weight": 0.5}, {"name": "sft"},
              {"name": "dpo", "beta": 0.4, "weight": 0.1})
    out = obj.loss(groups())
    assert set(out.metrics) == set(obj.logs)
    for key in ("dpo/loss", "dpo/rewards/margins", "bco_pair/loss", "bco_pair/rewards/margins", "bco_pair/delta",
                "sft/loss", "dpo_2/loss", "dpo_2/rewards/accuracies"):
        assert key in out.metrics, key
    close(out.metrics["dpo/loss"], dpo_value(0.2))
    close(out.metrics["dpo_2/loss"], dpo_value(0.4))
    close(out.metrics["sft/loss"], sft_value())
    close(out.metrics["dpo_2/rewards/margins"], mean(0.4 * (hw - hl) for hw, hl in hs()))
    close(out.metrics["bco_pair/delta"], batch_mean_reward(0.1))
    logged = logged_metrics(obj, None, 0.0)
    assert {"dpo/loss", "eval_dpo/loss", "bco_pair/delta", "eval_bco_pair/rewards/margins", "rewards/margins"} <= logged


def test_a_stateful_part_keeps_and_checkpoints_its_state(tmp_path):
    obj = mix(*MPO)
    bco = obj.parts[1].objective
    obj.loss(groups())
    obj.on_optimizer_step(FakeAccelerator())
    obj.loss(groups(LOGPS_B))
    obj.on_optimizer_step(FakeAccelerator())
    close(bco.delta, (batch_mean_reward(0.1) + batch_mean_reward(0.1, LOGPS_B)) / 2)
    state = obj.state_dict()
    assert state == {"bco_pair/delta": bco.delta, "bco_pair/count": 2}
    # through the checkpoint codec into a fresh mixture
    tensors: dict[str, torch.Tensor] = {}
    body = json.dumps(checkpoint.encode(state, tensors))
    save_file(tensors, tmp_path / "state.safetensors")
    resumed = mix(*MPO)
    resumed.load_state_dict(checkpoint.decode(json.loads(body), load_file(tmp_path / "state.safetensors")))
    assert resumed.state_dict() == state
    a, b = obj.loss(groups(training=False)), resumed.loss(groups(training=False))
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(mix(*MPO).loss(groups(training=False)).loss, a.loss)  # the state matters
    # a skipped step undoes its micro-batches' updates
    obj.loss(groups(LOGPS_B))
    assert obj.state_dict() != state
    obj.on_skipped_step()
    assert obj.state_dict() == state


def test_repeated_stateful_parts_keep_separate_state():
    obj = mix({"name": "bco_pair", "beta": 0.1}, {"name": "bco_pair", "beta": 0.3})
    obj.loss(groups())
    state = obj.state_dict()
    assert state["bco_pair/delta"] == pytest.approx(batch_mean_reward(0.1), rel=TOL)
    assert state["bco_pair_2/delta"] == pytest.approx(batch_mean_reward(0.3), rel=TOL)
    fresh = mix({"name": "bco_pair", "beta": 0.1}, {"name": "bco_pair", "beta": 0.3})
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_optimizer_step_metrics_bind_and_processes_reach_every_part():
    class TwoProcesses(FakeAccelerator):
        num_processes = 2

        def gather(self, x):
            return torch.cat([x, torch.full_like(x, -2.0)])

    obj = mix({"name": "edpo", "beta": 0.1, "epsilon": 0.1}, {"name": "bco_pair"})
    obj.bind(accelerator=TwoProcesses(), policy=None, reference=None)
    bco = obj.parts[1].objective
    assert isinstance(bco.accelerator, TwoProcesses)
    # the λ = 1.1 mixture raises every chosen log-prob, λ = 0.9 lowers it: every pair steps +1
    mixtures = {lam: t64(LOGPS) + t64([[d, 0.0]] * 4) for lam, d in ((1.1, 0.5), (0.9, -0.5))}
    g = groups()
    g.mixture_logps = mixtures
    out = obj.loss(g)
    close(bco.delta, (batch_mean_reward(0.1) - 2.0) / 2)  # the other process's mean counted
    assert {"edpo/kl/p_epsilon_steps", "edpo/kl/n_epsilon_steps"} <= set(out.metrics)
    logged = obj.on_optimizer_step(TwoProcesses())
    assert {"edpo/kl/beta", "edpo/kl/avg_steps", "edpo/beta"} <= set(logged) and set(logged) <= set(obj.logs)


def test_bind_hands_the_context_to_each_part():
    seen = []

    class Recorder(Objective):
        needs = Needs()

        def bind(self, **context):
            seen.append(context)

        def loss(self, g):
            return LossOutput(g.logps.sum())

    register("recorder_test")(Recorder)
    try:
        obj = mix({"name": "recorder_test"}, {"name": "dpo"}, {"name": "recorder_test"})
        obj.bind(accelerator="acc", policy="pol", reference="ref")
        assert seen == [{"accelerator": "acc", "policy": "pol", "reference": "ref"}] * 2
    finally:
        REGISTRY.pop("recorder_test")


# --- (f) configs and the align step --------------------------------------------------------------------

def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from prefkit.config import conf_dir, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("align", list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def test_the_yaml_is_mpo_and_composes_into_the_constructor():
    from omegaconf import OmegaConf

    cfg = compose("objective=mix")
    assert OmegaConf.to_container(cfg.objective.parts) == list(MPO)
    obj, sft_weight = build(OmegaConf.to_container(cfg.objective, resolve=True))
    assert [p.key for p in obj.parts] == ["dpo", "bco_pair", "sft"] and sft_weight == 0.0
    # a ListConfig handed over as it is (not through to_container) works too
    assert [p.weight for p in Mix(parts=cfg.objective.parts).parts] == [0.8, 0.2, 1.0]


def test_a_list_of_parts_on_the_command_line():
    from omegaconf import OmegaConf

    from prefkit.config import validate

    parts = "objective.parts=[{name: dpo, weight: 1.0, beta: 0.2}, {name: bco_pair, weight: 0.5}, {name: sft}]"
    validate("align", ["objective=mix", parts])
    validate("align", ["objective=mix"])
    cfg = compose("objective=mix", parts, "objective.parts.1.weight=0.25")
    obj, _ = build(OmegaConf.to_container(cfg.objective, resolve=True))
    assert [(p.key, p.weight) for p in obj.parts] == [("dpo", 1.0), ("bco_pair", 0.25), ("sft", 1.0)]
    assert obj.parts[0].objective.hparams == {"beta": 0.2}


def test_the_align_step_fills_what_the_parts_need(tmp_path):
    """AlignStep on a tiny model with an online reference: the group size reaches the token
    statistics, and the prefix sums and log Σ p² reach the parts."""
    from prefkit import synthetic
    from prefkit.data import encode
    from prefkit.embedded import embedded_dir
    from prefkit.models import load_causal_lm, load_tokenizer
    from prefkit.modules import StatsLM
    from prefkit.reference import Online
    from prefkit.stages.align import AlignStep

    arch = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
            "max_position_embeddings": 64}
    path = str(embedded_dir("logprobs", arch, tmp_path / "cache"))
    tok = load_tokenizer(path)
    policy, reference = StatsLM(load_causal_lm(path).double()), load_causal_lm(path).double().eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    rows = synthetic.preference_examples(3, 0, "train")
    groups_ = [[encode(tok, r["prompt"], c, max_length=40, max_prompt_length=12) for c in r["completions"][:2]]
               for r in rows]
    assert any(len(a.ids) - a.prompt_len != len(b.ids) - b.prompt_len for a, b in groups_)
    obj = mix({"name": "dpo", "ld_alpha": 0.5}, {"name": "nca_pair", "use_weighting": True}, {"name": "sft"})
    step = AlignStep(obj, {"train": groups_}, tok.pad_token_id, torch.device("cpu"), 8, False, Online(reference),
                     needs=obj.needs)
    loss, metrics = step(policy, "train", [0, 1, 2], True)
    captured = {}
    for part in obj.parts:  # the Groups each part received
        original = part.objective.loss

        def spy(g, original=original, key=part.key):
            captured[key] = g
            return original(g)

        part.objective.loss = spy
    again, _ = step(policy, "train", [0, 1, 2], True)
    assert torch.equal(loss.detach(), again.detach())
    assert {"dpo/loss", "nca_pair/rewards/margins", "sft/loss"} <= set(metrics)
    g = captured["dpo"]
    assert g.prefix_logps is not None and g.ref_prefix_logps is not None and g.log_sum_sq_probs is not None
    lengths = g.lengths
    shorter = lengths.argmin(dim=1)
    rows_ = torch.arange(3)
    torch.testing.assert_close(g.prefix_logps[rows_, shorter].detach(), g.logps[rows_, shorter].detach())
    assert (g.prefix_logps != g.logps).any()

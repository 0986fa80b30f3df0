"""Every registered objective against its definition, on small hand-made tensors.

The expected numbers are computed here, row by row, from the papers' formulas with `math`
and numpy, never with prefkit's own functions. Every objective is built through
`prefkit.objectives.build`, so the registry and its option validation are exercised as well.
Special cases, finite-difference checks and state live in tests/test_objectives_*.py.
"""

from __future__ import annotations

import decimal
import importlib
import itertools
import math
import pkgutil

import numpy as np
import pytest
import torch
from conftest import FakeAccelerator
from torch import nn

from prefkit.errors import UserError
from prefkit.objectives import REGISTRY, Groups, Objective, build, sft_nll, trl_metrics
from prefkit.objectives.drdo import log1mexp

# --- the data: three pairs, completion 0 = chosen -----------------------------------------------

LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0]]
REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0]]
LENS = [[3, 5], [2, 4], [6, 1]]
KL = [[0.3, 1.2], [0.1, 0.05], [2.0, 0.4]]  # Σ_t KL(π_ref ‖ π_θ) along each response (TDPO)

# three prompts with K = 3 completions, best first
LOGPS3 = [[-3.0, -4.0, -5.0], [-6.0, -2.0, -4.0], [-1.0, -1.5, -8.0]]
REF3 = [[-3.5, -3.0, -5.5], [-5.0, -3.0, -4.0], [-1.2, -1.0, -7.0]]
LENS3 = [[2, 3, 4], [5, 2, 3], [1, 2, 6]]
REWARDS3 = [[2.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.3, -0.2, -1.0]]


pytestmark = pytest.mark.usefixtures("one_thread")


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def groups(logps=LOGPS, ref=REF, lengths=LENS, **kw) -> Groups:
    return Groups(logps=t64(logps), lengths=torch.tensor(lengths), ref_logps=None if ref is None else t64(ref),
                  **{k: (t64(v) if isinstance(v, list) else v) for k, v in kw.items()})


# --- independent scalar maths -------------------------------------------------------------------

def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return math.log(sigmoid(x))


def rows(*tables):
    """Iterate the rows of several [B, K] nested lists together."""
    return zip(*tables, strict=True)


def h_pair(lp, rf):
    """(h_w, h_l, d) for one pair: log-ratios and their margin."""
    hw, hl = lp[0] - rf[0], lp[1] - rf[1]
    return hw, hl, hw - hl


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def chosen_nll(logps=LOGPS, lens=LENS) -> float:
    """Token-mean NLL of the chosen responses over the batch (TRL's `sft` term)."""
    return -sum(r[0] for r in logps) / sum(n[0] for n in lens)


def close(actual, expected, tol=1e-10):
    actual = float(actual)
    assert math.isfinite(actual)
    assert actual == pytest.approx(expected, rel=tol, abs=tol), (actual, expected)


# --- the registry -------------------------------------------------------------------------------

COVERED = {"dpo", "cdpo", "ipo", "slic", "rdpo", "exo", "exo_rw", "dpo_rw", "tdpo1", "tdpo2", "edpo", "drdo",
           "simpo", "cpo", "orpo", "rrhf", "beta_dpo", "tr_dpo", "sft",
           # hand-computed in tests/test_trl_losses.py
           "nca_pair", "robust_dpo", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
           "discopop", "sigmoid_norm", "alphapo", "listwise_dpo",
           # hand-computed in tests/test_unpaired.py
           "kto", "apo_zero_unpaired",
           # hand-computed in tests/test_mix.py
           "mix"}


def builtin_objectives() -> set[str]:
    """Names registered by prefkit's own objective modules (a test elsewhere may register its own)."""
    import prefkit.objectives as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"prefkit.objectives.{info.name}")
        for value in vars(module).values():
            if callable(value) and hasattr(value, "objective_class"):  # @objective functions
                names.add(value.objective_class.name)
            elif isinstance(value, type) and issubclass(value, Objective) and value.__module__ == module.__name__ \
                    and value.name:  # @register classes
                names.add(value.name)
    return names


def test_every_registered_objective_has_a_hand_computed_test():
    builtin = builtin_objectives()
    assert builtin <= set(REGISTRY)
    assert builtin == COVERED, f"objectives without a test here: {sorted(builtin - COVERED)}"


def test_build_returns_the_objective_and_its_sft_weight():
    obj, w = build({"name": "dpo", "beta": 0.3, "sft_weight": 0.25})
    assert obj.name == "dpo" and w == 0.25
    obj, w = build({"name": "edpo", "beta": 0.05})
    assert obj.name == "edpo" and obj.beta == 0.05 and w == 0.0


@pytest.mark.parametrize("name", sorted(COVERED))
def test_unknown_option_is_a_user_error(name):
    with pytest.raises(UserError, match=name):
        build({"name": name, "no_such_option": 1})


def test_unknown_objective_is_a_user_error():
    with pytest.raises(UserError, match="unknown objective"):
        build({"name": "nope"})


@pytest.mark.parametrize("cfg", [
    {"name": "cdpo", "label_smoothing": 0.5},
    {"name": "edpo", "epsilon": 1.0},
    {"name": "edpo", "update_rule": "median"},
    {"name": "edpo", "perturb_dtype": "float8"},
    {"name": "drdo", "unlikelihood_form": "quotient"},
    {"name": "drdo", "logp_agg": "max"},
    {"name": "drdo", "reward_source": "oracle"},
    {"name": "beta_dpo", "rho": 1.0},
    {"name": "tr_dpo", "update": "linear"},
    {"name": "tr_dpo", "sync_steps": 0},
    {"name": "robust_dpo", "label_smoothing": 0.5},
    {"name": "aot", "label_smoothing": 0.5},
    {"name": "discopop", "tau": 0.0},
])
def test_invalid_option_values_are_user_errors(cfg):
    with pytest.raises(UserError):
        obj, _ = build(cfg)
        obj.loss(groups())  # options checked at use (cdpo) raise here


def test_exo_rejects_zero_label_smoothing():
    obj, _ = build({"name": "exo", "label_smoothing": 0.0})
    with pytest.raises(UserError, match="label_smoothing"):
        obj.loss(groups())


def test_needs_declare_what_each_objective_reads():
    needs = {name: build({"name": name})[0].needs for name in sorted(COVERED)}
    assert needs["dpo"].reference == "logps" and needs["dpo"].group_size == 2 and needs["dpo"].cacheable
    for name in ("tdpo1", "tdpo2"):
        assert needs[name].reference == "logits" and needs[name].tokens.kl
    assert needs["edpo"].reference == "logits" and needs["edpo"].tokens.mixtures == (1.01, 0.99)
    for name in ("simpo", "cpo", "orpo", "rrhf", "sft", "drdo", "alphapo"):
        assert needs[name].reference == "none", name
    assert needs["drdo"].rewards and needs["drdo"].reward_head
    assert not build({"name": "drdo", "reward_source": "logp_sum"})[0].needs.reward_head
    for name in ("exo", "exo_rw", "dpo_rw", "rrhf", "sft", "listwise_dpo"):
        assert needs[name].group_size is None, name
    assert needs["exo_rw"].rewards and needs["dpo_rw"].rewards and not needs["exo"].rewards
    assert not needs["tr_dpo"].cacheable
    assert build({"name": "slic", "reference_free": True})[0].needs.reference == "none"
    assert build({"name": "slic"})[0].needs.reference == "logps"
    assert build({"name": "exo", "temperature": 0.8})[0].needs.tokens.temperature == 0.8


# --- DPO and the margin losses ------------------------------------------------------------------

def test_dpo():
    beta = 0.3
    out = build({"name": "dpo", "beta": beta})[0].loss(groups())
    close(out.loss, mean(-logsig(beta * h_pair(lp, rf)[2]) for lp, rf in rows(LOGPS, REF)))
    expected_rewards = [[beta * (a - b) for a, b in zip(lp, rf, strict=True)] for lp, rf in rows(LOGPS, REF)]
    np.testing.assert_allclose(out.rewards.numpy(), expected_rewards, rtol=1e-12)
    assert not out.rewards.requires_grad


def test_cdpo():
    beta, eps = 0.3, 0.2
    out = build({"name": "cdpo", "beta": beta, "label_smoothing": eps})[0].loss(groups())
    expected = mean(-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
                    for d in (h_pair(lp, rf)[2] for lp, rf in rows(LOGPS, REF)))
    close(out.loss, expected)


@pytest.mark.parametrize("length_normalize", [True, False])
def test_ipo(length_normalize):
    beta = 0.25
    out = build({"name": "ipo", "beta": beta, "length_normalize": length_normalize})[0].loss(groups())
    losses = []
    for lp, rf, n in rows(LOGPS, REF, LENS):
        hw, hl, _ = h_pair(lp, rf)
        if length_normalize:
            hw, hl = hw / n[0], hl / n[1]
        losses.append((hw - hl - 1 / (2 * beta)) ** 2)
    close(out.loss, mean(losses))


def test_ipo_length_normalisation_changes_the_value():
    a = build({"name": "ipo", "length_normalize": True})[0].loss(groups()).loss
    b = build({"name": "ipo", "length_normalize": False})[0].loss(groups()).loss
    assert abs(float(a) - float(b)) > 0.1


@pytest.mark.parametrize("reference_free", [False, True])
def test_slic(reference_free):
    beta = 0.8  # row 0 is past the margin 1/β (zero hinge), the others are not
    obj = build({"name": "slic", "beta": beta, "reference_free": reference_free})[0]
    g = groups(ref=None) if reference_free else groups()
    out = obj.loss(g)
    losses = []
    for lp, rf in rows(LOGPS, REF):
        d = lp[0] - lp[1] if reference_free else h_pair(lp, rf)[2]
        losses.append(max(0.0, 1 - beta * d))
    assert losses[0] == 0.0 and all(x > 0 for x in losses[1:])
    close(out.loss, mean(losses))
    expected_rewards = [[beta * x for x in lp] for lp in LOGPS] if reference_free else \
        [[beta * (a - b) for a, b in zip(lp, rf, strict=True)] for lp, rf in rows(LOGPS, REF)]
    np.testing.assert_allclose(out.rewards.numpy(), expected_rewards, rtol=1e-12)


def test_rdpo():
    beta, alpha = 0.3, 0.05
    out = build({"name": "rdpo", "beta": beta, "alpha": alpha})[0].loss(groups())
    expected = mean(-logsig(beta * h_pair(lp, rf)[2] + alpha * (n[0] - n[1])) for lp, rf, n in rows(LOGPS, REF, LENS))
    close(out.loss, expected)


# --- EXO and DPO-rw (Ji et al. 2024, Eqs. 15–19) -------------------------------------------------------------

def exo_pair_closed_form(z: float, eps: float) -> float:
    """σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)   (Ji et al. 2024, Eq. 18 at K = 2)."""
    return sigmoid(z) * (logsig(z) - math.log(1 - eps)) + sigmoid(-z) * (logsig(-z) - math.log(eps))


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_exo_pairs_closed_form():
    beta, eps = 0.5, 1e-3
    out = build({"name": "exo", "beta": beta, "label_smoothing": eps})[0].loss(groups())
    close(out.loss, mean(exo_pair_closed_form(beta * h_pair(lp, rf)[2], eps) for lp, rf in rows(LOGPS, REF)))


def test_exo_three_completions_smoothed_target():
    beta, eps = 0.7, 0.01
    out = build({"name": "exo", "beta": beta, "label_smoothing": eps})[0].loss(groups(LOGPS3, REF3, LENS3))
    log_q = np_log_softmax(beta * (np.array(LOGPS3) - np.array(REF3)))
    log_t = np.log(np.array([1 - eps, eps / 2, eps / 2]))  # (1−ε, ε/(K−1), ...)
    expected = (np.exp(log_q) * (log_q - log_t)).sum(-1).mean()
    close(out.loss, expected)


def test_exo_rw():
    beta_pi, beta_r = 0.7, 0.5
    obj = build({"name": "exo_rw", "beta_pi": beta_pi, "beta_r": beta_r})[0]
    out = obj.loss(groups(LOGPS3, REF3, LENS3, rewards=REWARDS3))
    log_q = np_log_softmax(beta_pi * (np.array(LOGPS3) - np.array(REF3)))
    log_t = np_log_softmax(np.array(REWARDS3) / beta_r)
    close(out.loss, (np.exp(log_q) * (log_q - log_t)).sum(-1).mean())


def test_dpo_rw():
    beta_pi, beta_r = 0.7, 0.5
    obj = build({"name": "dpo_rw", "beta_pi": beta_pi, "beta_r": beta_r})[0]
    out = obj.loss(groups(LOGPS3, REF3, LENS3, rewards=REWARDS3))
    log_q = np_log_softmax(beta_pi * (np.array(LOGPS3) - np.array(REF3)))
    t = np.exp(np_log_softmax(np.array(REWARDS3) / beta_r))
    close(out.loss, -(t * log_q).sum(-1).mean())


@pytest.mark.parametrize("name", ["exo_rw", "dpo_rw"])
def test_reward_objectives_without_rewards_are_user_errors(name):
    with pytest.raises(UserError, match="rewards"):
        build({"name": name})[0].loss(groups(LOGPS3, REF3, LENS3))


# --- TDPO (Zeng et al. 2024, Eqs. 13–18) --------------------------------------------------------------------

def test_tdpo1():
    beta = 0.2
    out = build({"name": "tdpo1", "beta": beta})[0].loss(groups(kl=KL))
    expected = mean(-logsig(beta * (h_pair(lp, rf)[2] - (k[1] - k[0]))) for lp, rf, k in rows(LOGPS, REF, KL))
    close(out.loss, expected)


def test_tdpo2():
    beta, alpha = 0.2, 0.5
    out = build({"name": "tdpo2", "beta": beta, "alpha": alpha})[0].loss(groups(kl=KL))
    expected = mean(-logsig(beta * (h_pair(lp, rf)[2] - alpha * (k[1] - k[0])))
                    for lp, rf, k in rows(LOGPS, REF, KL))
    close(out.loss, expected)


def test_tdpo_metrics_follow_the_official_names():
    beta = 0.2
    out = build({"name": "tdpo1", "beta": beta})[0].loss(groups(kl=KL, reverse_kl=[[0.1, 0.2]] * 3))
    close(out.metrics["kl/chosen"], mean(k[0] for k in KL))
    close(out.metrics["kl/rejected"], mean(k[1] for k in KL))
    close(out.metrics["kl/margin"], mean(k[0] - k[1] for k in KL))  # signed chosen − rejected
    # the official "rewards": β(h + SeqKL)
    close(out.metrics["tdpo/rewards_chosen"], mean(beta * (lp[0] - rf[0] + k[0]) for lp, rf, k in rows(LOGPS, REF, KL)))
    close(out.metrics["kl_reverse/rejected"], 0.2)


# --- ε-DPO (Lee et al. 2025, Eqs. 1–6) ----------------------------------------------------------------



# z = log π(y_w) − log π(y_l) under the policy, the β/(1+ε) mixture ("lo") and the β/(1−ε) mixture ("hi")
E_LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0], [-2.0, -3.0]]  # z    = [2, −0.5, −1, 1]
E_LO = [[-4.5, -7.0], [-4.3, -3.5], [-9.5, -9.0], [-2.0, -3.0]]      # z_lo = [2.5, −0.8, −0.5, 1]
E_HI = [[-5.5, -7.0], [-3.7, -3.5], [-9.7, -9.0], [-2.4, -3.0]]      # z_hi = [1.5, −0.2, −0.7, 0.6]
E_REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0], [-2.5, -2.5]]
E_LENS = [[3, 5], [2, 4], [6, 1], [2, 2]]
# row 0: z_lo > z > z_hi (Eq. 1) → β/(1+ε); row 1: z_hi > z > z_lo (Eq. 2) → β/(1−ε);
# row 2: not monotone → β; row 3: z_lo = z (strict inequalities: a tie keeps β)
E_STEPS = [1, -1, 0, 0]


def edpo_groups(eps, logps=E_LOGPS, lo=E_LO, hi=E_HI, ref=E_REF, lens=E_LENS, training=True):
    return groups(logps, ref, lens, training=training, mixture_logps={1.0 + eps: t64(lo), 1.0 - eps: t64(hi)})


def test_edpo_per_pair_beta_and_loss():
    beta, eps = 0.1, 0.1
    obj = build({"name": "edpo", "beta": beta, "epsilon": eps})[0]
    g = edpo_groups(eps)
    assert obj.steps(g).tolist() == E_STEPS
    out = obj.loss(g)
    tilde = [beta / (1 + eps), beta / (1 - eps), beta, beta]
    ds = [h_pair(lp, rf)[2] for lp, rf in rows(E_LOGPS, E_REF)]
    close(out.loss, mean(-logsig(b * d) for b, d in zip(tilde, ds, strict=True)))
    expected_rewards = [[b * (a - c) for a, c in zip(lp, rf, strict=True)]
                        for b, lp, rf in zip(tilde, E_LOGPS, E_REF, strict=True)]
    np.testing.assert_allclose(out.rewards.numpy(), expected_rewards, rtol=1e-12)
    close(out.metrics["kl/p_epsilon_steps"], 0.25)
    close(out.metrics["kl/n_epsilon_steps"], 0.25)


# a second micro-batch of the same optimizer step, both pairs with s = +1
E2_LOGPS, E2_LO, E2_HI, E2_REF = [[-1.0, -2.0], [-3.0, -3.5]], [[-0.8, -2.0], [-2.9, -3.5]], \
    [[-1.2, -2.0], [-3.1, -3.5]], [[-1.5, -1.5], [-3.2, -3.0]]


@pytest.mark.parametrize("rule", ["official", "paper"])
def test_edpo_global_beta_update_over_the_effective_batch(rule):
    beta, eps = 0.1, 0.1
    obj = build({"name": "edpo", "beta": beta, "epsilon": eps, "update_rule": rule})[0]
    obj.loss(edpo_groups(eps))
    second = edpo_groups(eps, E2_LOGPS, E2_LO, E2_HI, E2_REF, [[1, 1], [1, 1]])
    assert obj.steps(second).tolist() == [1, 1]
    obj.loss(second)
    assert obj.beta == beta  # β moves only after the optimizer step
    logs = obj.on_optimizer_step(FakeAccelerator())
    steps = [*E_STEPS, 1, 1]  # the whole effective batch: 6 pairs
    harmonic = beta / (1 + eps * mean(steps))  # official: the harmonic mean of the β̃, β/(1 + ε·mean s)
    arithmetic = mean(beta / (1 + eps * s) for s in steps)  # the paper's Eq. 6: their arithmetic mean
    expected = harmonic if rule == "official" else arithmetic
    close(obj.beta, expected, 1e-12)
    close(logs["kl/beta"], beta)
    close(logs["kl/avg_steps"], mean(steps))
    assert harmonic < arithmetic  # the two rules differ on this batch (O(ε² Var s))
    # the accumulators were reset: a step with no training batch leaves β alone
    assert obj.on_optimizer_step(FakeAccelerator()) == {} and obj.beta == pytest.approx(expected)


def test_edpo_model_dtype_perturbation_reads_the_lambda_one_mixture():
    eps = 0.1
    obj = build({"name": "edpo", "epsilon": eps, "perturb_dtype": "bfloat16"})[0]
    assert obj.needs.tokens.mixtures == (1.1, 0.9, 1.0) and obj.needs.tokens.mixture_dtype == torch.bfloat16
    g = edpo_groups(eps)
    # z read from the λ = 1 mixture (model dtype, as the official code does), not from the fp32 log-probs
    g.mixture_logps[1.0] = t64([[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0], [-2.0, -2.8]])  # row 3: z = 0.8
    assert obj.steps(g).tolist() == [1, -1, 0, 1]


# --- DRDO (Nath et al. 2024, Eq. 6) ------------------------------------------------------------------

D_REWARDS = [[1.0, 0.2], [0.5, 0.9], [2.0, -1.0]]
D_PRED = [[0.3, 0.1], [0.0, 0.6], [1.0, -0.5]]


def drdo_expected(logps, lens, rewards, pred, *, alpha, gamma, kd_weight, agg, form):
    losses = []
    for lp, n, r, p in rows(logps, lens, rewards, pred):
        zw, zl = (lp[0], lp[1]) if agg == "sum" else (lp[0] / n[0], lp[1] / n[1])
        kd = ((r[0] - r[1]) - (p[0] - p[1])) ** 2
        p_w = sigmoid(zw - zl)
        mod = (1 - p_w) ** gamma
        log1m_l = math.log(1 - math.exp(zl))
        lu = zw - log1m_l if form == "ratio" else zw + log1m_l  # log(π_w/(1−π_l)) or log(π_w(1−π_l))
        losses.append(kd_weight * kd - alpha * mod * lu)
    return mean(losses)


@pytest.mark.parametrize("form, agg", list(itertools.product(["ratio", "product"], ["sum", "mean"])))
def test_drdo_hand_computed(form, agg):
    cfg = {"alpha": 0.3, "gamma": 2.0, "kd_weight": 0.7}
    obj = build({"name": "drdo", "unlikelihood_form": form, "logp_agg": agg, **cfg})[0]
    out = obj.loss(groups(ref=None, rewards=D_REWARDS, reward_pred=D_PRED))
    expected = drdo_expected(LOGPS, LENS, D_REWARDS, D_PRED, agg=agg, form=form, **cfg)
    close(out.loss, expected, 1e-6)  # DRDO computes in float32
    np.testing.assert_allclose(out.rewards.numpy(), D_PRED, rtol=1e-6)


def test_drdo_forms_and_aggregations_all_differ():
    values = {(f, a): float(build({"name": "drdo", "unlikelihood_form": f, "logp_agg": a})[0].loss(
        groups(ref=None, rewards=D_REWARDS, reward_pred=D_PRED)).loss)
        for f, a in itertools.product(["ratio", "product"], ["sum", "mean"])}
    assert len({round(v, 6) for v in values.values()}) == 4


@pytest.mark.parametrize("source", ["logp_sum", "logp_mean"])
def test_drdo_implicit_reward_readings(source):
    obj = build({"name": "drdo", "reward_source": source, "alpha": 0.1, "gamma": 2.0})[0]
    out = obj.loss(groups(ref=None, rewards=D_REWARDS))
    pred = LOGPS if source == "logp_sum" else [[a / n[0], b / n[1]] for (a, b), n in rows(LOGPS, LENS)]
    expected = drdo_expected(LOGPS, LENS, D_REWARDS, pred, alpha=0.1, gamma=2.0, kd_weight=1.0, agg="sum",
                             form="ratio")
    close(out.loss, expected, 1e-6)


def test_drdo_kd_is_zero_when_reward_gaps_match():
    pred = [[r[0] + 3.0 * i, r[1] + 3.0 * i] for i, r in enumerate(D_REWARDS)]  # per-prompt offsets are free
    obj = build({"name": "drdo", "alpha": 0.1})[0]
    out = obj.loss(groups(ref=None, rewards=D_REWARDS, reward_pred=pred))
    assert float(out.metrics["drdo/kd"]) == pytest.approx(0.0, abs=1e-10)
    close(out.loss, float(out.metrics["drdo/pref"]), 1e-6)
    close(out.loss, drdo_expected(LOGPS, LENS, D_REWARDS, pred, alpha=0.1, gamma=2.0, kd_weight=1.0, agg="sum",
                                  form="ratio"), 1e-6)


@pytest.mark.parametrize("form", ["ratio", "product"])
def test_drdo_gamma_zero_is_minus_alpha_lu(form):
    alpha = 0.4
    out = build({"name": "drdo", "alpha": alpha, "gamma": 0.0, "kd_weight": 0.0, "unlikelihood_form": form})[0].loss(
        groups(ref=None, rewards=D_REWARDS, reward_pred=D_PRED))
    lus = [lp[0] - math.log(1 - math.exp(lp[1])) if form == "ratio" else lp[0] + math.log(1 - math.exp(lp[1]))
           for lp in LOGPS]
    close(out.loss, mean(-alpha * lu for lu in lus), 1e-6)


def test_drdo_focal_term_vanishes_as_p_w_goes_to_one():
    out = build({"name": "drdo", "kd_weight": 0.0})[0].loss(
        groups([[-1.0, -60.0]], None, [[2, 2]], rewards=[[1.0, 0.0]], reward_pred=[[1.0, 0.0]]))
    assert abs(float(out.loss)) < 1e-20 and float(out.metrics["drdo/p_w"]) == pytest.approx(1.0)


def drdo_grads(zw, zl, form, agg, detach):
    """dL/dz_w, dL/dz_l with α = 0.1, γ = 2 and unit lengths (so z is both the sum and the mean)."""
    obj = build({"name": "drdo", "alpha": 0.1, "gamma": 2.0, "unlikelihood_form": form, "logp_agg": agg,
                 "detach_modulator": detach, "kd_weight": 0.0})[0]
    z = t64([[zw, zl]]).requires_grad_(True)
    obj.loss(Groups(logps=z, lengths=torch.ones(1, 2, dtype=torch.long), rewards=t64([[1.0, 0.0]]),
                    reward_pred=t64([[1.0, 0.0]]))).loss.backward()
    return z.grad[0].tolist()


@pytest.mark.parametrize("zw, zl, form, agg, detach, dzw, dzl", [
    # finite differences on the printed loss (Eq. 6, p_w not detached, as Eq. 30 differentiates it), α = 0.1, γ = 2
    (-120.0, -118.0, "ratio", "sum", False, -2.30, 2.22),
    (-120.0, -118.0, "product", "sum", False, -2.30, 2.22),
    (-120.0, -118.0, "ratio", "sum", True, -0.078, 0.0),
    (-1.2, -1.0, "ratio", "mean", False, -0.050, 0.003),
    (-1.2, -1.0, "ratio", "mean", True, -0.030, -0.018),
    (-1.2, -1.0, "product", "mean", False, -0.075, 0.063),
    (-1.2, -1.0, "product", "mean", True, -0.030, 0.018),
    (-0.4, -0.3, "ratio", "mean", False, -0.003, -0.104),
    (-0.4, -0.3, "product", "mean", False, -0.073, 0.125),
])
def test_drdo_gradient_table(zw, zl, form, agg, detach, dzw, dzl):
    gw, gl = drdo_grads(zw, zl, form, agg, detach)
    assert gw == pytest.approx(dzw, abs=0.006 if abs(dzw) > 1 else 6e-4)
    assert gl == pytest.approx(dzl, abs=0.006 if abs(dzl) > 1 else 6e-4)


def test_drdo_gradient_signs():
    # §7 test 4: ratio + sum + non-detached pushes z_w up and z_l down
    gw, gl = drdo_grads(-40.0, -38.0, "ratio", "sum", False)
    assert gw < 0 and gl > 0
    # product: dL/dz_l ≥ 0 in every setting; strictly > 0 with mean; ≈ 0 with sum + detached
    for agg, detach in itertools.product(["sum", "mean"], [False, True]):
        for zw, zl in [(-1.2, -1.0), (-0.4, -0.3), (-3.0, -2.0), (-30.0, -28.0)]:
            if agg == "mean" or not detach:
                _, gl = drdo_grads(zw, zl, "product", agg, detach)
                assert gl > 0, (agg, detach, zw, zl)
    _, gl = drdo_grads(-120.0, -118.0, "product", "sum", True)
    assert 0 <= gl < 1e-40


def test_log1mexp_is_finite_and_exact():
    z = -torch.logspace(-6, 4, 200, dtype=torch.float64)
    out = log1mexp(z)
    assert torch.isfinite(out).all()
    expected = []
    with decimal.localcontext() as ctx:  # reference in 50-digit decimals; the series below 1e-12
        ctx.prec = 50
        for v in z.tolist():
            x = decimal.Decimal(v).exp()
            expected.append(float(-(x + x * x / 2 + x ** 3 / 3) if x < decimal.Decimal("1e-12") else (1 - x).ln()))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-13)
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e-9]))).all()  # clamped at −1e-6


def test_drdo_without_rewards_is_a_user_error():
    with pytest.raises(UserError, match="oracle rewards"):
        build({"name": "drdo"})[0].loss(groups(ref=None, reward_pred=D_PRED))


# --- reference-free baselines -------------------------------------------------------------------

def zbar(lp, n):
    return lp[0] / n[0], lp[1] / n[1]


def test_simpo():
    beta, gamma = 2.0, 0.5
    out = build({"name": "simpo", "beta": beta, "gamma": gamma})[0].loss(groups(ref=None))
    expected = mean(-logsig(beta * (zbar(lp, n)[0] - zbar(lp, n)[1]) - gamma) for lp, n in rows(LOGPS, LENS))
    close(out.loss, expected)


def test_cpo():
    beta, alpha = 0.3, 0.7
    out = build({"name": "cpo", "beta": beta, "alpha": alpha})[0].loss(groups(ref=None))
    expected = mean(-logsig(beta * (lp[0] - lp[1])) for lp in LOGPS) + alpha * chosen_nll()
    close(out.loss, expected)
    close(out.metrics["nll_loss"], chosen_nll())


def test_orpo():
    beta = 0.25
    out = build({"name": "orpo", "beta": beta})[0].loss(groups(ref=None))
    ratios = []
    for lp, n in rows(LOGPS, LENS):
        pw, pl = (math.exp(v) for v in zbar(lp, n))  # p(y) = exp(z̄)
        ratios.append(logsig(math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))))
    close(out.loss, chosen_nll() - beta * mean(ratios), 1e-6)  # the odds are float32, as in TRL
    close(out.metrics["log_odds_ratio"], mean(ratios), 1e-6)


def rrhf_expected(logps, lens, rewards=None, alpha=1.0):
    total = []
    for b, (lp, n) in enumerate(rows(logps, lens)):
        zb = [a / m for a, m in zip(lp, n, strict=True)]
        rank = 0.0
        for i, j in itertools.permutations(range(len(zb)), 2):
            better = rewards[b][i] > rewards[b][j] if rewards is not None else i < j
            if better:
                rank += max(0.0, zb[j] - zb[i])
        total.append(rank)
    return mean(total) + alpha * chosen_nll(logps, lens)


def test_rrhf_pairs():
    out = build({"name": "rrhf", "alpha": 0.5})[0].loss(groups(ref=None))
    close(out.loss, rrhf_expected(LOGPS, LENS, alpha=0.5))


def test_rrhf_groups_ranked_by_rewards_with_ties():
    out = build({"name": "rrhf", "alpha": 0.5})[0].loss(groups(LOGPS3, None, LENS3, rewards=REWARDS3))
    expected = rrhf_expected(LOGPS3, LENS3, REWARDS3, alpha=0.5)
    close(out.loss, expected)
    # the tie in row 1 (rewards 1, 1, 0) gives no pair between completions 0 and 1, whose z̄ are out of order
    assert LOGPS3[1][1] / LENS3[1][1] > LOGPS3[1][0] / LENS3[1][0]
    assert expected != pytest.approx(rrhf_expected(LOGPS3, LENS3, None, alpha=0.5))


def test_rrhf_groups_ranked_by_order():
    out = build({"name": "rrhf", "alpha": 0.0})[0].loss(groups(LOGPS3, None, LENS3))
    close(out.loss, rrhf_expected(LOGPS3, LENS3, None, alpha=0.0))


def test_sft():
    out = build({"name": "sft"})[0].loss(groups(ref=None))
    close(out.loss, chosen_nll())
    close(sft_nll(groups(ref=None)), chosen_nll())
    with pytest.raises(UserError, match="loss_on_prompt"):
        build({"name": "sft", "loss_on_prompt": True})[0].loss(groups(ref=None))


def test_trl_metric_names():
    g = groups()
    out = build({"name": "dpo", "beta": 0.3})[0].loss(g)
    m = trl_metrics(g, out)
    ds = [0.3 * h_pair(lp, rf)[2] for lp, rf in rows(LOGPS, REF)]
    close(m["rewards/margins"], mean(ds))
    close(m["rewards/accuracies"], mean(d > 0 for d in ds), 1e-7)
    close(m["logps/chosen"], mean(lp[0] for lp in LOGPS))
    close(m["logps/rejected"], mean(lp[1] for lp in LOGPS))


# --- β-DPO (Wu et al. 2024) ----------------------------------------------------------------------

def beta_dpo_expected(gaps_seq, beta0=0.1, a=0.6, m=0.9, min_beta=1e-3):
    """Losses of successive training calls with ρ = 0 (every pair kept)."""
    mu = sd = 0.0
    out = []
    for gaps in gaps_seq:
        n = len(gaps)
        gm = mean(gaps)
        std = math.sqrt(sum((x - gm) ** 2 for x in gaps) / (n - 1))
        mu, sd = m * mu + (1 - m) * gm, m * sd + (1 - m) * std
        beta = max(beta0 * (1 + a * (gm - mu)), min_beta)
        out.append((mean(-logsig(beta * d) for d in gaps), beta, mu, sd))
    return out


def test_beta_dpo_without_filtering():
    obj = build({"name": "beta_dpo", "beta": 0.1, "a": 0.6, "rho": 0.0, "momentum": 0.9})[0]
    gaps = [h_pair(lp, rf)[2] for lp, rf in rows(LOGPS, REF)]
    second = [[-1.0, -3.0], [-2.0, -2.5], [-1.0, -1.5]]
    gaps2 = [h_pair(lp, rf)[2] for lp, rf in rows(second, REF)]
    expected = beta_dpo_expected([gaps, gaps2])
    for g, (loss, beta, mu, sd) in zip([groups(), groups(second)], expected, strict=True):
        out = obj.loss(g)
        close(out.loss, loss)
        close(out.metrics["beta_dpo/beta"], beta)
        close(obj.gap_mean, mu)
        close(obj.gap_std, sd)
        assert out.metrics["beta_dpo/kept"] == 3.0


def test_beta_dpo_logs_rewards_with_the_beta_it_trains_with():
    obj = build({"name": "beta_dpo", "beta": 0.1, "a": 0.6, "rho": 0.0, "momentum": 0.9})[0]
    g = groups()
    out = obj.loss(g)
    beta = out.metrics["beta_dpo/beta"]
    assert abs(beta - 0.1) > 1e-3  # the batch β differs from the base β here
    torch.testing.assert_close(out.rewards, beta * g.logratios.detach())


def test_beta_dpo_beta_is_clamped():
    obj = build({"name": "beta_dpo", "beta": 0.1, "a": 10.0, "rho": 0.0})[0]
    out = obj.loss(groups())  # mean gap −0.27: 1 + 10·0.9·(−0.27) < 0
    assert out.metrics["beta_dpo/beta"] == 1e-3
    close(out.loss, mean(-logsig(1e-3 * h_pair(lp, rf)[2]) for lp, rf in rows(LOGPS, REF)))


def test_beta_dpo_filtering_keeps_floor_of_one_minus_rho():
    torch.manual_seed(0)
    lp5 = [[-1.0, -2.0], [-2.0, -2.5], [-3.0, -2.0], [-1.0, -1.5], [-4.0, -1.0]]
    ref5 = [[-1.5, -1.5]] * 5
    gaps = [h_pair(lp, rf)[2] for lp, rf in rows(lp5, ref5)]
    for _ in range(3):
        obj = build({"name": "beta_dpo", "beta": 0.1, "a": 0.6, "rho": 0.3, "momentum": 0.9})[0]
        out = obj.loss(groups(lp5, ref5, [[1, 1]] * 5))
        assert out.metrics["beta_dpo/kept"] == 3.0  # ⌊0.7 · 5⌋
        mu = 0.1 * mean(gaps)
        candidates = []
        for kept in itertools.combinations(range(5), 3):
            beta = 0.1 * (1 + 0.6 * (mean(gaps[i] for i in kept) - mu))
            candidates.append((mean(-logsig(beta * gaps[i]) for i in kept), beta))
        assert any(abs(float(out.loss) - lo) < 1e-12 and abs(out.metrics["beta_dpo/beta"] - b) < 1e-12
                   for lo, b in candidates)


def test_beta_dpo_filtering_drops_the_outlier():
    torch.manual_seed(0)
    lp5 = [[-1.0, -1.0], [-1.0, -1.1], [-1.0, -0.9], [-1.0, -1.05], [-1.0, -51.0]]  # gaps 0, .1, −.1, .05, 50
    ref5 = [[-1.0, -1.0]] * 5
    obj = build({"name": "beta_dpo", "beta": 0.1, "a": 0.6, "rho": 0.2, "momentum": 0.9})[0]
    out = obj.loss(groups(lp5, ref5, [[1, 1]] * 5))
    gaps = [h_pair(lp, rf)[2] for lp, rf in rows(lp5, ref5)]
    kept = gaps[:4]  # weight exp(−½((50 − M₀)/σ)²) ≈ 0: the outlier is never sampled
    beta = 0.1 * (1 + 0.6 * (mean(kept) - 0.1 * mean(gaps)))
    close(out.metrics["beta_dpo/beta"], beta)
    close(out.loss, mean(-logsig(beta * d) for d in kept))


def test_beta_dpo_eval_uses_every_pair_and_moves_nothing():
    obj = build({"name": "beta_dpo", "beta": 0.1, "a": 0.6, "rho": 0.5})[0]
    obj.gap_mean, obj.gap_std = 0.2, 0.5
    out = obj.loss(groups(training=False))
    gaps = [h_pair(lp, rf)[2] for lp, rf in rows(LOGPS, REF)]
    beta = 0.1 * (1 + 0.6 * (mean(gaps) - 0.2))
    close(out.loss, mean(-logsig(beta * d) for d in gaps))
    assert (obj.gap_mean, obj.gap_std) == (0.2, 0.5) and out.metrics["beta_dpo/kept"] == 3.0


# --- TR-DPO ------------------------------------------------------------------------------------------

def linear(weight, bias) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


P_W, P_B = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], [0.5, -0.5]
R_W, R_B = [[0.0, 1.0, -1.0], [2.0, 2.0, 2.0]], [1.0, 1.0]


@pytest.mark.parametrize("update, alpha", [("soft", 0.6), ("hard", 1.0)])
def test_tr_dpo_reference_update(update, alpha):
    policy, reference = linear(P_W, P_B), linear(R_W, R_B)
    obj = build({"name": "tr_dpo", "beta": 0.3, "update": update, "alpha": 0.6, "sync_steps": 2})[0]
    obj.bind(accelerator=FakeAccelerator(), policy=policy, reference=reference)
    close(obj.loss(groups()).loss, mean(-logsig(0.3 * h_pair(lp, rf)[2]) for lp, rf in rows(LOGPS, REF)))
    assert obj.on_optimizer_step(FakeAccelerator()) == {}  # step 1: not a sync step
    np.testing.assert_array_equal(reference.weight.detach().numpy(), R_W)
    assert obj.on_optimizer_step(FakeAccelerator()) == {"tr_dpo/reference_updates": 1}  # step 2
    w1 = alpha * np.array(P_W) + (1 - alpha) * np.array(R_W)
    np.testing.assert_allclose(reference.weight.detach().numpy(), w1, rtol=1e-6)
    np.testing.assert_allclose(reference.bias.detach().numpy(), alpha * np.array(P_B) + (1 - alpha) * np.array(R_B),
                               rtol=1e-6)
    with torch.no_grad():
        policy.weight.mul_(-2.0)
    obj.on_optimizer_step(FakeAccelerator())
    np.testing.assert_allclose(reference.weight.detach().numpy(), w1, rtol=1e-6)  # step 3: untouched
    obj.on_optimizer_step(FakeAccelerator())  # step 4: mixes with the moved policy
    np.testing.assert_allclose(reference.weight.detach().numpy(), alpha * (-2 * np.array(P_W)) + (1 - alpha) * w1,
                               rtol=1e-6)
    np.testing.assert_array_equal(policy.weight.detach().numpy(), -2 * np.array(P_W))  # the policy is never touched


def test_tr_dpo_pairs_a_sharded_references_names_with_the_policys():
    """Under FSDP/DeepSpeed the reference is a ShardableReference, whose parameters are named
    `lm.<name>`: the update mixes each with the policy's `<name>` (it raised KeyError 'lm.weight')."""
    from prefkit.modules import ShardableReference

    policy, reference = linear(P_W, P_B), ShardableReference(linear(R_W, R_B))
    assert [n for n, _ in reference.named_parameters()] == ["lm.weight", "lm.bias"]
    obj = build({"name": "tr_dpo", "update": "soft", "alpha": 0.6, "sync_steps": 1})[0]
    obj.bind(accelerator=FakeAccelerator(), policy=policy, reference=reference)
    assert obj.on_optimizer_step(FakeAccelerator()) == {"tr_dpo/reference_updates": 1}
    np.testing.assert_allclose(reference.lm.weight.detach().numpy(), 0.6 * np.array(P_W) + 0.4 * np.array(R_W),
                               rtol=1e-6)
    other = torch.nn.Sequential(linear(R_W, R_B))  # names 0.weight, 0.bias: pairable too
    obj.bind(accelerator=FakeAccelerator(), policy=policy, reference=other)
    with pytest.raises(UserError, match="reference's parameter extra has no counterpart in the policy"):
        odd = linear(R_W, R_B)
        odd.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
        obj.bind(accelerator=FakeAccelerator(), policy=policy, reference=odd)


def test_tr_dpo_needs_a_separate_reference():
    obj = build({"name": "tr_dpo"})[0]
    policy = linear(P_W, P_B)
    with pytest.raises(UserError):
        obj.bind(policy=policy, reference=None)
    with pytest.raises(UserError):
        obj.bind(policy=policy, reference=policy)

"""Special cases the specs name (one objective reducing to another, stop-gradients, the EXO
gradient identities) and finite-difference gradient checks of every objective's loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakeAccelerator
from torch.autograd import gradcheck

from prefkit.objectives import Groups, build

LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0]]
REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0]]
LENS = [[3, 5], [2, 4], [6, 1]]
KL = [[0.3, 1.2], [0.1, 0.05], [2.0, 0.4]]
LOGPS3 = [[-3.0, -4.0, -5.0], [-6.0, -2.0, -4.0], [-1.0, -1.5, -8.0]]
REF3 = [[-3.5, -3.0, -5.5], [-5.0, -3.0, -4.0], [-1.2, -1.0, -7.0]]
LENS3 = [[2, 3, 4], [5, 2, 3], [1, 2, 6]]
REWARDS3 = [[2.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.3, -0.2, -1.0]]
LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def t64(x, grad: bool = False) -> torch.Tensor:
    x = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    return x.to(torch.float64).requires_grad_(grad)


def loss_and_grads(cfg: dict, *, logps=LOGPS, ref=REF, lens=LENS, kl=None, **kw):
    """The loss and its gradients w.r.t. the log-probs (and the KL, when given)."""
    obj = build(cfg)[0]
    lp = t64(logps, True)
    k = None if kl is None else t64(kl, True)
    g = Groups(logps=lp, lengths=torch.tensor(lens), ref_logps=None if ref is None else t64(ref), kl=k, **kw)
    loss = obj.loss(g).loss
    wrt = [lp] if k is None else [lp, k]
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), *grads


def assert_close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


# --- reductions -------------------------------------------------------------------------------------

def test_tdpo2_with_alpha_zero_is_dpo():
    loss, g_lp, g_kl = loss_and_grads({"name": "tdpo2", "beta": 0.2, "alpha": 0.0}, kl=KL)
    dpo_loss, dpo_lp = loss_and_grads({"name": "dpo", "beta": 0.2})
    assert_close(loss, dpo_loss)
    assert_close(g_lp, dpo_lp)
    assert_close(g_kl, torch.zeros(3, 2))


def test_tdpo1_is_tdpo2_alpha_one_in_value_but_not_in_gradient():
    l1, lp1, kl1 = loss_and_grads({"name": "tdpo1", "beta": 0.2}, kl=KL)
    l2, lp2, kl2 = loss_and_grads({"name": "tdpo2", "beta": 0.2, "alpha": 1.0}, kl=KL)
    assert_close(l1, l2, 1e-12)
    assert_close(lp1, lp2, 1e-12)
    assert_close(kl1[:, 1], kl2[:, 1], 1e-12)  # the rejected SeqKL keeps its gradient in both
    assert (kl2[:, 0] == 0).all()  # TDPO2: d loss / d SeqKL(y_w) = 0 (stop-gradient, Eq. 18)
    assert (kl1[:, 0].abs() > 1e-3).all()  # TDPO1: it is not stopped
    # TDPO1: d/dkl_w = −d/dkl_l = −d/dh_w (β[(h_w − h_l) − (kl_l − kl_w)])
    assert_close(kl1[:, 0], lp1[:, 0], 1e-12)
    assert_close(kl1[:, 1], -lp1[:, 0], 1e-12)


def test_tdpo_with_zero_kl_is_dpo():
    for cfg in ({"name": "tdpo1", "beta": 0.2}, {"name": "tdpo2", "beta": 0.2, "alpha": 0.5}):
        loss, g_lp, _ = loss_and_grads(cfg, kl=[[0.0, 0.0]] * 3)
        dpo_loss, dpo_lp = loss_and_grads({"name": "dpo", "beta": 0.2})
        assert_close(loss, dpo_loss, 1e-12)
        assert_close(g_lp, dpo_lp, 1e-12)




@pytest.mark.parametrize("rule", ["official", "paper"])
def test_edpo_with_epsilon_zero_is_dpo(rule):
    obj = build({"name": "edpo", "beta": 0.2, "epsilon": 0.0, "update_rule": rule})[0]
    assert set(obj.needs.tokens.mixtures) == {1.0}
    lp = t64(LOGPS, True)
    # at ε = 0 every "perturbed" policy is the policy itself
    g = Groups(logps=lp, lengths=torch.tensor(LENS), ref_logps=t64(REF),
               mixture_logps={1.0: t64([[-5.1, -7.2], [-4.0, -3.4], [-9.0, -9.0]])})
    loss = obj.loss(g).loss
    (grad,) = torch.autograd.grad(loss, lp)
    dpo_loss, dpo_grad = loss_and_grads({"name": "dpo", "beta": 0.2})
    assert_close(loss, dpo_loss, 1e-12)
    assert_close(grad, dpo_grad, 1e-12)
    obj.on_optimizer_step(FakeAccelerator())
    assert obj.beta == 0.2


def test_cdpo_with_zero_smoothing_is_dpo():
    loss, grad = loss_and_grads({"name": "cdpo", "beta": 0.3, "label_smoothing": 0.0})
    dpo_loss, dpo_grad = loss_and_grads({"name": "dpo", "beta": 0.3})
    assert_close(loss, dpo_loss, 1e-12)
    assert_close(grad, dpo_grad, 1e-12)


def test_rdpo_with_alpha_zero_is_dpo():
    loss, grad = loss_and_grads({"name": "rdpo", "beta": 0.3, "alpha": 0.0})
    dpo_loss, dpo_grad = loss_and_grads({"name": "dpo", "beta": 0.3})
    assert_close(loss, dpo_loss, 1e-12)
    assert_close(grad, dpo_grad, 1e-12)


def test_dpo_rw_with_a_one_hot_target_is_dpo():
    # r/β_r = (1000, 0): softmax underflows to exactly (1, 0)
    loss, grad = loss_and_grads({"name": "dpo_rw", "beta_pi": 0.3, "beta_r": 1e-3}, rewards=t64([[1.0, 0.0]] * 3))
    dpo_loss, dpo_grad = loss_and_grads({"name": "dpo", "beta": 0.3})
    assert_close(loss, dpo_loss, 1e-12)
    assert_close(grad, dpo_grad, 1e-12)


def exo_manual(log_t: torch.Tensor, beta: float, detach_weights: bool):
    """Σ_i q_i (log q_i − log t_i), q = softmax(β h), optionally with the weights q_i detached."""
    lp = t64(LOGPS, True)
    log_q = torch.log_softmax(beta * (lp - t64(REF)), dim=-1)
    q = log_q.exp().detach() if detach_weights else log_q.exp()
    loss = (q * (log_q - log_t)).sum(-1).mean()
    return loss.detach(), torch.autograd.grad(loss, lp)[0]


def test_exo_with_detached_policy_weights_has_zero_gradient():
    eps = 1e-3
    log_t = torch.log(t64([1 - eps, eps]))
    _, detached = exo_manual(log_t, 0.5, detach_weights=True)
    assert detached.abs().max() < 1e-15  # Σ_i q_i ∇ log q_i = 0
    loss, grad = loss_and_grads({"name": "exo", "beta": 0.5, "label_smoothing": eps})
    manual_loss, manual_grad = exo_manual(log_t, 0.5, detach_weights=False)
    assert grad.abs().min() > 1e-3  # prefkit's EXO moves every completion
    assert_close(loss, manual_loss, 1e-12)
    assert_close(grad, manual_grad, 1e-12)


def test_exo_gradient_closed_form():
    # ∂L/∂z_j = q_j (log(q_j/t_j) − KL(q‖t)),  z = β h, on K = 3
    beta, eps = 0.7, 0.01
    _, grad = loss_and_grads({"name": "exo", "beta": beta, "label_smoothing": eps}, logps=LOGPS3, ref=REF3,
                             lens=LENS3)
    z = beta * (t64(LOGPS3) - t64(REF3))
    q = torch.softmax(z, -1)
    t = t64([1 - eps, eps / 2, eps / 2])
    kl = (q * (q / t).log()).sum(-1, keepdim=True)
    expected = beta * q * ((q / t).log() - kl) / 3  # mean over the 3 prompts
    assert_close(grad, expected, 1e-12)


def test_exo_pair_has_a_finite_target_margin():
    # dL/dz = σ(z)σ(−z)(z − c), c = log((1−ε)/ε): zero at z* = c, pushed back beyond it
    beta, eps = 0.5, 1e-3
    c = math.log((1 - eps) / eps)
    for z, sign in ((c, 0), (c + 1.0, 1), (c - 1.0, -1), (-5.0, -1)):
        d = z / beta
        _, grad = loss_and_grads({"name": "exo", "beta": beta, "label_smoothing": eps},
                                 logps=[[d, 0.0]], ref=[[0.0, 0.0]], lens=[[1, 1]])
        dz = grad[0, 0].item() / beta
        s = 1 / (1 + math.exp(-z))
        assert dz == pytest.approx(s * (1 - s) * (z - c), abs=1e-12)
        assert (dz > 1e-9) - (dz < -1e-9) == sign


def test_exo_official_log_target_gives_the_gradient_of_epsilon_sigmoid_minus_ten():
    # official code: unnormalised log-target [0, −10]; the same gradient as ε = σ(−10)
    eps = 1 / (1 + math.exp(10))
    loss, grad = loss_and_grads({"name": "exo", "beta": 0.5, "label_smoothing": eps})
    official_loss, official_grad = exo_manual(t64([0.0, -10.0]), 0.5, detach_weights=False)
    assert_close(grad, official_grad, 1e-12)
    assert_close(loss - official_loss, math.log1p(math.exp(-10)), 1e-12)  # log of the official target's normaliser


def test_exo_rw_with_rewards_one_zero_has_the_target_of_epsilon_sigmoid_minus_ten():
    # softmax([1, 0]/0.1) = (1−σ(−10), σ(−10))
    eps = 1 / (1 + math.exp(10))
    loss, grad = loss_and_grads({"name": "exo", "beta": 0.5, "label_smoothing": eps})
    rw_loss, rw_grad = loss_and_grads({"name": "exo_rw", "beta_pi": 0.5, "beta_r": 0.1},
                                      rewards=t64([[1.0, 0.0]] * 3))
    assert_close(rw_loss, loss, 1e-12)
    assert_close(rw_grad, grad, 1e-12)


def test_exo_pair_equals_exo_with_k_two_smoothed_target():
    # the K-way smoothed target (1−ε, ε/(K−1), ...) is (1−ε, ε) at K = 2
    eps = 0.02
    loss, grad = loss_and_grads({"name": "exo", "beta": 0.5, "label_smoothing": eps})
    manual_loss, manual_grad = exo_manual(torch.log(t64([1 - eps, eps])), 0.5, detach_weights=False)
    assert_close(loss, manual_loss, 1e-12)
    assert_close(grad, manual_grad, 1e-12)


# --- at initialisation (policy = reference) ---------------------------------------------------------

AT_INIT = [
    ({"name": "dpo", "beta": 0.1}, {}),
    ({"name": "cdpo", "beta": 0.1, "label_smoothing": 0.2}, {}),
    ({"name": "rdpo", "beta": 0.1, "alpha": 0.5}, {}),  # equal lengths below
    ({"name": "tdpo1", "beta": 0.1}, {"kl": [[0.0, 0.0]] * 3}),
    ({"name": "tdpo2", "beta": 0.1}, {"kl": [[0.0, 0.0]] * 3}),
    ({"name": "edpo", "beta": 0.1, "epsilon": 0.1}, {"mixture_logps": {1.1: LOGPS, 0.9: LOGPS}}),
    ({"name": "beta_dpo", "beta": 0.1, "rho": 0.0}, {}),
    ({"name": "tr_dpo", "beta": 0.1}, {}),
    ({"name": "dpo_rw", "beta_pi": 0.1, "beta_r": 0.1}, {"rewards": [[1.0, -1.0], [0.0, 2.0], [0.5, 0.5]]}),
    ({"name": "listwise_dpo", "beta": 0.1}, {}),
]


@pytest.mark.parametrize("cfg, extra", AT_INIT, ids=[c["name"] for c, _ in AT_INIT])
def test_loss_is_ln2_and_gradient_is_dpos_when_policy_equals_reference(cfg, extra):
    lens = [[4, 4]] * 3
    kw = {key: ({lam: t64(v) for lam, v in val.items()} if isinstance(val, dict) else t64(val))
          for key, val in extra.items()}
    kl = kw.pop("kl", None)
    loss, grad, *_ = loss_and_grads(cfg, logps=LOGPS, ref=LOGPS, lens=lens, kl=kl, **kw)
    assert_close(loss, LN2, 1e-12)
    _, dpo_grad = loss_and_grads({"name": "dpo", "beta": 0.1}, logps=LOGPS, ref=LOGPS, lens=lens)
    if cfg["name"] == "dpo_rw":  # its gradient is β_π (q − t) / B: the target matters, not only the order
        t = torch.softmax(t64(extra["rewards"]) / 0.1, -1)
        assert_close(grad, 0.1 * (0.5 - t) / 3, 1e-12)
    elif cfg["name"] == "cdpo":  # (1 − 2ε) times DPO's at d = 0
        assert_close(grad, (1 - 2 * cfg["label_smoothing"]) * dpo_grad, 1e-12)
    else:
        assert_close(grad, dpo_grad, 1e-12)


def test_dpo_rw_is_ln_k_at_initialisation():
    loss, _ = loss_and_grads({"name": "dpo_rw"}, logps=LOGPS3, ref=LOGPS3, lens=LENS3, rewards=t64(REWARDS3))
    assert_close(loss, math.log(3), 1e-12)


# --- finite differences -----------------------------------------------------------------------------

D_REWARDS = [[1.0, 0.2], [0.5, 0.9], [2.0, -1.0]]
D_PRED = [[0.3, 0.1], [0.0, 0.6], [1.0, -0.5]]
E_LO = [[-4.5, -7.0], [-4.3, -3.5], [-9.5, -9.0]]
E_HI = [[-5.5, -7.0], [-3.7, -3.5], [-9.7, -9.0]]

# (config, K = 3?, what else the groups carry, differentiable extras); float32-internal objectives
# (DRDO, ORPO's odds: they compute in fp32 like TRL) get a coarser step and tolerance.
GRADCHECKS = [
    ({"name": "dpo", "beta": 0.3}, False, {}, ()),
    ({"name": "cdpo", "beta": 0.3, "label_smoothing": 0.2}, False, {}, ()),
    ({"name": "ipo", "beta": 0.25, "length_normalize": True}, False, {}, ()),
    ({"name": "ipo", "beta": 0.25, "length_normalize": False}, False, {}, ()),
    ({"name": "slic", "beta": 0.3}, False, {}, ()),
    ({"name": "slic", "beta": 0.3, "reference_free": True}, False, {}, ()),
    ({"name": "rdpo", "beta": 0.3, "alpha": 0.05}, False, {}, ()),
    ({"name": "exo", "beta": 0.5, "label_smoothing": 1e-3}, False, {}, ()),
    ({"name": "exo", "beta": 0.7, "label_smoothing": 0.01}, True, {}, ()),
    ({"name": "exo_rw", "beta_pi": 0.7, "beta_r": 0.5}, True, {"rewards": REWARDS3}, ()),
    ({"name": "dpo_rw", "beta_pi": 0.7, "beta_r": 0.5}, True, {"rewards": REWARDS3}, ()),
    ({"name": "tdpo1", "beta": 0.2}, False, {}, ("kl",)),
    ({"name": "tdpo2", "beta": 0.2, "alpha": 0.5}, False, {}, ("kl_rejected",)),  # the chosen SeqKL is sg(·)
    ({"name": "edpo", "beta": 0.1, "epsilon": 0.1}, False, {"mixture_logps": {1.1: E_LO, 0.9: E_HI}}, ()),
    *[({"name": "drdo", "unlikelihood_form": f, "logp_agg": a, "alpha": 0.3}, False, {"rewards": D_REWARDS},
       ("reward_pred",)) for f in ("ratio", "product") for a in ("sum", "mean")],
    ({"name": "drdo", "reward_source": "logp_mean", "logp_agg": "mean"}, False, {"rewards": D_REWARDS}, ()),
    ({"name": "simpo", "beta": 2.0, "gamma": 0.5}, False, {}, ()),
    ({"name": "cpo", "beta": 0.3, "alpha": 0.7}, False, {}, ()),
    ({"name": "orpo", "beta": 0.25}, False, {}, ()),
    ({"name": "rrhf", "alpha": 0.5}, False, {}, ()),
    ({"name": "rrhf", "alpha": 0.5}, True, {"rewards": REWARDS3}, ()),
    ({"name": "beta_dpo", "beta": 0.1, "a": 0.0}, False, {"training": False}, ()),  # a = 0: β is a constant
    ({"name": "tr_dpo", "beta": 0.3}, False, {}, ()),
    ({"name": "sft"}, True, {}, ()),
    ({"name": "nca_pair", "beta": 0.3}, False, {}, ()),
    ({"name": "robust_dpo", "beta": 0.3, "label_smoothing": 0.2}, False, {}, ()),
    ({"name": "bco_pair", "beta": 0.3}, False, {"training": False}, ()),  # evaluation: δ stays a constant
    ({"name": "sppo_hard", "beta": 0.3}, False, {}, ()),
    ({"name": "aot", "beta": 0.3, "label_smoothing": 0.1}, False, {}, ()),
    ({"name": "aot_unpaired", "beta": 0.3, "label_smoothing": 0.1}, False, {}, ()),
    ({"name": "apo_zero", "beta": 0.3}, False, {}, ()),
    ({"name": "apo_down", "beta": 0.3}, False, {}, ()),
    ({"name": "discopop", "beta": 0.3, "tau": 0.5}, False, {}, ()),
    ({"name": "sigmoid_norm", "beta": 2.0}, False, {}, ()),
    ({"name": "alphapo", "beta": 2.5, "gamma": 0.3, "alpha": 0.25}, False, {}, ()),
    ({"name": "listwise_dpo", "beta": 0.3}, False, {}, ()),
    ({"name": "listwise_dpo", "beta": 0.7}, True, {}, ()),
]


@pytest.mark.parametrize("cfg, k3, extra, diff", GRADCHECKS,
                         ids=[f"{c['name']}-{i}" for i, (c, *_) in enumerate(GRADCHECKS)])
def test_gradcheck(cfg, k3, extra, diff):
    obj = build(cfg)[0]
    logps, ref, lens = (LOGPS3, REF3, LENS3) if k3 else (LOGPS, REF, LENS)
    values = {"kl": KL, "reward_pred": D_PRED, "kl_rejected": [[k[1]] for k in KL]}
    inputs = [t64(logps, True)] + [t64(values[name], True) for name in diff]
    const = {k: ({lam: t64(v) for lam, v in val.items()} if k == "mixture_logps" else
                 t64(val) if isinstance(val, list) else val) for k, val in extra.items()}

    def fn(lp, *more):
        named = dict(zip(diff, more, strict=True))
        if "kl_rejected" in named:  # differentiate w.r.t. the rejected SeqKL only
            named["kl"] = torch.cat([t64([[k[0]] for k in KL]), named.pop("kl_rejected")], dim=1)
        g = Groups(logps=lp, lengths=torch.tensor(lens), ref_logps=t64(ref), **const, **named)
        return obj.loss(g).loss

    fp32 = cfg["name"] in ("drdo", "orpo")
    assert gradcheck(fn, tuple(inputs), eps=1e-3 if fp32 else 1e-6, atol=2e-4 if fp32 else 1e-8,
                     rtol=1e-3 if fp32 else 1e-6)

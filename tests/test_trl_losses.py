"""The TRL loss types (prefkit/objectives/trl_losses.py), AlphaPO and listwise DPO.

For every objective: (a) its value on small hand-made tensors, computed here row by row with
`math` from the papers' formulas (never with prefkit's functions); (b) a finite-difference check of
its gradient w.r.t. the policy log-probs; (c) where TRL 1.16 has the loss, TRL's own loss code on
the same log-probs — DPOTrainer._compute_loss on a lightweight trainer object whose "model" returns
the given sequence log-probs, CPOTrainer.cpo_loss for AlphaPO — agreeing in value, gradient and
logged rewards; (d) listwise DPO at K = 2 is DPO, bit for bit. BCO's reward shift δ is checked
through two training batches, evaluation, a skipped step, a checkpoint and two processes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import FakeAccelerator
from safetensors.torch import load_file, save_file
from torch.autograd import gradcheck

from prefkit import checkpoint
from prefkit.objectives import Groups, build, trl_metrics

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.usefixtures("one_thread")

# four pairs, completion 0 = chosen; margins ρ = z_w − z_l and log-ratios h in different orders, so
# that AOT's sorting pairs quantiles of different rows
LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0], [-2.0, -3.0]]
REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0], [-2.4, -2.2]]
LENS = [[3, 5], [2, 4], [6, 1], [2, 3]]
# a second training batch (BCO's δ)
LOGPS_B = [[-1.0, -3.0], [-2.0, -2.5], [-1.0, -1.5], [-3.0, -1.0]]
# three prompts with K = 3 completions, best first
LOGPS3 = [[-3.0, -4.0, -5.0], [-6.0, -2.0, -4.0], [-1.0, -1.5, -8.0]]
REF3 = [[-3.5, -3.0, -5.5], [-5.0, -3.0, -4.0], [-1.2, -1.0, -7.0]]
LENS3 = [[2, 3, 4], [5, 2, 3], [1, 2, 6]]

TOL = 1e-12  # float64 throughout


def t64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).requires_grad_(grad)


def groups(logps=LOGPS, ref=REF, lens=LENS, grad: bool = False, **kw) -> Groups:
    return Groups(logps=t64(logps, grad), lengths=torch.tensor(lens), ref_logps=None if ref is None else t64(ref),
                  **kw)


# --- independent scalar maths -------------------------------------------------------------------

def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def hs(logps=LOGPS, ref=REF):
    """(h_w, h_l) per pair."""
    return [(lp[0] - rf[0], lp[1] - rf[1]) for lp, rf in zip(logps, ref, strict=True)]


def close(actual, expected, tol=TOL):
    actual = float(actual.detach() if isinstance(actual, torch.Tensor) else actual)
    assert math.isfinite(actual)
    assert actual == pytest.approx(expected, rel=tol, abs=tol), (actual, expected)


def beta_h(beta, logps=LOGPS, ref=REF):
    return [[beta * (a - b) for a, b in zip(lp, rf, strict=True)] for lp, rf in zip(logps, ref, strict=True)]


def assert_rewards(out, expected):
    assert not out.rewards.requires_grad
    torch.testing.assert_close(out.rewards, t64(expected), rtol=TOL, atol=TOL)


# --- (a) values ---------------------------------------------------------------------------------

def test_nca_pair():
    beta = 0.3
    out = build({"name": "nca_pair", "beta": beta})[0].loss(groups())
    close(out.loss, mean(-logsig(beta * hw) - 0.5 * logsig(-beta * hw) - 0.5 * logsig(-beta * hl) for hw, hl in hs()))
    assert_rewards(out, beta_h(beta))


def test_robust_dpo():
    beta, eps = 0.3, 0.2
    out = build({"name": "robust_dpo", "beta": beta, "label_smoothing": eps})[0].loss(groups())
    expected = mean(((1 - eps) * -logsig(beta * (hw - hl)) - eps * -logsig(-beta * (hw - hl))) / (1 - 2 * eps)
                    for hw, hl in hs())
    close(out.loss, expected)
    assert_rewards(out, beta_h(beta))


def test_robust_dpo_is_not_cdpo_and_zero_smoothing_is_dpo():
    a = build({"name": "robust_dpo", "beta": 0.3, "label_smoothing": 0.2})[0].loss(groups()).loss
    b = build({"name": "cdpo", "beta": 0.3, "label_smoothing": 0.2})[0].loss(groups()).loss
    assert abs(float(a) - float(b)) > 1e-2
    zero = build({"name": "robust_dpo", "beta": 0.3, "label_smoothing": 0.0})[0].loss(groups()).loss
    close(zero, mean(-logsig(0.3 * (hw - hl)) for hw, hl in hs()))


def bco_expected(delta: float, beta: float, logps=LOGPS, ref=REF) -> float:
    return mean(-logsig(beta * hw - delta) - logsig(-(beta * hl - delta)) for hw, hl in hs(logps, ref))


def batch_mean_reward(beta, logps, ref=REF) -> float:
    return mean(x for row in beta_h(beta, logps, ref) for x in row)


def test_bco_pair_reward_shift_over_two_training_batches_and_eval():
    beta = 0.3
    obj = build({"name": "bco_pair", "beta": beta})[0]
    m1, m2 = batch_mean_reward(beta, LOGPS), batch_mean_reward(beta, LOGPS_B)
    out = obj.loss(groups())
    close(obj.delta, m1)  # δ moves before the batch uses it
    close(out.loss, bco_expected(m1, beta))
    close(out.metrics["bco_pair/delta"], m1)
    assert_rewards(out, beta_h(beta))
    obj.on_optimizer_step(FakeAccelerator())
    out = obj.loss(groups(LOGPS_B))
    close(obj.delta, (m1 + m2) / 2)  # the running mean of the batch means
    close(out.loss, bco_expected((m1 + m2) / 2, beta, LOGPS_B))
    assert obj.state_dict() == {"delta": obj.delta, "count": 2}
    # evaluation uses δ and never moves it
    out = obj.loss(groups([[-7.0, -1.0]], ref=[[-1.0, -1.0]], lens=[[1, 1]], training=False))
    close(obj.delta, (m1 + m2) / 2)
    close(out.loss, -logsig(beta * -6.0 - obj.delta) - logsig(-(0.0 - obj.delta)))


def test_bco_pair_without_reward_shift_is_trl_1x():
    beta = 0.3
    obj = build({"name": "bco_pair", "beta": beta, "reward_shift": False})[0]
    for logps in (LOGPS, LOGPS_B):
        out = obj.loss(groups(logps))
        close(out.loss, bco_expected(0.0, beta, logps))
    assert obj.delta == 0.0 and out.metrics["bco_pair/delta"] == 0.0


def test_bco_pair_skipped_step_undoes_its_updates():
    obj = build({"name": "bco_pair", "beta": 0.3})[0]
    obj.loss(groups())
    obj.on_optimizer_step(FakeAccelerator())
    state = obj.state_dict()
    obj.loss(groups(LOGPS_B))  # two micro-batches of a step that is then skipped
    obj.loss(groups(LOGPS_B))
    assert obj.state_dict() != state
    obj.on_skipped_step()
    assert obj.state_dict() == state
    obj.on_skipped_step()  # nothing pending: a no-op
    assert obj.state_dict() == state
    bad = [[float("nan"), -1.0], *LOGPS_B[1:]]
    obj.loss(groups(bad))  # a non-finite batch never reaches δ
    assert obj.state_dict() == state


def round_trip(state: dict, tmp_path) -> dict:
    """What a checkpoint does with an objective's state_dict (prefkit.checkpoint's codec)."""
    tensors: dict[str, torch.Tensor] = {}
    body = json.dumps(checkpoint.encode(state, tensors))
    save_file(tensors, tmp_path / "state.safetensors")
    return checkpoint.decode(json.loads(body), load_file(tmp_path / "state.safetensors"))


def test_bco_pair_state_survives_a_checkpoint(tmp_path):
    obj = build({"name": "bco_pair", "beta": 0.3})[0]
    obj.loss(groups())
    obj.on_optimizer_step(FakeAccelerator())
    resumed = build({"name": "bco_pair", "beta": 0.3})[0]
    resumed.load_state_dict(round_trip(obj.state_dict(), tmp_path))
    assert resumed.state_dict() == obj.state_dict()
    a, b = obj.loss(groups(LOGPS_B)), resumed.loss(groups(LOGPS_B))
    assert float(a.loss) == float(b.loss) and obj.delta == resumed.delta
    fresh = build({"name": "bco_pair", "beta": 0.3})[0].loss(groups(LOGPS_B))
    assert float(fresh.loss) != float(a.loss)  # the state matters


def test_bco_pair_counts_each_process_mean_once():
    other = -2.0  # the other rank's micro-batch mean reward

    class TwoProcesses(FakeAccelerator):
        num_processes = 2

        def gather(self, x):
            return torch.cat([x, torch.full_like(x, other)])

    obj = build({"name": "bco_pair", "beta": 0.3})[0]
    obj.bind(accelerator=TwoProcesses())
    obj.loss(groups())
    m1 = batch_mean_reward(0.3, LOGPS)
    close(obj.delta, (m1 + other) / 2)
    assert obj.count == 2
    obj.loss(groups(LOGPS_B))
    close(obj.delta, (m1 + other + batch_mean_reward(0.3, LOGPS_B) + other) / 4)


def test_sppo_hard():
    beta = 0.3
    out = build({"name": "sppo_hard", "beta": beta})[0].loss(groups())
    close(out.loss, mean((hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2 for hw, hl in hs()))
    assert_rewards(out, beta_h(beta))


def smoothed_logistic(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_aot(eps):
    beta = 0.3
    out = build({"name": "aot", "beta": beta, "label_smoothing": eps})[0].loss(groups())
    rho = sorted(lp[0] - lp[1] for lp in LOGPS)
    rho_ref = sorted(rf[0] - rf[1] for rf in REF)
    assert [lp[0] - lp[1] for lp in LOGPS] != rho  # the sort changes the pairing
    close(out.loss, mean(smoothed_logistic(beta * (a - b), eps) for a, b in zip(rho, rho_ref, strict=True)))
    assert_rewards(out, beta_h(beta))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_aot_unpaired(eps):
    beta = 0.3
    out = build({"name": "aot_unpaired", "beta": beta, "label_smoothing": eps})[0].loss(groups())
    sorted_w, sorted_l = sorted(h[0] for h in hs()), sorted(h[1] for h in hs())
    close(out.loss, mean(smoothed_logistic(beta * (a - b), eps) for a, b in zip(sorted_w, sorted_l, strict=True)))
    assert_rewards(out, beta_h(beta))


def test_aot_of_one_pair_is_dpo():
    # a single pair: sorting is the identity, ρ − ρ_ref = d
    for name in ("aot", "aot_unpaired"):
        out = build({"name": name, "beta": 0.3})[0].loss(groups(LOGPS[:1], REF[:1], LENS[:1]))
        hw, hl = hs()[0]
        close(out.loss, -logsig(0.3 * (hw - hl)))


def test_apo_zero():
    beta = 0.3
    out = build({"name": "apo_zero", "beta": beta})[0].loss(groups())
    close(out.loss, mean((1 - sigmoid(beta * hw)) + sigmoid(beta * hl) for hw, hl in hs()))
    assert_rewards(out, beta_h(beta))


def test_apo_down():
    beta = 0.3
    out = build({"name": "apo_down", "beta": beta})[0].loss(groups())
    close(out.loss, mean(sigmoid(beta * hw) + (1 - sigmoid(beta * (hw - hl))) for hw, hl in hs()))
    assert_rewards(out, beta_h(beta))


def discopop_row(z: float, tau: float) -> float:
    m = sigmoid(z / tau)
    return (1 - m) * -logsig(z) + m * math.exp(-z)


@pytest.mark.parametrize("beta, tau", [(0.3, 0.05), (0.3, 2.0), (0.05, 0.05)])
def test_discopop(beta, tau):
    out = build({"name": "discopop", "beta": beta, "tau": tau})[0].loss(groups())
    close(out.loss, mean(discopop_row(beta * (hw - hl), tau) for hw, hl in hs()))
    assert_rewards(out, beta_h(beta))


def test_discopop_is_finite_where_trls_form_is_nan():
    # β d = −1000: σ(β d/τ) = 0 exactly and exp(−β d) = ∞ (float64); the loss is −log σ(β d) ≈ 1000
    out = build({"name": "discopop", "beta": 1.0, "tau": 0.05})[0].loss(groups([[-1000.0, 0.0]], [[0.0, 0.0]],
                                                                                 [[1, 1]], grad=True))
    close(out.loss, 1000.0)
    z = torch.tensor(-1000.0, dtype=torch.float64)
    m = torch.sigmoid(z / 0.05)
    assert torch.isnan((1 - m) * -torch.nn.functional.logsigmoid(z) + m * torch.exp(-z))  # TRL's expression


def test_sigmoid_norm():
    beta = 2.0
    out = build({"name": "sigmoid_norm", "beta": beta})[0].loss(groups())
    close(out.loss, mean(-logsig(beta * (hw / n[0] - hl / n[1])) for (hw, hl), n in zip(hs(), LENS, strict=True)))
    assert_rewards(out, beta_h(beta))  # unnormalised, as TRL logs them


def alpha_reward(z: float, n: int, alpha: float) -> float:
    """(1 − p̄^(−α))/α with p̄ = exp(z/n); z/n itself at α = 0."""
    zbar = z / n
    return zbar if alpha == 0 else (1 - math.exp(zbar) ** (-alpha)) / alpha


@pytest.mark.parametrize("alpha", [0.25, -0.5, 1.0, 0.0])
def test_alphapo(alpha):
    beta, gamma = 2.5, 0.3
    out = build({"name": "alphapo", "beta": beta, "gamma": gamma, "alpha": alpha})[0].loss(groups(ref=None))
    rs = [(alpha_reward(lp[0], n[0], alpha), alpha_reward(lp[1], n[1], alpha)) for lp, n in zip(LOGPS, LENS,
                                                                                                 strict=True)]
    close(out.loss, mean(-logsig(beta * (a - b) - gamma) for a, b in rs))
    assert_rewards(out, [[beta * a, beta * b] for a, b in rs])


def test_alphapo_alpha_zero_is_simpo_and_small_alpha_is_near_it():
    g = groups(ref=None, grad=True)
    simpo = build({"name": "simpo", "beta": 2.0, "gamma": 0.5})[0].loss(g).loss.detach()
    zero = build({"name": "alphapo", "beta": 2.0, "gamma": 0.5, "alpha": 0.0})[0].loss(g).loss
    close(zero, float(simpo))
    tiny = build({"name": "alphapo", "beta": 2.0, "gamma": 0.5, "alpha": 1e-9})[0].loss(g).loss
    close(tiny, float(simpo), 1e-8)


def listwise_expected(beta, logps, ref) -> float:
    """−Σ_{k<K} log(exp(u_k)/Σ_{j≥k} exp(u_j)), u = β h, per prompt; the mean over prompts."""
    total = []
    for lp, rf in zip(logps, ref, strict=True):
        u = [beta * (a - b) for a, b in zip(lp, rf, strict=True)]
        total.append(-sum(u[k] - math.log(sum(math.exp(v) for v in u[k:])) for k in range(len(u) - 1)))
    return mean(total)


def test_listwise_dpo_three_completions():
    beta = 0.7
    out = build({"name": "listwise_dpo", "beta": beta})[0].loss(groups(LOGPS3, REF3, LENS3))
    close(out.loss, listwise_expected(beta, LOGPS3, REF3))
    assert_rewards(out, beta_h(beta, LOGPS3, REF3))


def test_listwise_dpo_five_completions_and_large_gaps():
    logps = [[-1.0, -40.0, -3.0, -900.0, -2.0], [-5.0, -4.0, -3.0, -2.0, -1.0]]
    ref = [[-2.0, -1.0, -2.0, -1.0, -2.0], [-1.0, -1.0, -1.0, -1.0, -1.0]]
    out = build({"name": "listwise_dpo", "beta": 0.5})[0].loss(groups(logps, ref, [[1] * 5] * 2))
    close(out.loss, listwise_expected(0.5, logps, ref))


# --- (d) listwise DPO at K = 2 is DPO -------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.3, 2.0])
def test_listwise_dpo_with_two_completions_is_dpo_bit_for_bit(beta):
    results = []
    for name in ("dpo", "listwise_dpo"):
        g = groups(grad=True)
        out = build({"name": name, "beta": beta})[0].loss(g)
        (grad,) = torch.autograd.grad(out.loss, g.logps)
        results.append((out.loss.detach(), grad, out.rewards))
    (dpo_loss, dpo_grad, dpo_rewards), (lw_loss, lw_grad, lw_rewards) = results
    assert torch.equal(lw_loss, dpo_loss)
    assert torch.equal(lw_grad, dpo_grad)
    assert torch.equal(lw_rewards, dpo_rewards)


def test_listwise_dpo_needs_any_k_and_a_reference():
    needs = build({"name": "listwise_dpo"})[0].needs
    assert needs.reference == "logps" and needs.group_size is None


# --- (b) finite differences -----------------------------------------------------------------------

GRADCHECKS = [
    ({"name": "nca_pair", "beta": 0.3}, False, {}),
    ({"name": "robust_dpo", "beta": 0.3, "label_smoothing": 0.2}, False, {}),
    ({"name": "bco_pair", "beta": 0.3}, False, {"training": False}),  # δ set below: a constant here
    ({"name": "bco_pair", "beta": 0.3, "reward_shift": False}, False, {}),
    ({"name": "sppo_hard", "beta": 0.3}, False, {}),
    ({"name": "aot", "beta": 0.3, "label_smoothing": 0.1}, False, {}),
    ({"name": "aot_unpaired", "beta": 0.3, "label_smoothing": 0.1}, False, {}),
    ({"name": "apo_zero", "beta": 0.3}, False, {}),
    ({"name": "apo_down", "beta": 0.3}, False, {}),
    ({"name": "discopop", "beta": 0.3, "tau": 0.5}, False, {}),
    ({"name": "discopop", "beta": 0.05, "tau": 0.05}, False, {}),
    ({"name": "sigmoid_norm", "beta": 2.0}, False, {}),
    ({"name": "alphapo", "beta": 2.5, "gamma": 0.3, "alpha": 0.25}, False, {}),
    ({"name": "alphapo", "beta": 2.5, "gamma": 0.3, "alpha": -0.5}, False, {}),
    ({"name": "listwise_dpo", "beta": 0.3}, False, {}),
    ({"name": "listwise_dpo", "beta": 0.7}, True, {}),
]


@pytest.mark.parametrize("cfg, k3, extra", GRADCHECKS, ids=[f"{c['name']}-{i}" for i, (c, *_) in enumerate(GRADCHECKS)])
def test_gradcheck(cfg, k3, extra):
    obj = build(cfg)[0]
    if cfg["name"] == "bco_pair" and cfg.get("reward_shift", True):
        obj.load_state_dict({"delta": -0.37, "count": 3})
    logps, ref, lens = (LOGPS3, REF3, LENS3) if k3 else (LOGPS, REF, LENS)
    reference = None if obj.needs.reference == "none" else t64(ref)

    def fn(lp):
        return obj.loss(Groups(logps=lp, lengths=torch.tensor(lens), ref_logps=reference, **extra)).loss

    assert gradcheck(fn, (t64(logps, True),), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- (c) TRL 1.16's own loss code -----------------------------------------------------------------

class FakeLM:
    """Stands in for the policy inside DPOTrainer._compute_loss: its fused-LM-head forward returns
    per-token log-probs whose row sums are the given sequence log-probs (the whole value on each
    row's first completion token, zeros elsewhere: the sum is exact), and zeros for the rest."""

    training = True

    def __init__(self, logps: torch.Tensor, width: int):
        self.logps, self.width = logps, width

    def __call__(self, **_):
        onehot = torch.zeros(self.logps.shape[0], self.width - 1, dtype=self.logps.dtype)
        onehot[:, 0] = 1.0  # shifted position 0 = the first completion token (position 1)
        zeros = torch.zeros_like(onehot)
        return SimpleNamespace(log_probs=onehot * self.logps[:, None], entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def trl_dpo_loss(loss_type: str, logps: torch.Tensor, ref, lens, beta: float, label_smoothing: float = 0.0,
                 tau: float = 0.05):
    """TRL's DPOTrainer._compute_loss on [B, 2] log-probs (differentiable), with precomputed
    reference log-probs; returns the loss and what TRL logged."""
    from trl import DPOTrainer

    b = logps.shape[0]
    lens = torch.tensor(lens)
    width = 1 + int(lens.max())
    rows = torch.cat([lens[:, 0], lens[:, 1]])  # TRL's [chosen rows; rejected rows]
    completion = (torch.arange(width)[None, :] >= 1) & (torch.arange(width)[None, :] <= rows[:, None])
    ref = t64(ref)
    inputs = {"input_ids": torch.ones(2 * b, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
              "completion_mask": completion.long(), "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    model = FakeLM(torch.cat([logps[:, 0], logps[:, 1]]), width)
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=FakeAccelerator(), args=SimpleNamespace(discopop_tau=tau),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    loss = trainer._compute_loss(model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


DPO_CASES = [
    ("nca_pair", {"beta": 0.3}, {"name": "nca_pair", "beta": 0.3}),
    ("robust", {"beta": 0.3, "label_smoothing": 0.2}, {"name": "robust_dpo", "beta": 0.3, "label_smoothing": 0.2}),
    ("bco_pair", {"beta": 0.3}, {"name": "bco_pair", "beta": 0.3, "reward_shift": False}),
    ("sppo_hard", {"beta": 0.3}, {"name": "sppo_hard", "beta": 0.3}),
    ("aot", {"beta": 0.3}, {"name": "aot", "beta": 0.3}),
    ("aot", {"beta": 0.3, "label_smoothing": 0.1}, {"name": "aot", "beta": 0.3, "label_smoothing": 0.1}),
    ("aot_unpaired", {"beta": 0.3}, {"name": "aot_unpaired", "beta": 0.3}),
    ("aot_unpaired", {"beta": 0.3, "label_smoothing": 0.1},
     {"name": "aot_unpaired", "beta": 0.3, "label_smoothing": 0.1}),
    ("apo_zero", {"beta": 0.3}, {"name": "apo_zero", "beta": 0.3}),
    ("apo_down", {"beta": 0.3}, {"name": "apo_down", "beta": 0.3}),
    ("discopop", {"beta": 0.3, "tau": 0.05}, {"name": "discopop", "beta": 0.3, "tau": 0.05}),
    ("discopop", {"beta": 0.05, "tau": 0.5}, {"name": "discopop", "beta": 0.05, "tau": 0.5}),
    ("sigmoid_norm", {"beta": 2.0}, {"name": "sigmoid_norm", "beta": 2.0}),
    ("sigmoid", {"beta": 0.3}, {"name": "listwise_dpo", "beta": 0.3}),  # K = 2: DPO
]


def ours(cfg: dict, logps=LOGPS, ref=REF, lens=LENS, obj=None):
    obj = obj or build(cfg)[0]
    g = groups(logps, ref, lens, grad=True)
    out = obj.loss(g)
    (grad,) = torch.autograd.grad(out.loss, g.logps)
    return out.loss.detach(), grad, {k: float(v) for k, v in trl_metrics(g, out).items()}


def theirs(loss_type: str, trl_cfg: dict, logps=LOGPS, ref=REF, lens=LENS):
    lp = t64(logps, True)
    loss, logged = trl_dpo_loss(loss_type, lp, ref, lens, **trl_cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, logged


@pytest.mark.parametrize("loss_type, trl_cfg, cfg", DPO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DPO_CASES)])
def test_trl_dpo_trainer_loss(loss_type, trl_cfg, cfg):
    assert trl.__version__ == "1.16.0"
    trl_loss, trl_grad, trl_logged = theirs(loss_type, trl_cfg)
    loss, grad, logged = ours(cfg)
    assert abs(float(trl_loss)) > 1e-3 and float(trl_grad.abs().max()) > 1e-3
    torch.testing.assert_close(loss, trl_loss, rtol=TOL, atol=TOL)
    torch.testing.assert_close(grad, trl_grad, rtol=TOL, atol=TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert logged[key] == pytest.approx(trl_logged[key], rel=TOL, abs=TOL), key


def running_moments_mean(xs: list[float]) -> float:
    """Pre-1.0 TRL's RunningMoments.update, one scalar (the batch's mean reward) per call: count
    starts at 1e-24, mean += (x − mean) · 1/(count + 1)."""
    m, count = 0.0, 1e-24
    for x in xs:
        tot = count + 1
        m += (x - m) * 1 / tot
        count = tot
    return m


def test_trl_bco_pair_with_the_reward_shift_after_two_training_batches():
    # TRL 1.16's bco_pair has no δ: −log σ(β h_w) − log σ(−β h_l). With the reference log-probs
    # raised by δ/β it computes −log σ(β h_w − δ) − log σ(−(β h_l − δ)), prefkit's loss at δ.
    beta = 0.3
    obj = build({"name": "bco_pair", "beta": beta})[0]
    means = []
    for logps in (LOGPS, LOGPS_B):
        means.append(batch_mean_reward(beta, logps))
        loss, grad, _ = ours({}, logps, obj=obj)
        obj.on_optimizer_step(FakeAccelerator())
        assert obj.delta == pytest.approx(running_moments_mean(means), rel=TOL, abs=TOL)
        shifted = [[a + obj.delta / beta, b + obj.delta / beta] for a, b in REF]
        trl_loss, trl_grad, _ = theirs("bco_pair", {"beta": beta}, logps, shifted)
        torch.testing.assert_close(loss, trl_loss, rtol=TOL, atol=TOL)
        torch.testing.assert_close(grad, trl_grad, rtol=TOL, atol=TOL)
    assert obj.state_dict()["count"] == 2 and abs(obj.delta) > 0.1


def trl_alphapo_loss(logps: torch.Tensor, lens, beta: float, gamma: float, alpha: float):
    """CPOTrainer.cpo_loss as CPOConfig(loss_type="alphapo") runs it: SimPO's loss on the average
    log-probs with the α reward (and cpo_alpha = 0, no NLL term)."""
    from trl.experimental.cpo import CPOTrainer

    cpo = object.__new__(CPOTrainer)
    cpo.__dict__.update(accelerator=FakeAccelerator(), alpha=alpha, beta=beta, loss_type="simpo",
                        simpo_gamma=gamma, label_smoothing=0.0)
    zbar = logps / torch.tensor(lens)
    losses, chosen, rejected = cpo.cpo_loss(zbar[:, 0], zbar[:, 1])
    return losses.mean(), torch.stack([chosen, rejected], dim=1)


@pytest.mark.parametrize("alpha", [0.25, -0.5, 1.0, 0.0])
def test_trl_cpo_trainer_alphapo(alpha):
    from trl.experimental.cpo import CPOConfig

    config = CPOConfig(output_dir="unused", loss_type="alphapo", use_cpu=True, bf16=False, report_to="none")
    assert (config.loss_type, config.cpo_alpha) == ("simpo", 0.0)  # what TRL's "alphapo" alias runs
    beta, gamma = 2.5, 0.3
    lp = t64(LOGPS, True)
    trl_loss, trl_rewards = trl_alphapo_loss(lp, LENS, beta, gamma, alpha)
    (trl_grad,) = torch.autograd.grad(trl_loss, lp)
    g = groups(ref=None, grad=True)
    out = build({"name": "alphapo", "beta": beta, "gamma": gamma, "alpha": alpha})[0].loss(g)
    (grad,) = torch.autograd.grad(out.loss, g.logps)
    assert float(trl_grad.abs().max()) > 1e-3
    torch.testing.assert_close(out.loss.detach(), trl_loss.detach(), rtol=TOL, atol=TOL)
    torch.testing.assert_close(grad, trl_grad, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.rewards, trl_rewards.detach(), rtol=TOL, atol=TOL)


# --- options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"name": "robust_dpo", "label_smoothing": 0.5},
    {"name": "aot", "label_smoothing": -0.1},
    {"name": "aot_unpaired", "label_smoothing": 0.5},
    {"name": "discopop", "tau": 0.0},
    {"name": "bco_pair", "momentum": 0.9},
    {"name": "alphapo", "no_such_option": 1},
])
def test_invalid_options_are_user_errors(cfg):
    from prefkit.errors import UserError

    with pytest.raises(UserError, match=cfg["name"]):
        obj, _ = build(cfg)
        obj.loss(groups(ref=None if cfg["name"] == "alphapo" else REF))


NEW = ("nca_pair", "robust_dpo", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
       "sigmoid_norm", "alphapo", "listwise_dpo")


@pytest.mark.parametrize("name", NEW)
def test_yaml_defaults_build_and_declare_their_needs(name):
    import inspect

    import yaml

    from prefkit.config import conf_dir

    cfg = yaml.safe_load((conf_dir() / "objective" / f"{name}.yaml").read_text())
    assert cfg["name"] == name and cfg["sft_weight"] == 0.0
    obj, sft_weight = build(cfg)
    assert obj.name == name and sft_weight == 0.0
    options = {k: v for k, v in cfg.items() if k not in ("name", "sft_weight")}
    cls = type(obj)
    fn_params = inspect.signature(cls.__init__).parameters if not hasattr(obj, "hparams") else None
    if fn_params is None:
        assert obj.hparams == options
    else:  # a stateful class: the YAML gives every option of its constructor
        assert set(options) == set(fn_params) - {"self"}
    if name == "alphapo":
        assert obj.needs.reference == "none" and obj.needs.group_size == 2
    elif name == "listwise_dpo":
        assert obj.needs.reference == "logps" and obj.needs.group_size is None
    else:
        assert obj.needs.reference == "logps" and obj.needs.group_size == 2 and obj.needs.cacheable
    assert set(obj.logs) == ({"bco_pair/delta"} if name == "bco_pair" else set())
    g = groups(LOGPS3, None if name == "alphapo" else REF3, LENS3) if name == "listwise_dpo" else \
        groups(ref=None if name == "alphapo" else REF)
    out = obj.loss(g)
    assert set(out.metrics) == set(obj.logs)  # every metric it carries is declared
    assert out.rewards.shape == g.logps.shape and math.isfinite(float(out.loss))

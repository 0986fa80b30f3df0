"""The DPOTrainer loss types of TRL 1.16 that the other modules do not cover, each written from its
paper (and checked against TRL's code in tests/test_trl_losses.py).

Notation as in dpo.py: h(y) = log π_θ(y|x) − log π_ref(y|x) summed over response tokens, h_w and
h_l for the chosen and the rejected completion, d = h_w − h_l, r = β h the implicit reward, σ the
logistic function, sg(·) a stop-gradient. Each loss is a mean over the batch's pairs and returns
β h as `rewards`, the values TRL logs as `rewards/chosen`, `rewards/rejected`, ...

Each takes the DPOTrainer modifiers TRL 1.16 allows on it (see dpo.py and `Modifiers`): `ld_alpha`
all of them, `use_weighting` all but the sorting AOT losses, `f_divergence` those of the chosen −
rejected score difference (robust_dpo, discopop, sigmoid_norm).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import (
    Groups,
    LossOutput,
    Needs,
    Objective,
    logsigmoid,
    objective,
    options_of,
    register,
)
from prefkit.objectives.dpo import ALL_MODIFIERS, PAIRS, margin, score_margin
from prefkit.objectives.modifiers import Modifiers

LD_WPO = ("ld_alpha", "use_weighting")


def _implicit_rewards(g: Groups, beta: float) -> Tensor:
    return beta * g.logratios.detach()


def _smoothing(name: str, eps: float) -> float:
    if not 0.0 <= eps < 0.5:
        raise UserError(f"{name}: label_smoothing must be in [0, 0.5), got {eps}")
    return float(eps)


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss with labels flipped with probability ε."""
    return -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)


@objective("nca_pair", needs=PAIRS, modifiers=LD_WPO)
def nca_pair(g: Groups, beta: float = 0.1) -> LossOutput:
    """NCA for pairwise preferences (Chen et al. 2024, "Noise Contrastive Alignment of Language
    Models with Explicit Rewards", §4.1): with r = β h,
        −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l).
    Unlike DPO it acts on each completion's own reward (its absolute likelihood ratio), not only on
    the margin, so it does not push the chosen completion's likelihood down with the rejected one."""
    r = beta * g.logratios
    loss = -logsigmoid(r[:, 0]) - 0.5 * logsigmoid(-r[:, 0]) - 0.5 * logsigmoid(-r[:, 1])
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))


@objective("robust_dpo", needs=PAIRS, modifiers=ALL_MODIFIERS)
def robust_dpo(g: Groups, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO", §3.1): the unbiased
    estimate of the clean-label DPO loss when each label is flipped with probability ε,
        [(1−ε)(−log σ(β d)) − ε(−log σ(−β d))] / (1 − 2ε).
    cDPO (objective=cdpo) *adds* the flipped term; rDPO subtracts it and rescales, so its gradient
    is DPO's whenever the labels are clean in expectation. ε = 0 is DPO. (d → ψ_w − ψ_l under an
    f-divergence.)"""
    eps = _smoothing("robust_dpo", label_smoothing)
    z = beta * score_margin(g)
    loss = (-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))


@register("bco_pair")
class BCOPair(Objective):
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", §4): a binary classifier whose logit is the implicit reward r = β h, chosen = 1 and
    rejected = 0, around a reward shift δ:
        −log σ(r_w − δ) − log σ(−(r_l − δ)).
    δ is the running mean of the batches' mean rewards, δ_n = (1/n) Σ_{i≤n} mean(β h over the
    2B completions of micro-batch i) — pre-1.0 TRL's RunningMoments update of the same quantity
    (every micro-batch's mean counts once; with several processes each one's mean counts once).
    δ is updated *before* the batch's loss uses it, on training batches only (TRL also moved it
    during evaluation), is part of the checkpoint, and a skipped step (non-finite loss) undoes the
    updates of its micro-batches.

    `reward_shift: false` drops δ (δ ≡ 0): TRL ≥ 1.0's `bco_pair`, which no longer has it.
    `ld_alpha` and `use_weighting` as for DPO (δ is then the mean of the desensitised rewards)."""

    logs = ("bco_pair/delta",)
    modifier_options = options_of(LD_WPO)

    def __init__(self, beta: float = 0.1, reward_shift: bool = True, ld_alpha: float | None = None,
                 use_weighting: bool = False):
        self.beta, self.reward_shift = float(beta), bool(reward_shift)
        self.modifiers = Modifiers.parse("bco_pair", ld_alpha=ld_alpha, use_weighting=use_weighting)
        self.needs = self.modifiers.widen(Needs(reference="logps", group_size=2), "bco_pair")
        self.delta, self.count = 0.0, 0
        self._step_start: tuple[float, int] | None = None  # the state before this optimizer step's batches
        self.accelerator = None

    def bind(self, accelerator=None, **_: Any) -> None:
        self.accelerator = accelerator

    def _batch_means(self, rewards: Tensor) -> Tensor:
        """This micro-batch's mean reward, one per process."""
        mean = rewards.detach().mean().reshape(1)
        acc = self.accelerator
        return acc.gather(mean) if acc is not None and acc.num_processes > 1 else mean

    def update(self, rewards: Tensor) -> None:
        """Fold a training micro-batch's mean reward(s) into δ."""
        means = [float(m) for m in self._batch_means(rewards).double()]
        if not all(math.isfinite(m) for m in means):
            return  # the step will be skipped; never let one bad batch poison δ for good
        if self._step_start is None:
            self._step_start = (self.delta, self.count)
        count = self.count + len(means)
        self.delta += (sum(means) / len(means) - self.delta) * len(means) / count
        self.count = count

    def loss(self, g: Groups) -> LossOutput:
        g = self.modifiers.prepare(g)
        r = self.beta * g.logratios
        if self.reward_shift and g.training:
            self.update(r)
        delta = self.delta if self.reward_shift else 0.0
        loss = -logsigmoid(r[:, 0] - delta) - logsigmoid(-(r[:, 1] - delta))
        return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, self.beta), metrics={"bco_pair/delta": delta})

    def on_optimizer_step(self, accelerator) -> dict[str, float]:
        self._step_start = None
        return {}

    def on_skipped_step(self) -> None:
        if self._step_start is not None:
            self.delta, self.count = self._step_start
        self._step_start = None

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = float(state.get("delta", 0.0))
        self.count = int(state.get("count", 0))
        self._step_start = None


@objective("sppo_hard", needs=PAIRS, modifiers=LD_WPO)
def sppo_hard(g: Groups, beta: float = 0.1) -> LossOutput:
    """SPPO with hard probabilities (Wu et al. 2024, "Self-Play Preference Optimization",
    Algorithm 1, Eq. 4.7 with P̂(y_w ≻ π) = 1 and P̂(y_l ≻ π) = 0, η = 1/β):
        (h_w − 1/(2β))² + (h_l + 1/(2β))².
    Each completion's log-ratio is regressed onto its own target, ±1/(2β), as in TRL."""
    target = 0.5 / beta
    loss = (g.logratios[:, 0] - target) ** 2 + (g.logratios[:, 1] + target) ** 2
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))


@objective("aot", needs=PAIRS, modifiers=("ld_alpha",))
def aot(g: Groups, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", §3): first-order stochastic dominance of the policy's log-likelihood margins
    ρ = z_w − z_l over the reference's, ρ_ref = z_w^ref − z_l^ref, through their quantiles: both are
    sorted over the micro-batch separately and matched rank by rank, δ_(i) = ρ_(i) − ρ_ref,(i);
    loss −(1−ε) log σ(β δ_(i)) − ε log σ(−β δ_(i)) averaged over the ranks.
    The batch is the sample of the distribution: the loss depends on which pairs share a
    micro-batch (TRL sorts per device, as here); larger micro-batches estimate it better."""
    eps = _smoothing("aot", label_smoothing)
    rho = g.logps[:, 0] - g.logps[:, 1]
    rho_ref = g.ref_logps[:, 0] - g.ref_logps[:, 1]
    delta = torch.sort(rho, dim=0).values - torch.sort(rho_ref, dim=0).values
    return LossOutput(_smoothed_logistic(beta * delta, eps).mean(), rewards=_implicit_rewards(g, beta))


@objective("aot_unpaired", needs=PAIRS, modifiers=("ld_alpha",))
def aot_unpaired(g: Groups, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, §3): dominance of the chosen log-ratios' distribution over
    the rejected ones', quantile by quantile: h_w and h_l are sorted over the micro-batch
    separately, δ_(i) = h_w,(i) − h_l,(i), loss −(1−ε) log σ(β δ_(i)) − ε log σ(−β δ_(i)). The
    pairing within the batch is ignored; the same batch dependence as `aot`."""
    eps = _smoothing("aot_unpaired", label_smoothing)
    delta = torch.sort(g.logratios[:, 0], dim=0).values - torch.sort(g.logratios[:, 1], dim=0).values
    return LossOutput(_smoothed_logistic(beta * delta, eps).mean(), rewards=_implicit_rewards(g, beta))


@objective("apo_zero", needs=PAIRS, modifiers=LD_WPO)
def apo_zero(g: Groups, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", Eq. 7): (1 − σ(β h_w)) + σ(β h_l) — raise the chosen likelihood and lower the
    rejected one, each anchored at the reference (for chosen outputs better than the model's)."""
    loss = (1 - torch.sigmoid(beta * g.logratios[:, 0])) + torch.sigmoid(beta * g.logratios[:, 1])
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))


@objective("apo_down", needs=PAIRS, modifiers=LD_WPO)
def apo_down(g: Groups, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(β h_w) + (1 − σ(β d)) — lower both
    likelihoods, the rejected one more (for chosen outputs worse than the model's)."""
    loss = torch.sigmoid(beta * g.logratios[:, 0]) + (1 - torch.sigmoid(beta * margin(g)))
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))


@objective("discopop", needs=PAIRS, modifiers=ALL_MODIFIERS)
def discopop(g: Groups, beta: float = 0.05, tau: float = 0.05) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", Eq. 5): with z = β d and
    m = σ(z/τ), a blend of the logistic and the exponential loss,
        (1 − m)(−log σ(z)) + m exp(−z).
    The exponential part is computed as exp(log σ(z/τ) − z), the same number without TRL's
    0 · ∞ = NaN once σ(z/τ) underflows and exp(−z) overflows (β d ≲ −88 in float32). (d → ψ_w − ψ_l
    under an f-divergence.)"""
    if tau <= 0:
        raise UserError(f"discopop: tau must be > 0, got {tau}")
    z = beta * score_margin(g)
    loss = torch.sigmoid(-z / tau) * -logsigmoid(z) + torch.exp(logsigmoid(z / tau) - z)
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))


@objective("sigmoid_norm", needs=PAIRS, modifiers=ALL_MODIFIERS)
def sigmoid_norm(g: Groups, beta: float = 5.0) -> LossOutput:
    """Length-normalised DPO (Lambert et al. 2024, "Tülu 3", §5.1.2, Eq. 6; the normalisation of
    SimPO, Meng et al. 2024, Eq. 4): −log σ(β (h_w/|y_w| − h_l/|y_l|)).
    `rewards` stay β h (unnormalised), the values TRL logs for this loss type (as for IPO). Under an
    f-divergence h is ψ = f′(π_θ/π_ref), normalised the same way (as TRL)."""
    hbar = g.scores / g.lengths.clamp(min=1)
    loss = -logsigmoid(beta * (hbar[:, 0] - hbar[:, 1]))
    return LossOutput(g.reduce(loss), rewards=_implicit_rewards(g, beta))

"""EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment") and its
forward-KL counterpart, in the group form of §3 (Eqs. 15–19).

For a prompt with K completions, the policy's distribution over the group is
    q = softmax(β_π · h),   h_i = log π_θ^τ(y_i|x) − log π_ref^τ(y_i|x),
(τ the logit temperature applied to both models; the paper uses 0.8, prefkit defaults to 1 so
that every objective of a sweep is sampled and judged alike) and the target is either
    t = softmax(r / β_r)                        (rw: rewards for each completion), or
    t = (1 − ε, ε)                              (pref: a labelled pair, ε label smoothing).
EXO minimises the reverse KL(q ‖ t) (mode-seeking); DPO-rw the forward cross-entropy −Σ t log q.
q is never detached: with detached weights Σ_i q_i ∇ log q_i = 0 and EXO would not move.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, objective
from prefkit.tokenstats import TokenRequest


def _needs(rewards: bool, temperature: float = 1.0, group_size: int | None = None) -> Needs:
    return Needs(reference="logps", rewards=rewards, group_size=group_size,
                 tokens=TokenRequest(temperature=float(temperature)))


def reverse_kl(log_q: Tensor, log_t: Tensor) -> Tensor:
    """KL(q ‖ t) per group, from log-distributions [B, K]."""
    return (log_q.exp() * (log_q - log_t)).sum(-1)


def smoothed_target(k: int, eps: float, like: Tensor) -> Tensor:
    """log t for the best completion first: t = (1−ε, ε/(K−1), ...). At K = 2 this is EXO-pref's
    (1−ε, ε); K > 2 with preferences is prefkit's extension (the paper's EXO-pref is K = 2)."""
    if not 0.0 < eps < 0.5:
        raise UserError(f"exo: label_smoothing must be in (0, 0.5) (EXO needs ε > 0; paper: 1e-3), got {eps}")
    log_t = torch.full((k,), math.log(eps / (k - 1)), dtype=like.dtype, device=like.device)
    log_t[0] = math.log1p(-eps)
    return log_t.expand(like.shape[0], k)


@objective("exo", needs=lambda temperature=1.0, **_: _needs(False, temperature))
def exo(g: Groups, beta: float = 0.1, label_smoothing: float = 1e-3, temperature: float = 1.0) -> LossOutput:
    """EXO-pref (Eq. 18): KL(softmax(β h) ‖ (1−ε, ε)); K > 2 with a smoothed one-hot target.

    For K = 2 this equals σ(z)[log σ(z) − log(1−ε)] + σ(−z)[log σ(−z) − log ε], z = β d.
    The official code's hard-coded log-target [0, −10] corresponds to ε = σ(−10) ≈ 4.54e-5."""
    log_q = F.log_softmax(beta * g.logratios, dim=-1)
    loss = reverse_kl(log_q, smoothed_target(g.logps.shape[1], label_smoothing, log_q))
    return LossOutput(loss.mean(), rewards=beta * g.logratios.detach())


def _reward_target(g: Groups, beta_r: float) -> Tensor:
    if g.rewards is None:
        raise UserError("this objective needs rewards for every completion (dataset rows with 'rewards', "
                        "or objective.reward_model=<reward job>)")
    return F.log_softmax(g.rewards.to(g.logps.dtype) / beta_r, dim=-1)


@objective("exo_rw", needs=lambda temperature=1.0, **_: _needs(True, temperature))
def exo_rw(g: Groups, beta_pi: float = 0.1, beta_r: float = 0.1, temperature: float = 1.0) -> LossOutput:
    """EXO-rw (Eq. 15): KL(softmax(β_π h) ‖ softmax(r/β_r)) over K completions per prompt.
    Its effective RLHF β is β_π · β_r."""
    log_q = F.log_softmax(beta_pi * g.logratios, dim=-1)
    loss = reverse_kl(log_q, _reward_target(g, beta_r))
    return LossOutput(loss.mean(), rewards=beta_pi * g.logratios.detach())


@objective("dpo_rw", needs=lambda temperature=1.0, **_: _needs(True, temperature))
def dpo_rw(g: Groups, beta_pi: float = 0.1, beta_r: float = 0.1, temperature: float = 1.0) -> LossOutput:
    """DPO-rw (Eq. 19), DPO's general K-way form: −Σ_i softmax(r/β_r)_i log softmax(β_π h)_i.
    With K = 2 and a one-hot target it is DPO."""
    log_q = F.log_softmax(beta_pi * g.logratios, dim=-1)
    loss = -(_reward_target(g, beta_r).exp() * log_q).sum(-1)
    return LossOutput(loss.mean(), rewards=beta_pi * g.logratios.detach())

"""Objectives on unpaired data: one completion per prompt, labelled desirable or undesirable.

Each group is [y, y'] with y the labelled completion and y' a completion of another prompt (the
mismatched pair from which KTO estimates its reference point); `g.labels` is true for desirable y.
h(y) = log π_θ(y|x) − log π_ref(y|x), as for the pair objectives.

`rewards/accuracies` of an unpaired objective is the share of completions on their label's side
of the reference point (desirable: β(h − z0) > 0, undesirable: < 0); with as many desirable as
undesirable completions, chance is 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, objective

UNPAIRED = Needs(reference="logps", group_size=2, rows="unpaired")


def _check_weights(name: str, desirable_weight: float, undesirable_weight: float) -> None:
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise UserError(f"{name}: desirable_weight and undesirable_weight must be positive "
                        f"(got {desirable_weight}, {undesirable_weight})")


def _unpaired_loss(g: Groups, beta: float, z0: Tensor, desirable_weight: float, undesirable_weight: float,
                   desirable: Tensor, undesirable: Tensor) -> LossOutput:
    """Weighted mean of the per-completion losses, with TRL's KTO metrics."""
    if g.labels is None:
        raise UserError("this objective needs unpaired rows with labels (it was given preference groups)")
    h = g.logratios[:, 0]
    labels = g.labels.bool()
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    rewards = beta * h.detach()
    metrics: dict[str, Tensor | float] = {
        "kl": z0.detach(),
        "rewards/accuracies": (labels == (beta * (h.detach() - z0.detach()) > 0)).to(h.dtype).mean()}
    for side, mask in (("chosen", labels), ("rejected", ~labels)):
        if mask.any():
            metrics[f"rewards/{side}"] = rewards[mask].mean()
            metrics[f"logps/{side}"] = g.logps[:, 0].detach()[mask].mean()
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return LossOutput(losses.mean(), metrics=metrics)


@objective("kto", needs=UNPAIRED, logs=("kl",))
def kto(g: Groups, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, Eq. 8; TRL's KTOTrainer, loss_type "kto"):
        z0 = max(0, mean over the micro-batch of h(y')), no gradient (y' mismatched completions),
        L = λ_D (1 − σ(β(h(y) − z0))) for desirable y,  λ_U (1 − σ(β(z0 − h(y)))) for undesirable y,
    averaged over the micro-batch's completions. For unbalanced data KTO's authors advise
    λ_D n_D / (λ_U n_U) in [1, 4/3]. TRL averages z0 over all processes; prefkit over each
    process's micro-batch."""
    _check_weights("kto", desirable_weight, undesirable_weight)
    h = g.logratios[:, 0]
    z0 = g.logratios[:, 1].detach().mean().clamp(min=0)
    return _unpaired_loss(g, beta, z0, desirable_weight, undesirable_weight,
                          1 - torch.sigmoid(beta * (h - z0)), 1 - torch.sigmoid(beta * (z0 - h)))


@objective("apo_zero_unpaired", needs=UNPAIRED)
def apo_zero_unpaired(g: Groups, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> LossOutput:
    """APO-zero on unpaired data (D'Oosterlinck et al. 2024, Eq. 7 per completion; TRL's KTOTrainer,
    loss_type "apo_zero_unpaired"): 1 − σ(β h(y)) for desirable y, σ(β h(y)) for undesirable y.
    It has no reference point (z0 = 0), so the mismatched completion is not used."""
    _check_weights("apo_zero_unpaired", desirable_weight, undesirable_weight)
    h = g.logratios[:, 0]
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    return _unpaired_loss(g, beta, zero, desirable_weight, undesirable_weight,
                          1 - torch.sigmoid(beta * h), torch.sigmoid(beta * h))

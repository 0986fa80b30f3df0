"""DPO and the reference-based losses on the log-ratio margin.

Notation: h(y) = log π_θ(y|x) − log π_ref(y|x) (sums over response tokens), d = h(y_w) − h(y_l).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, logsigmoid, objective

PAIRS = Needs(reference="logps", group_size=2)


def margin(g: Groups) -> Tensor:
    return g.logratios[:, 0] - g.logratios[:, 1]


@objective("dpo", needs=PAIRS)
def dpo(g: Groups, beta: float = 0.1) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β d)."""
    return LossOutput(-logsigmoid(beta * margin(g)).mean(), rewards=beta * g.logratios.detach())


@objective("cdpo", needs=PAIRS)
def cdpo(g: Groups, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO (Mitchell 2023): labels flipped with probability ε,
    −(1−ε) log σ(β d) − ε log σ(−β d)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"cdpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    d = beta * margin(g)
    loss = -(1 - label_smoothing) * logsigmoid(d) - label_smoothing * logsigmoid(-d)
    return LossOutput(loss.mean(), rewards=beta * g.logratios.detach())


@objective("ipo", needs=PAIRS)
def ipo(g: Groups, beta: float = 0.1, length_normalize: bool = True) -> LossOutput:
    """IPO (Azar et al. 2024, Eq. 17): (d − 1/(2β))², β being the paper's τ.

    length_normalize=true divides each h(y) by its response length first (TRL's choice, confirmed
    with the IPO authors); false uses raw sums (the eric-mitchell reference code)."""
    h = g.logratios / g.lengths.clamp(min=1) if length_normalize else g.logratios
    loss = (h[:, 0] - h[:, 1] - 1 / (2 * beta)) ** 2
    return LossOutput(loss.mean(), rewards=beta * g.logratios.detach())


def _slic_needs(reference_free: bool = False, **_) -> Needs:
    return Needs(reference="none" if reference_free else "logps", group_size=2)


@objective("slic", needs=_slic_needs)
def slic(g: Groups, beta: float = 0.1, reference_free: bool = False) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023; RSO): max(0, 1 − β d), i.e. a margin of 1/β on d.
    reference_free=true uses log π_θ differences (SLiC-HF's calibration loss)."""
    if reference_free:
        d, rewards = g.logps[:, 0] - g.logps[:, 1], beta * g.logps.detach()
    else:
        d, rewards = margin(g), beta * g.logratios.detach()
    return LossOutput(torch.relu(1 - beta * d).mean(), rewards=rewards)


@objective("rdpo", needs=PAIRS)
def rdpo(g: Groups, beta: float = 0.1, alpha: float = 0.01) -> LossOutput:
    """R-DPO (Park et al. 2024), length-regularised DPO: −log σ(β d + α(|y_w| − |y_l|))."""
    length_gap = (g.lengths[:, 0] - g.lengths[:, 1]).to(g.logps.dtype)
    loss = -logsigmoid(beta * margin(g) + alpha * length_gap)
    return LossOutput(loss.mean(), rewards=beta * g.logratios.detach())

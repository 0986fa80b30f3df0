"""DPO and the reference-based losses on the log-ratio margin.

Notation: h(y) = log π_θ(y|x) − log π_ref(y|x) (sums over response tokens), d = h(y_w) − h(y_l).

TRL 1.16's DPOTrainer modifiers are options here (objectives/base.py, `Modifiers`):
- `f_divergence` (reverse_kl | forward_kl | js | alpha, with `f_alpha`): f-DPO (Wang et al. 2023)
  replaces h by ψ = f′(π_θ/π_ref) wherever the loss compares chosen and rejected (`g.scores`);
- `ld_alpha`: LD-DPO (Liu et al. 2024), log-probs of the tokens beyond the shorter response's
  length weighted by α, for the policy and the reference;
- `use_weighting`: WPO (Zhou et al. 2024), each pair's loss weighted by w(y_w) w(y_l).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, logsigmoid, objective

PAIRS = Needs(reference="logps", group_size=2)
# the modifiers of the losses of the chosen − rejected score difference (TRL's f-divergence losses)
ALL_MODIFIERS = ("f_divergence", "ld_alpha", "use_weighting")


def margin(g: Groups) -> Tensor:
    return g.logratios[:, 0] - g.logratios[:, 1]


def score_margin(g: Groups) -> Tensor:
    """ψ(y_w) − ψ(y_l): d under the reverse KL, f-DPO's margin under another f-divergence."""
    return g.scores[:, 0] - g.scores[:, 1]


@objective("dpo", needs=PAIRS, modifiers=ALL_MODIFIERS)
def dpo(g: Groups, beta: float = 0.1) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β d); with an f-divergence, f-DPO's
    −log σ(β ψ(y_w) − β ψ(y_l)) (Wang et al. 2023)."""
    return LossOutput(g.reduce(-logsigmoid(beta * score_margin(g))), rewards=beta * g.logratios.detach())


@objective("cdpo", needs=PAIRS, modifiers=ALL_MODIFIERS)
def cdpo(g: Groups, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO (Mitchell 2023): labels flipped with probability ε,
    −(1−ε) log σ(β d) − ε log σ(−β d) (d → ψ_w − ψ_l under an f-divergence: only the chosen −
    rejected difference enters, so f-DPO's argument holds as for DPO; TRL 1.16 has no cDPO)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"cdpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    d = beta * score_margin(g)
    loss = -(1 - label_smoothing) * logsigmoid(d) - label_smoothing * logsigmoid(-d)
    return LossOutput(g.reduce(loss), rewards=beta * g.logratios.detach())


@objective("ipo", needs=PAIRS, modifiers=ALL_MODIFIERS)
def ipo(g: Groups, beta: float = 0.1, length_normalize: bool = True) -> LossOutput:
    """IPO (Azar et al. 2024, Eq. 17): (d − 1/(2β))², β being the paper's τ.

    length_normalize=true divides each h(y) by its response length first (TRL's choice, confirmed
    with the IPO authors); false uses raw sums (the eric-mitchell reference code). Under an
    f-divergence h is ψ = f′(π_θ/π_ref), normalised the same way (as TRL)."""
    h = g.scores / g.lengths.clamp(min=1) if length_normalize else g.scores
    loss = (h[:, 0] - h[:, 1] - 1 / (2 * beta)) ** 2
    return LossOutput(g.reduce(loss), rewards=beta * g.logratios.detach())


def _slic_needs(reference_free: bool = False, **_) -> Needs:
    return Needs(reference="none" if reference_free else "logps", group_size=2)


@objective("slic", needs=_slic_needs, modifiers=ALL_MODIFIERS)
def slic(g: Groups, beta: float = 0.1, reference_free: bool = False) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023; RSO): max(0, 1 − β d), i.e. a margin of 1/β on d (ψ_w − ψ_l
    under an f-divergence, as TRL's `hinge`). reference_free=true uses log π_θ differences (SLiC-HF's
    calibration loss; no f-divergence then)."""
    if reference_free:
        d, rewards = g.logps[:, 0] - g.logps[:, 1], beta * g.logps.detach()
    else:
        d, rewards = score_margin(g), beta * g.logratios.detach()
    return LossOutput(g.reduce(torch.relu(1 - beta * d)), rewards=rewards)


@objective("rdpo", needs=PAIRS)
def rdpo(g: Groups, beta: float = 0.1, alpha: float = 0.01) -> LossOutput:
    """R-DPO (Park et al. 2024), length-regularised DPO: −log σ(β d + α(|y_w| − |y_l|))."""
    length_gap = (g.lengths[:, 0] - g.lengths[:, 1]).to(g.logps.dtype)
    loss = -logsigmoid(beta * margin(g) + alpha * length_gap)
    return LossOutput(loss.mean(), rewards=beta * g.logratios.detach())


@objective("listwise_dpo", needs=Needs(reference="logps", group_size=None))
def listwise_dpo(g: Groups, beta: float = 0.1) -> LossOutput:
    """Listwise DPO: DPO under the Plackett–Luce model over K ranked completions (Rafailov et al.
    2023, App. A.3, Eq. 18 and the objective after it; LiPO's "DPO-PL", Liu et al. 2024). With
    u_k = β h(y_k) and the completions best first,
        −log Π_{k=1}^{K−1} exp(u_k) / Σ_{j≥k} exp(u_j) = −Σ_{k<K} log σ(u_k − logsumexp_{j>k} u_j).
    The ranking is the data's order (ties in rewards are not used). K = 2 is DPO, to the bit: the
    k-th term is computed as log σ(β (h_k − m_k)) with m_k = max_{j>k} h_j + logsumexp_{j>k}
    (β (h_j − max))/β, which is h_K exactly when one completion is left."""
    h = g.logratios
    k = h.shape[1]
    if k < 2:
        raise UserError(f"listwise_dpo needs at least 2 completions per prompt, got {k}")
    terms = []
    for i in range(k - 1):
        rest = h[:, i + 1:]
        top = rest.max(dim=1).values
        m = top + torch.logsumexp(beta * (rest - top[:, None]), dim=1) / beta
        terms.append(logsigmoid(beta * (h[:, i] - m)))
    loss = -torch.stack(terms, dim=1).sum(dim=1)
    return LossOutput(loss.mean(), rewards=beta * g.logratios.detach())

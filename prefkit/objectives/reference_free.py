"""Reference-free baselines: no reference model is loaded for these.

Notation: z(y) = log π_θ(y|x) summed over response tokens, z̄(y) = z(y)/|y|, and NLL the
token-mean negative log-likelihood of the chosen responses over the batch (TRL's `sft` term).
"""

from __future__ import annotations

import torch

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, logsigmoid, objective, sft_nll
from prefkit.objectives.drdo import log1mexp

PAIRS = Needs(reference="none", group_size=2)


@objective("simpo", needs=PAIRS)
def simpo(g: Groups, beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO (Meng et al. 2024): −log σ(β z̄_w − β z̄_l − γ), γ the target reward margin."""
    zbar = g.mean_logps
    loss = -logsigmoid(beta * (zbar[:, 0] - zbar[:, 1]) - gamma)
    return LossOutput(loss.mean(), rewards=beta * zbar.detach())


def alpha_reward(zbar: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape r_α = (1 − p̄^(−α))/α with p̄ = exp(z̄), computed as −expm1(−α z̄)/α
    (no overflow of exp(z̄)^(−α) once exp(z̄) underflows); α → 0 gives SimPO's z̄."""
    return zbar if alpha == 0 else -torch.expm1(-alpha * zbar) / alpha


@objective("alphapo", needs=PAIRS)
def alphapo(g: Groups, beta: float = 2.0, gamma: float = 1.0, alpha: float = 0.25) -> LossOutput:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment", §3): SimPO
    with its length-normalised reward z̄ reshaped by α,
        r_α(y) = (1 − exp(z̄(y))^(−α)) / α,   loss −log σ(β r_α(y_w) − β r_α(y_l) − γ).
    α = 0 is SimPO. dr_α/dz̄ = exp(−α z̄): α > 0 moves the gradient's weight towards unlikely
    completions, α < 0 towards likely ones (the paper: larger α, less likelihood displacement).
    TRL: CPOTrainer with loss_type="alphapo" (SimPO's loss, cpo_alpha = 0); `rewards` are β r_α."""
    r = alpha_reward(g.mean_logps, alpha)
    loss = -logsigmoid(beta * (r[:, 0] - r[:, 1]) - gamma)
    return LossOutput(loss.mean(), rewards=beta * r.detach())


@objective("cpo", needs=PAIRS, logs=("nll_loss",))
def cpo(g: Groups, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """CPO (Xu et al. 2024): −log σ(β (z_w − z_l)) + α · NLL(y_w)."""
    nll = sft_nll(g)
    loss = -logsigmoid(beta * (g.logps[:, 0] - g.logps[:, 1])).mean() + alpha * nll
    return LossOutput(loss, rewards=beta * g.logps.detach(), metrics={"nll_loss": nll.detach()})


@objective("orpo", needs=PAIRS, logs=("nll_loss", "log_odds_ratio", "log_odds_chosen"))
def orpo(g: Groups, beta: float = 0.1) -> LossOutput:
    """ORPO (Hong et al. 2024, Eq. 6): NLL(y_w) − β log σ(log odds(y_w) − log odds(y_l)),
    odds(y) = p/(1−p) with p = exp(z̄). The NLL is over response tokens as in the paper (TRL's
    ORPOTrainer also counts the prompt's tokens)."""
    zbar = g.mean_logps.float()
    log_odds = (zbar[:, 0] - zbar[:, 1]) - (log1mexp(zbar[:, 0]) - log1mexp(zbar[:, 1]))
    ratio = logsigmoid(log_odds)
    nll = sft_nll(g)
    loss = nll - beta * ratio.mean()
    return LossOutput(loss, rewards=beta * zbar.detach(),
                      metrics={"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                               "log_odds_chosen": log_odds.detach().mean()})


@objective("rrhf", needs=Needs(reference="none", group_size=None), logs=("rrhf/rank_loss", "nll_loss"))
def rrhf(g: Groups, alpha: float = 1.0) -> LossOutput:
    """RRHF (Yuan et al. 2023): Σ over ranked pairs (i better than j) of max(0, z̄_j − z̄_i), plus
    α · NLL of the best response. Ranks come from the rewards when the data has them (ties give
    no pair), else from the order (best first)."""
    zbar = g.mean_logps
    k = zbar.shape[1]
    if g.rewards is not None:
        better = g.rewards[:, :, None] > g.rewards[:, None, :]  # [B, i, j]: i ranked above j
    else:
        better = torch.ones(k, k, dtype=torch.bool, device=zbar.device).triu(1).expand(zbar.shape[0], k, k)
    gaps = torch.relu(zbar[:, None, :] - zbar[:, :, None])  # [B, i, j] = max(0, z̄_j − z̄_i)
    rank = (gaps * better).sum((1, 2))
    nll = sft_nll(g)
    return LossOutput(rank.mean() + alpha * nll, rewards=zbar.detach(),
                      metrics={"rrhf/rank_loss": rank.detach().mean(), "nll_loss": nll.detach()})


@objective("sft", needs=Needs(reference="none", group_size=None))
def sft(g: Groups, loss_on_prompt: bool = False) -> LossOutput:
    """Supervised fine-tuning on the preferred completion only (\"preferred-FT\"): token-mean NLL."""
    if loss_on_prompt:
        raise UserError("objective.loss_on_prompt is only available in the sft stage")
    return LossOutput(sft_nll(g), rewards=g.mean_logps.detach())

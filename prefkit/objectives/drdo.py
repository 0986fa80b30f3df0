"""DRDO (Nath et al. 2024, "Simultaneous Reward Distillation and Preference Learning"),
Eq. 6 (its gradient: Eqs. 30–33). Reference-free: only the student is in memory.

    L = kd_weight · (r*(x,y_w) − r*(x,y_l) − (r̂_w − r̂_l))²
        − α (1 − p_w)^γ · lu,        p_w = σ(z_w − z_l),  z = log π_θ(y|x)

r* are the oracle's (precomputed) rewards; r̂ the student's own reward estimates, by default a
scalar head on its last hidden state (`reward_source: head`). The log-"unlikelihood" lu has two
readings, because the paper's text and maths disagree: `ratio`, the printed Eq. 6, lu = z_w −
log(1 − π(y_l)), whose minimisation raises π(y_l) (the gradient of Eqs. 30–33 says so while the
text says it lowers it); `product`, the stated intent, lu = z_w + log(1 − π(y_l)). `logp_agg`
chooses summed (TRL's, the default) or mean log-probs for z; the focal modulator is
differentiated through (as Eq. 30 does) unless `detach_modulator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, Objective, register


def log1mexp(z: Tensor) -> Tensor:
    """log(1 − e^z) for z < 0, stable on both sides of −ln 2."""
    z = z.clamp(max=-1e-6)
    return torch.where(z > -0.6931471805599453, torch.log(-torch.expm1(z)), torch.log1p(-torch.exp(z)))


@register("drdo")
class DRDO(Objective):
    logs = ("drdo/kd", "drdo/pref", "drdo/p_w", "drdo/modulator", "drdo/rhat_acc", "drdo/oracle_agree",
            "drdo/logp_acc")

    def __init__(self, alpha: float = 0.1, gamma: float = 2.0, kd_weight: float = 1.0, reward_source: str = "head",
                 logp_agg: str = "sum", unlikelihood_form: str = "ratio", detach_modulator: bool = False):
        choices = {"reward_source": (reward_source, ("head", "logp_sum", "logp_mean")),
                   "logp_agg": (logp_agg, ("sum", "mean")),
                   "unlikelihood_form": (unlikelihood_form, ("ratio", "product"))}
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise UserError(f"drdo: {key} must be one of {', '.join(valid)}, got {value}")
        if unlikelihood_form == "ratio" and logp_agg == "mean":
            import logging
            logging.getLogger("prefkit").warning(
                "drdo: unlikelihood_form=ratio with logp_agg=mean raises π(y_l) (the printed Eq. 6's sign); intended?")
        self.alpha, self.gamma, self.kd_weight = float(alpha), float(gamma), float(kd_weight)
        self.reward_source, self.logp_agg = reward_source, logp_agg
        self.unlikelihood_form, self.detach_modulator = unlikelihood_form, bool(detach_modulator)
        self.needs = Needs(reference="none", rewards=True, group_size=2, reward_head=reward_source == "head")

    def loss(self, g: Groups) -> LossOutput:
        if g.rewards is None:
            raise UserError("drdo needs oracle rewards for chosen and rejected (dataset rewards or a reward model)")
        z = g.logps if self.logp_agg == "sum" else g.mean_logps
        z = z.float()
        if self.reward_source == "head":
            rhat = g.reward_pred.float()
        else:
            rhat = (g.logps if self.reward_source == "logp_sum" else g.mean_logps).float()
        target = (g.rewards[:, 0] - g.rewards[:, 1]).float()
        kd = (target - (rhat[:, 0] - rhat[:, 1])) ** 2

        margin = z[:, 0] - z[:, 1]
        modulator = torch.exp(self.gamma * F.logsigmoid(-margin))  # (1 − p_w)^γ
        if self.detach_modulator:
            modulator = modulator.detach()
        log1m_rejected = log1mexp(z[:, 1])
        lu = z[:, 0] - log1m_rejected if self.unlikelihood_form == "ratio" else z[:, 0] + log1m_rejected
        pref = -self.alpha * modulator * lu
        loss = (self.kd_weight * kd + pref).mean()
        metrics = {
            "drdo/kd": kd.detach().mean(), "drdo/pref": pref.detach().mean(),
            "drdo/p_w": torch.sigmoid(margin).detach().mean(), "drdo/modulator": modulator.detach().mean(),
            "drdo/rhat_acc": (rhat[:, 0] > rhat[:, 1]).float().mean(),
            "drdo/oracle_agree": (torch.sign(rhat[:, 0] - rhat[:, 1]) == torch.sign(target)).float().mean(),
            "drdo/logp_acc": (g.logps[:, 0] > g.logps[:, 1]).float().mean(),
        }
        return LossOutput(loss, rewards=rhat.detach(), metrics=metrics)

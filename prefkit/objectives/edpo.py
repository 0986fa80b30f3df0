"""ε-DPO (Lee et al. 2025, "KL Penalty Control via Perturbation for DPO"), §3, Eqs. 1–6 and Algorithm 1.

Per pair, DPO's β is perturbed to β/(1+ε) or β/(1−ε) depending on how the preference logit
z = log π(y_w) − log π(y_l) moves under two cheaply estimated policies: the token-level logit
mixtures (1+ε) f_θ − ε f_ref (≈ the policy DPO would reach at β/(1+ε)) and (1−ε) f_θ + ε f_ref
(≈ at β/(1−ε)), each renormalised per position (never a mix of sequence log-probs):

    z(β/(1+ε)) > z(β) > z(β/(1−ε))  →  β̃ = β/(1+ε)   (step +1)
    z(β/(1+ε)) < z(β) < z(β/(1−ε))  →  β̃ = β/(1−ε)   (step −1)
    otherwise                        →  β̃ = β         (step  0)

The loss is DPO with the per-pair constant β̃ (no gradient through the decision). After every
optimizer step the global β moves to the mean of the β̃ of the whole effective batch (every
micro-batch and process): the official code's harmonic rule β ← β/(1 + ε·mean(s)) by default,
or the paper's Eq. 6 arithmetic mean. β is checkpointed, so a resumed run continues from it.
"""

from __future__ import annotations

from typing import Any

import torch

from prefkit.errors import UserError
from prefkit.models import torch_dtype
from prefkit.objectives.base import Groups, LossOutput, Needs, Objective, logsigmoid, register
from prefkit.tokenstats import TokenRequest


def perturbation_steps(g: Groups, eps: float) -> torch.Tensor:
    """s ∈ {+1, 0, −1} per pair (strict inequalities; ties keep β): +1 when the preference logit
    decreases with β (Eq. 1, β⁻ fits better), −1 when it increases (Eq. 2, β⁺)."""
    cur = g.mixture_logps[1.0] if 1.0 in g.mixture_logps else g.logps.detach()
    lo, hi = g.mixture_logps[1.0 + eps], g.mixture_logps[1.0 - eps]
    z, z_lo, z_hi = cur[:, 0] - cur[:, 1], lo[:, 0] - lo[:, 1], hi[:, 0] - hi[:, 1]
    decreasing = (z_lo > z) & (z > z_hi)  # Eq. 1: lowering β separates the pair better
    increasing = (z_hi > z) & (z > z_lo)  # Eq. 2
    return decreasing.long() - increasing.long()


@register("edpo")
class EpsilonDPO(Objective):
    logs = ("kl/p_epsilon_steps", "kl/n_epsilon_steps", "kl/beta", "kl/avg_steps", "beta")

    def __init__(self, beta: float = 0.01, epsilon: float = 0.01, update_rule: str = "official",
                 perturb_dtype: str = "float32"):
        if not 0.0 <= epsilon < 1.0:
            raise UserError(f"edpo: epsilon must be in [0, 1), got {epsilon}")
        if update_rule not in ("official", "paper"):
            raise UserError(f"edpo: update_rule must be official or paper, got {update_rule}")
        self.beta, self.epsilon, self.update_rule = float(beta), float(epsilon), update_rule
        self.dtype = torch_dtype(perturb_dtype)
        lambdas = (1.0 + epsilon, 1.0 - epsilon) + (() if self.dtype == torch.float32 else (1.0,))
        self.needs = Needs(reference="logits", group_size=2,
                           tokens=TokenRequest(mixtures=lambdas, mixture_dtype=self.dtype))
        self._reset()

    def _reset(self) -> None:
        self._sum_steps = self._sum_inverse = self._count = 0.0

    def steps(self, g: Groups) -> torch.Tensor:
        return perturbation_steps(g, self.epsilon)

    def loss(self, g: Groups) -> LossOutput:
        s = self.steps(g)
        beta_tilde = self.beta / (1.0 + self.epsilon * s.to(g.logps.dtype))
        d = g.logratios[:, 0] - g.logratios[:, 1]
        loss = -logsigmoid(beta_tilde * d).mean()
        if g.training:
            self._sum_steps += float(s.sum())
            self._sum_inverse += float((1.0 / (1.0 + self.epsilon * s.double())).sum())
            self._count += s.numel()
        metrics = {"kl/p_epsilon_steps": (s == 1).float().mean(), "kl/n_epsilon_steps": (s == -1).float().mean()}
        return LossOutput(loss, rewards=beta_tilde[:, None] * g.logratios.detach(), metrics=metrics)

    def on_optimizer_step(self, accelerator) -> dict[str, float]:
        totals = torch.tensor([self._sum_steps, self._sum_inverse, self._count], dtype=torch.float64,
                              device=accelerator.device)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        self._reset()
        if totals[2] == 0:
            return {}
        mean_steps, mean_inverse = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        old = self.beta
        if self.update_rule == "official":  # harmonic mean of the β̃
            self.beta = old / (1.0 + self.epsilon * mean_steps)
        else:  # Eq. 6: arithmetic mean of the β̃
            self.beta = old * mean_inverse
        return {"kl/beta": old, "kl/avg_steps": mean_steps, "beta": self.beta}

    def on_skipped_step(self) -> None:
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "beta" in state:
            self.beta = float(state["beta"])

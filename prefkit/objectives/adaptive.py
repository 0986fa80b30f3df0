"""DPO variants with state across steps: β-DPO (a data-dependent β) and TR-DPO (a moving
reference). Both keep their state in the checkpoint, so a resume continues exactly."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prefkit.errors import UserError
from prefkit.objectives.base import Groups, LossOutput, Needs, Objective, logsigmoid, register


@register("beta_dpo")
class BetaDPO(Objective):
    """β-DPO (Wu et al. 2024), following its official code:

    1. the gap A_i = h(y_w) − h(y_l) of the (all-gathered) micro-batch updates moving averages
       M₀ ← m M₀ + (1−m) mean(A), σ ← m σ + (1−m) std(A), starting from 0;
    2. β-guided filtering: keep ⌊(1−ρ) n⌋ pairs, sampled without replacement with weights
       exp(−½((A_i − M₀)/σ)²), and average the loss over the kept ones;
    3. β_batch = max(β₀ (1 + a (mean_kept(A) − M₀)), 1e-3), detached; loss −log σ(β_batch d).

    Unlike the official code, the moving averages move only on training batches (it also
    updates them during evaluation); evaluation uses all pairs with the current β_batch.
    σ is floored at 1e-6 so the first step (policy = reference, all gaps 0) is defined."""

    logs = ("beta_dpo/beta", "beta_dpo/gap_mean", "beta_dpo/gap_std", "beta_dpo/kept")

    def __init__(self, beta: float = 0.1, a: float = 0.6, rho: float = 0.2, momentum: float = 0.9,
                 min_beta: float = 1e-3):
        if not 0.0 <= rho < 1.0:
            raise UserError(f"beta_dpo: rho (the fraction filtered out) must be in [0, 1), got {rho}")
        self.beta0, self.a, self.rho, self.momentum, self.min_beta = float(beta), float(a), float(rho), \
            float(momentum), float(min_beta)
        self.needs = Needs(reference="logps", group_size=2)
        self.gap_mean, self.gap_std = 0.0, 0.0
        self.accelerator = None

    def bind(self, accelerator=None, **_: Any) -> None:
        self.accelerator = accelerator

    def _gather(self, x: Tensor) -> Tensor:
        acc = self.accelerator
        return acc.gather(x) if acc is not None and acc.num_processes > 1 else x

    def loss(self, g: Groups) -> LossOutput:
        d = g.logratios[:, 0] - g.logratios[:, 1]
        gaps = self._gather(d.detach())
        if g.training:
            m = self.momentum
            std = float(gaps.std()) if gaps.numel() > 1 else 0.0
            self.gap_mean = m * self.gap_mean + (1 - m) * float(gaps.mean())
            self.gap_std = m * self.gap_std + (1 - m) * std
            weights = torch.exp(-0.5 * ((gaps - self.gap_mean) / max(self.gap_std, 1e-6)) ** 2)
            keep = max(1, int(gaps.numel() * (1 - self.rho)))
            chosen = torch.multinomial(weights.float() + 1e-12, keep, replacement=False)
            mask = torch.zeros_like(gaps)
            mask[chosen] = 1.0
            selected_mean = float(gaps[chosen].mean())
            rank = self.accelerator.process_index if self.accelerator is not None else 0
            local = mask[rank * d.shape[0]:(rank + 1) * d.shape[0]]
        else:
            local, selected_mean = torch.ones_like(d), float(gaps.mean())
        beta = max(self.beta0 * (1 + self.a * (selected_mean - self.gap_mean)), self.min_beta)
        losses = -logsigmoid(beta * d)
        loss = (losses * local).sum() / local.sum().clamp(min=1)
        return LossOutput(loss, rewards=beta * g.logratios.detach(),  # the β it trains with, as TRL's β-DPO logs
                          metrics={"beta_dpo/beta": beta, "beta_dpo/gap_mean": self.gap_mean,
                                   "beta_dpo/gap_std": self.gap_std, "beta_dpo/kept": float(local.sum())})

    def state_dict(self) -> dict[str, Any]:
        return {"gap_mean": self.gap_mean, "gap_std": self.gap_std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gap_mean = float(state.get("gap_mean", 0.0))
        self.gap_std = float(state.get("gap_std", 0.0))


@register("tr_dpo")
class TRDPO(Objective):
    """TR-DPO (Gorbatovski et al. 2024): DPO whose reference is updated every `sync_steps`
    optimizer steps, θ_ref ← α θ + (1 − α) θ_ref. `update: soft` uses `alpha` (TR-DPOα);
    `update: hard` copies the policy (α = 1, TR-DPOτ with τ = sync_steps). The moving reference
    cannot be precomputed, and its weights are part of the checkpoint."""

    logs = ("tr_dpo/reference_updates",)

    def __init__(self, beta: float = 0.1, update: str = "soft", alpha: float = 0.6, sync_steps: int = 512):
        if update not in ("soft", "hard"):
            raise UserError(f"tr_dpo: update must be soft or hard, got {update}")
        if sync_steps < 1:
            raise UserError("tr_dpo: sync_steps must be at least 1")
        self.beta, self.sync_steps = float(beta), int(sync_steps)
        self.alpha = 1.0 if update == "hard" else float(alpha)
        self.needs = Needs(reference="logps", cacheable=False, group_size=2)
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.steps = 0

    def bind(self, policy: nn.Module | None = None, reference: nn.Module | None = None, **_: Any) -> None:
        if reference is None or reference is policy:
            raise UserError("tr_dpo needs a separate reference model (it cannot use LoRA's adapter-off reference)")
        names = dict(policy.named_parameters())
        for name, _param in reference.named_parameters():  # check the pairing now, not at the first sync
            policy_name(name, names)
        self.policy, self.reference = policy, reference

    def loss(self, g: Groups) -> LossOutput:
        d = g.logratios[:, 0] - g.logratios[:, 1]
        return LossOutput(-logsigmoid(self.beta * d).mean(), rewards=self.beta * g.logratios.detach())

    @torch.no_grad()
    def on_optimizer_step(self, accelerator) -> dict[str, float]:
        self.steps += 1
        if self.steps % self.sync_steps:
            return {}
        policy = dict(accelerator.unwrap_model(self.policy).named_parameters())
        for name, ref_param in self.reference.named_parameters():
            ref_param.mul_(1 - self.alpha).add_(policy[policy_name(name, policy)].detach().to(ref_param.dtype),
                                                alpha=self.alpha)
        return {"tr_dpo/reference_updates": self.steps // self.sync_steps}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps}
        if self.reference is not None:
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        weights = {k[len("reference."):]: v for k, v in state.items() if k.startswith("reference.")}
        if weights and self.reference is not None:
            self.reference.load_state_dict(weights)


def policy_name(reference_name: str, policy: dict[str, Any]) -> str:
    """The policy parameter a reference parameter mixes with. Under FSDP and DeepSpeed the reference
    is wrapped for the engine (`ShardableReference.lm`), so its names carry the wrapper's prefix;
    engines may add their own (`_fsdp_wrapped_module.`, `module.`) to either side. Names are paired
    by stripping leading components of the reference's name until one is the policy's."""
    parts = reference_name.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in policy:
            return ".".join(parts[i:])
    raise UserError(f"tr_dpo: the reference's parameter {reference_name} has no counterpart in the policy "
                    "(are policy and reference the same architecture?)")


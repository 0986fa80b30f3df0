"""TRL 1.16's DPOTrainer modifiers: options that change what a loss sees rather than its formula
(f-DPO's divergences, LD-DPO's length desensitisation, WPO's weights). An objective declares
which it takes (`@objective(..., modifiers=...)`); `Modifiers.prepare` applies them to the
Groups before its loss runs, and `Modifiers.widen` adds what they read to its Needs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.errors import UserError

if TYPE_CHECKING:
    from prefkit.objectives.base import Groups, Needs

# option -> default; an objective takes those it declares (`Objective.modifier_options`)
MODIFIER_OPTIONS: dict[str, Any] = {"f_divergence": "reverse_kl", "f_alpha": 0.5, "ld_alpha": None,
                                    "use_weighting": False}
F_DIVERGENCES = {"reverse_kl": "reverse_kl", "forward_kl": "forward_kl", "js": "js", "js_divergence": "js",
                 "alpha": "alpha", "alpha_divergence": "alpha"}  # TRL's names are accepted too
WHY_NOT = {
    "f_divergence": "f-DPO's divergences apply to the losses of the chosen − rejected difference of the "
                    "rewards β f′(π_θ/π_ref), where the prompt's β log Z(x) cancels (TRL 1.16 allows them on the "
                    "same losses)",
    "ld_alpha": "LD-DPO's length desensitisation reweights the log-probs of TRL's pairwise DPO losses",
    "use_weighting": "WPO weights each prompt's loss term, and this loss has none to weight (aot and "
                     "aot_unpaired sort the pairs of a micro-batch, so per-pair weights would not line up)",
}
WHY_NOT["f_alpha"] = WHY_NOT["f_divergence"]


def f_prime(h: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """ψ(h) = f′(u) at u = π_θ(y|x)/π_ref(y|x) = e^h, up to an additive constant that cancels in the
    chosen − rejected difference (f-DPO, Wang et al. 2023, "Beyond Reverse KL": the implicit reward
    is β f′(u) plus a per-prompt constant), in TRL 1.16's forms:
        reverse KL  f(u) = u log u                 ψ = h                      (DPO)
        forward KL  f(u) = −log u                  ψ = 1 − e^(−h)
        JS          f(u) = u log u − (u+1) log((u+1)/2)   ψ = log 2 + log σ(h) = log(2u/(1+u))
        α           ψ = (u^(α−1) − 1)/(α − 1) = expm1((α−1) h)/(α − 1), α ∈ (0, 1)
    α is TRL's `f_alpha_divergence_coef`; the paper's α-divergence coefficient is 1 − α (its
    f′(u) = (1 − u^(−α))/α). As TRL, (α − 1) h is clamped at 80, so exp() stays finite in float32
    (it zeroes the gradient of a log-ratio below −80/(1 − α))."""
    if divergence == "reverse_kl":
        return h
    if divergence == "forward_kl":
        return 1 - torch.exp(-h)
    if divergence == "js":
        return math.log(2) + F.logsigmoid(h)
    if divergence == "alpha":
        return torch.expm1(torch.clamp((alpha - 1) * h, max=80.0)) / (alpha - 1)
    raise ValueError(f"unknown f-divergence {divergence!r}")


def wpo_weights(g: Groups) -> Tensor:
    """WPO's per-prompt weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", Eq. 2, as TRL 1.16 computes it): for each completion the geometric-mean
    probability of its tokens, each token's probability relative to how much mass the policy
    puts on agreeing with itself,
        w(y) = exp( (1/|y|) Σ_t [log π_θ(y_t|s_t) − log Σ_v π_θ(v|s_t)²] ),
    and the prompt's weight is the product over its completions (w(y_w) w(y_l) for a pair);
    detached, so it scales the gradient but is not optimised."""
    if g.log_sum_sq_probs is None:
        raise RuntimeError("use_weighting needs Σ log Σ p² per completion (TokenRequest.log_sum_sq_probs)")
    with torch.no_grad():
        per_completion = ((g.logps - g.log_sum_sq_probs) / g.lengths.clamp(min=1)).exp()
        return per_completion.prod(dim=1)


def desensitised(logps: Tensor, prefix: Tensor | None, alpha: float) -> Tensor:
    """LD-DPO's log-likelihood (Liu et al. 2024, "Length Desensitization in Direct Preference
    Optimization"; TRL 1.16's `ld_alpha`): the tokens of the shared prefix, the first
    m = min(|y_w|, |y_l|), count fully, the longer response's excess tokens with weight α:
        log π̃(y) = Σ_{t ≤ m} log π(y_t|s_t) + α Σ_{t > m} log π(y_t|s_t).
    α = 1 is the plain log-likelihood (DPO), α = 0 drops the excess."""
    if prefix is None:
        raise RuntimeError("ld_alpha needs the shared-prefix log-probs (TokenRequest.shared_prefix)")
    return prefix + alpha * (logps - prefix)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Modifiers:
    """TRL 1.16's DPOTrainer options that change what a loss sees rather than its formula, applied
    before it (`prepare`), in TRL's order: WPO weights from the raw log-probs, then LD-DPO's
    log-probs (policy and reference), then f-DPO's scores of the log-ratios. An objective declares
    which it takes (`Objective.modifier_options`); its loss reads `g.scores` (f_divergence) and
    reduces with `g.reduce` (use_weighting)."""

    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False

    @classmethod
    def parse(cls, name: str, **options: Any) -> Modifiers:
        """Validated modifiers from an objective's options (defaults for those not given)."""
        opts = {**MODIFIER_OPTIONS, **options}
        div = opts["f_divergence"]
        if not isinstance(div, str) or div not in F_DIVERGENCES:
            raise UserError(f"objective {name}: unknown f_divergence {div!r}; valid: {', '.join(F_DIVERGENCES)}")
        div = F_DIVERGENCES[div]
        alpha = opts["f_alpha"]
        if not _number(alpha) or not 0.0 < alpha < 1.0:
            raise UserError(f"objective {name}: f_alpha must be a number in (0, 1), got {alpha!r} "
                            "(α → 1 is the reverse KL: f_divergence=reverse_kl; α → 0 the forward KL)")
        if div != "alpha" and alpha != MODIFIER_OPTIONS["f_alpha"]:
            raise UserError(f"objective {name}: f_alpha={alpha} is used only with f_divergence=alpha "
                            f"(got f_divergence={opts['f_divergence']})")
        ld = opts["ld_alpha"]
        if ld is not None and (not _number(ld) or not 0.0 <= ld <= 1.0):
            raise UserError(f"objective {name}: ld_alpha must be null (off) or a number in [0, 1], got {ld!r}")
        if not isinstance(opts["use_weighting"], bool):
            raise UserError(f"objective {name}: use_weighting must be true or false, got {opts['use_weighting']!r}")
        return cls(div, float(alpha), None if ld is None else float(ld), opts["use_weighting"])

    def widen(self, needs: Needs, name: str) -> Needs:
        """The objective's needs plus what its modifiers read."""
        if self.f_divergence != "reverse_kl" and needs.reference == "none":
            raise UserError(f"objective {name}: f_divergence={self.f_divergence} needs a reference model "
                            "(f′ of π_θ/π_ref), and this configuration has none")
        tokens = needs.tokens
        if self.use_weighting:
            tokens = replace(tokens, log_sum_sq_probs=True)
        if self.ld_alpha is not None:
            tokens = replace(tokens, shared_prefix=True)
        # LD-DPO splits the reference's log-probs too: per-token values, which only an online
        # reference has (the cache keeps sequence sums)
        reference = "logits" if self.ld_alpha is not None and needs.reference == "logps" else needs.reference
        return replace(needs, reference=reference, tokens=tokens)

    def prepare(self, g: Groups) -> Groups:
        """The Groups a loss with these modifiers sees."""
        changes: dict[str, Any] = {}
        if self.use_weighting:
            changes["weights"] = wpo_weights(g)  # from the raw log-probs, as TRL
        if self.ld_alpha is not None:
            changes["logps"] = desensitised(g.logps, g.prefix_logps, self.ld_alpha)
            if g.ref_logps is not None:
                changes["ref_logps"] = desensitised(g.ref_logps, g.ref_prefix_logps, self.ld_alpha)
        if changes:
            g = replace(g, **changes)
        if self.f_divergence != "reverse_kl":
            g = replace(g, f_scores=f_prime(g.logratios, self.f_divergence, self.f_alpha))
        return g

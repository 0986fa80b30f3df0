"""Analysis statistics any align run can log beside its objective's own (`align.diagnostics`), for
the papers' figures about *other* objectives than their own:

- seq_kl     SeqKL(π_ref ‖ π_θ) of the chosen and rejected responses (kl/chosen, kl/rejected,
             kl/margin), as TDPO logs them, for any objective (Zeng et al. 2024, Fig. 3(b–d) plot them
             for DPO too)
- edpo_test  the ε-DPO perturbation test (Lee et al. 2025, Eqs. 1–2) at a given ε on every pair, and
             the implicit reward margins β·d of the pairs it calls increasing (β⁺) and decreasing
             (β⁻) (Fig. 4): diag/frac_increasing, diag/frac_decreasing and diag/margin_x_increasing,
             diag/margin_x_decreasing (the margin times the indicator, so that means over any batches
             divide to the conditional mean margin)

Both need the reference's full distribution at every response token, so a run that asks for them
uses an online reference.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omegaconf import DictConfig

from prefkit.objectives import Groups, Needs
from prefkit.objectives.edpo import perturbation_steps
from prefkit.objectives.tdpo import SEQ_KL_LOGS, seq_kl_metrics

EDPO_TEST_LOGS = ("diag/frac_increasing", "diag/frac_decreasing", "diag/margin_x_increasing",
                  "diag/margin_x_decreasing")
# What the training loop adds to every align row (prefkit.trainer)
TRAINER_LOGS = ("loss", "lr", "epoch", "tokens", "tokens_per_s", "grad_norm", "skipped_steps")


def widen(needs: Needs, diag: DictConfig | None) -> Needs:
    """The objective's needs plus what the diagnostics need."""
    if not diag:
        return needs
    tokens = needs.tokens
    if diag.get("seq_kl"):
        tokens = replace(tokens, kl=True, reverse_kl=True)
    eps = diag.get("edpo_test")
    if eps:
        tokens = replace(tokens, mixtures=tuple(dict.fromkeys((*tokens.mixtures, 1.0 + eps, 1.0 - eps))))
    if tokens == needs.tokens:
        return needs
    return replace(needs, reference="logits", cacheable=False, tokens=tokens)


def metrics(g: Groups, diag: DictConfig | None, beta: float | None) -> dict[str, Any]:
    if not diag:
        return {}
    out: dict[str, Any] = {}
    if diag.get("seq_kl") and g.kl is not None:
        out.update(seq_kl_metrics(g))
    eps = diag.get("edpo_test")
    if eps:
        s = perturbation_steps(g, float(eps))
        margin = (g.logratios[:, 0] - g.logratios[:, 1]).detach() * (beta if beta is not None else 1.0)
        increasing, decreasing = (s == -1).to(margin.dtype), (s == 1).to(margin.dtype)
        out.update({"diag/frac_increasing": increasing.mean(), "diag/frac_decreasing": decreasing.mean(),
                    "diag/margin_x_increasing": (margin * increasing).mean(),
                    "diag/margin_x_decreasing": (margin * decreasing).mean()})
    return out


def logged_metrics(objective: type | object, diag: DictConfig | None, sft_weight: float) -> set[str]:
    """Every metrics.jsonl key an align job of this objective and these diagnostics writes: the
    trainer's, TRL's, the objective's own (`Objective.logs`), the diagnostics', and each of the
    loss's metrics again as eval_<key> from the held-out pairs."""
    from prefkit.objectives.base import TRL_METRICS

    own = {*TRL_METRICS, *getattr(objective, "logs", ())}
    if diag and diag.get("seq_kl"):
        own |= set(SEQ_KL_LOGS)
    if diag and diag.get("edpo_test"):
        own |= set(EDPO_TEST_LOGS)
    if sft_weight:
        own.add("sft/nll")
    return {*TRAINER_LOGS, *own, "eval_loss", *(f"eval_{k}" for k in own)}

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
from prefkit.objectives.tdpo import seq_kl_metrics


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

"""TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization"), §4.4, Eqs. 13–18.

    u  = β (h(y_w) − h(y_l))                                         (Eq. 13, DPO's margin)
    δ  = β D_SeqKL(x, y_l; π_ref ‖ π_θ) − β D_SeqKL(x, y_w; π_ref ‖ π_θ)   (Eq. 14)
    TDPO1: −log σ(u − δ)                                             (Eq. 15)
    TDPO2: −log σ(u − α δ₂), δ₂ with the chosen SeqKL stop-gradiented (Eqs. 17–18)

D_SeqKL sums the exact forward KL over the vocabulary at every response position (EOS
included), computed from log-softmaxes (never softmax().log(), which is NaN once a reference
probability underflows). TDPO2 with α = 0 is DPO; TDPO1 has no α.
"""

from __future__ import annotations

from prefkit.objectives.base import Groups, LossOutput, Needs, logsigmoid, objective
from prefkit.tokenstats import TokenRequest

TOKEN_KL = Needs(reference="logits", group_size=2, tokens=TokenRequest(kl=True, reverse_kl=True))
SEQ_KL_LOGS = ("kl/chosen", "kl/rejected", "kl/margin", "kl_reverse/chosen", "kl_reverse/rejected")
TDPO_LOGS = (*SEQ_KL_LOGS, "tdpo/rewards_chosen", "tdpo/rewards_rejected")


def seq_kl_metrics(g: Groups) -> dict:
    """SeqKL of the chosen and rejected responses (kl/margin: chosen − rejected), both directions."""
    kl_w, kl_l = g.kl[:, 0].detach(), g.kl[:, 1].detach()
    metrics = {"kl/chosen": kl_w.mean(), "kl/rejected": kl_l.mean(), "kl/margin": (kl_w - kl_l).mean()}
    if g.reverse_kl is not None:  # the direction Fig. 3 plots
        metrics.update({"kl_reverse/chosen": g.reverse_kl[:, 0].mean(),
                        "kl_reverse/rejected": g.reverse_kl[:, 1].mean()})
    return metrics


def _metrics(g: Groups, beta: float) -> dict:
    return {**seq_kl_metrics(g),
            # the official code's "rewards": β (h + SeqKL), the advantage sum of Eq. 59
            "tdpo/rewards_chosen": (beta * (g.logratios[:, 0] + g.kl[:, 0])).detach().mean(),
            "tdpo/rewards_rejected": (beta * (g.logratios[:, 1] + g.kl[:, 1])).detach().mean()}


@objective("tdpo1", needs=TOKEN_KL, logs=TDPO_LOGS)
def tdpo1(g: Groups, beta: float = 0.1) -> LossOutput:
    """TDPO1: −log σ(β[(h_w − h_l) − (SeqKL_l − SeqKL_w)])."""
    h = g.logratios[:, 0] - g.logratios[:, 1] - (g.kl[:, 1] - g.kl[:, 0])
    return LossOutput(-logsigmoid(beta * h).mean(), rewards=beta * g.logratios.detach(), metrics=_metrics(g, beta))


@objective("tdpo2", needs=TOKEN_KL, logs=TDPO_LOGS)
def tdpo2(g: Groups, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO2: −log σ(β[(h_w − h_l) − α(SeqKL_l − sg(SeqKL_w))])."""
    h = g.logratios[:, 0] - g.logratios[:, 1] - alpha * (g.kl[:, 1] - g.kl[:, 0].detach())
    return LossOutput(-logsigmoid(beta * h).mean(), rewards=beta * g.logratios.detach(), metrics=_metrics(g, beta))

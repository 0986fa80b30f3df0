"""TRL 1.16's DPOTrainer modifiers as options of the DPO family: f-DPO's divergences
(`f_divergence`, `f_alpha`), LD-DPO's `ld_alpha`, WPO's `use_weighting` (objectives/base.py,
`Modifiers`), and the token statistics they read (tokenstats: shared-prefix sums, log Σ p²).

(a) values on small hand-made tensors, computed here with `math` from the papers' formulas;
(b) finite-difference gradients; (c) TRL's own DPOTrainer._compute_loss on the same per-token
log-probs (a lightweight trainer whose "models" return them, float64) and, end to end, a real
DPOTrainer on a tiny model against prefkit's StatsLM (its chunked LM head, TRL's fused one):
loss and gradients agree; (d) the token statistics against a naive full-vocabulary computation;
(e) what the options need, and every combination that does not fit is one clear UserError.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeAccelerator
from torch.autograd import gradcheck

from prefkit.data import IGNORE
from prefkit.errors import UserError
from prefkit.objectives import Groups, build, trl_metrics
from prefkit.tokenstats import Head, Reference, TokenRequest, shared_prefix, stats_from_hidden, token_stats

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.usefixtures("one_thread")

# four pairs, completion 0 = chosen
LOGPS = [[-5.0, -7.0], [-4.0, -3.5], [-10.0, -9.0], [-2.0, -3.0]]
REF = [[-5.5, -6.0], [-4.2, -3.0], [-9.0, -11.0], [-2.4, -2.2]]
LENS = [[3, 5], [2, 4], [6, 1], [2, 3]]
# log-prob sums over each pair's first min(|y_w|, |y_l|) tokens (the shorter response's are its total)
PREFIX = [[-5.0, -4.0], [-4.0, -2.0], [-3.0, -9.0], [-2.0, -2.5]]
REF_PREFIX = [[-5.5, -3.5], [-4.2, -1.0], [-2.5, -11.0], [-2.4, -1.9]]
# Σ_t log Σ_v π(v|s_t)² per completion (WPO)
LSQ = [[-2.0, -4.0], [-1.0, -3.0], [-5.0, -0.5], [-1.5, -2.0]]

TOL = 1e-12
DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# the objectives that take an f-divergence, with options that make their losses non-trivial
F_OBJECTIVES = {
    "dpo": {"beta": 0.3}, "cdpo": {"beta": 0.3, "label_smoothing": 0.2}, "ipo": {"beta": 0.25},
    "slic": {"beta": 0.8}, "robust_dpo": {"beta": 0.3, "label_smoothing": 0.2},
    "discopop": {"beta": 0.3, "tau": 0.5}, "sigmoid_norm": {"beta": 2.0},
}


def t64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).requires_grad_(grad)


def groups(logps=LOGPS, grad: bool = False, **kw) -> Groups:
    extra = {k: t64(v) for k, v in {"ref_logps": REF, "prefix_logps": PREFIX, "ref_prefix_logps": REF_PREFIX,
                                     "log_sum_sq_probs": LSQ}.items()}
    extra.update(kw)
    return Groups(logps=logps if isinstance(logps, torch.Tensor) else t64(logps, grad), lengths=torch.tensor(LENS),
                  **extra)


def close(actual, expected, tol=TOL):
    actual = float(actual.detach() if isinstance(actual, torch.Tensor) else actual)
    assert math.isfinite(actual)
    assert actual == pytest.approx(expected, rel=tol, abs=tol), (actual, expected)


# --- independent scalar maths -------------------------------------------------------------------

def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def psi(h: float, divergence: str, alpha: float = 0.5) -> float:
    """f′(u) at u = e^h, up to a constant: the f-DPO paper's table of divergences."""
    u = math.exp(h)
    if divergence == "reverse_kl":
        return math.log(u)  # f(u) = u log u: f′ = log u + 1
    if divergence == "forward_kl":
        return 1 - 1 / u  # f(u) = −log u: f′ = −1/u
    if divergence == "js":
        return math.log(2 * u / (1 + u))  # f(u) = u log u − (u + 1) log((u + 1)/2)
    return (u ** (alpha - 1) - 1) / (alpha - 1)


def row_loss(name: str, sw: float, sl: float, nw: int, nl: int, opts: dict) -> float:
    """One pair's loss from its scores ψ_w, ψ_l and lengths."""
    beta = opts["beta"]
    z = beta * (sw - sl)
    if name == "dpo":
        return -logsig(z)
    if name == "cdpo":
        eps = opts["label_smoothing"]
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if name == "ipo":
        return (sw / nw - sl / nl - 1 / (2 * beta)) ** 2
    if name == "slic":
        return max(0.0, 1 - z)
    if name == "robust_dpo":
        eps = opts["label_smoothing"]
        return ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
    if name == "discopop":
        m = sigmoid(z / opts["tau"])
        return (1 - m) * -logsig(z) + m * math.exp(-z)
    assert name == "sigmoid_norm"
    return -logsig(beta * (sw / nw - sl / nl))


def expected(name, opts, logps=LOGPS, ref=REF, divergence="reverse_kl", alpha=0.5, weights=None) -> float:
    losses = []
    for lp, rf, n in zip(logps, ref, LENS, strict=True):
        sw, sl = (psi(a - b, divergence, alpha) for a, b in zip(lp, rf, strict=True))
        losses.append(row_loss(name, sw, sl, n[0], n[1], opts))
    weights = weights or [1.0] * len(losses)
    return mean(w * x for w, x in zip(weights, losses, strict=True))


def beta_h(beta, logps=LOGPS, ref=REF):
    return [[beta * (a - b) for a, b in zip(lp, rf, strict=True)] for lp, rf in zip(logps, ref, strict=True)]


def desensitised(total, prefix, alpha):
    return [[p + alpha * (t - p) for t, p in zip(tr, pr, strict=True)] for tr, pr in zip(total, prefix, strict=True)]


def wpo(logps=LOGPS, lsq=LSQ):
    return [math.exp((lp[0] - q[0]) / n[0]) * math.exp((lp[1] - q[1]) / n[1])
            for lp, q, n in zip(logps, lsq, LENS, strict=True)]


# --- (a) values: f-DPO ----------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("name", sorted(F_OBJECTIVES))
def test_f_divergence_scores(name, divergence):
    opts = F_OBJECTIVES[name]
    alpha = 0.3
    cfg = {"name": name, **opts, "f_divergence": divergence, **({"f_alpha": alpha} if divergence == "alpha" else {})}
    out = build(cfg)[0].loss(groups())
    close(out.loss, expected(name, opts, divergence=divergence, alpha=alpha))
    # the logged rewards stay β h, as TRL logs them under every divergence
    torch.testing.assert_close(out.rewards, t64(beta_h(opts["beta"])), rtol=TOL, atol=TOL)


def test_the_divergences_differ_and_reverse_kl_is_the_plain_loss():
    values = {d: float(build({"name": "dpo", "beta": 0.3, "f_divergence": d})[0].loss(groups()).loss)
              for d in DIVERGENCES}
    assert len({round(v, 9) for v in values.values()}) == len(DIVERGENCES)
    assert values["reverse_kl"] == float(build({"name": "dpo", "beta": 0.3})[0].loss(groups()).loss)


def test_trl_names_are_aliases():
    for short, long in (("js", "js_divergence"), ("alpha", "alpha_divergence")):
        a = build({"name": "dpo", "f_divergence": short})[0].loss(groups()).loss
        b = build({"name": "dpo", "f_divergence": long})[0].loss(groups()).loss
        assert torch.equal(a, b)


@pytest.mark.parametrize("f_alpha", [0.3, 0.5, 0.9])
def test_alpha_divergence_is_the_papers_with_alpha_one_minus_f_alpha(f_alpha):
    # the paper's α-divergence has f′(u) = (1 − u^(−α))/α; TRL's coefficient is 1 − α
    a = 1 - f_alpha
    out = build({"name": "dpo", "beta": 0.3, "f_divergence": "alpha", "f_alpha": f_alpha})[0].loss(groups())
    paper = mean(-logsig(0.3 * ((1 - math.exp(hw) ** -a) / a - (1 - math.exp(hl) ** -a) / a))
                 for hw, hl in ((lp[0] - rf[0], lp[1] - rf[1]) for lp, rf in zip(LOGPS, REF, strict=True)))
    close(out.loss, paper, 1e-10)


def test_alpha_divergence_limits():
    # α → 1: the reverse KL; α → 0: the forward KL
    g = groups()
    rkl = float(build({"name": "dpo", "beta": 0.3})[0].loss(g).loss)
    fkl = float(build({"name": "dpo", "beta": 0.3, "f_divergence": "forward_kl"})[0].loss(g).loss)
    near_one = float(build({"name": "dpo", "beta": 0.3, "f_divergence": "alpha", "f_alpha": 1 - 1e-7})[0].loss(g).loss)
    near_zero = float(build({"name": "dpo", "beta": 0.3, "f_divergence": "alpha", "f_alpha": 1e-7})[0].loss(g).loss)
    assert near_one == pytest.approx(rkl, rel=1e-5) and near_zero == pytest.approx(fkl, rel=1e-5)


def test_alpha_divergence_clamps_the_exponent_at_80_as_trl():
    # h_l = −200 at α = 0.5: (α − 1) h = 100 is clamped to 80, so ψ_l = (e^80 − 1)/(−0.5), and no gradient reaches h_l
    g = Groups(logps=t64([[0.0, -200.0]], True), lengths=torch.tensor([[1, 1]]), ref_logps=t64([[0.0, 0.0]]))
    out = build({"name": "dpo", "beta": 1e-36, "f_divergence": "alpha", "f_alpha": 0.5})[0].loss(g)
    close(out.loss, -logsig(1e-36 * (0.0 - math.expm1(80.0) / -0.5)))
    (grad,) = torch.autograd.grad(out.loss, g.logps)
    assert grad[0, 1] == 0.0 and grad[0, 0] != 0.0


# --- (a) values: LD-DPO and WPO ------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_alpha_desensitises_policy_and_reference(alpha):
    out = build({"name": "dpo", "beta": 0.3, "ld_alpha": alpha})[0].loss(groups())
    lp, rf = desensitised(LOGPS, PREFIX, alpha), desensitised(REF, REF_PREFIX, alpha)
    close(out.loss, expected("dpo", {"beta": 0.3}, lp, rf))
    torch.testing.assert_close(out.rewards, t64(beta_h(0.3, lp, rf)), rtol=TOL, atol=TOL)  # as TRL logs them
    if alpha == 1.0:
        assert out.loss == build({"name": "dpo", "beta": 0.3})[0].loss(groups()).loss


def test_ld_alpha_changes_only_pairs_of_different_lengths():
    same = [[2, 2]] * 4  # equal lengths: the prefix is everything, nothing to desensitise
    g = Groups(logps=t64(LOGPS), lengths=torch.tensor(same), ref_logps=t64(REF), prefix_logps=t64(LOGPS),
               ref_prefix_logps=t64(REF))
    a = build({"name": "dpo", "ld_alpha": 0.2})[0].loss(g).loss
    b = build({"name": "dpo"})[0].loss(g).loss
    assert torch.equal(a, b)


def test_ld_alpha_then_f_divergence_in_trls_order():
    lp, rf = desensitised(LOGPS, PREFIX, 0.5), desensitised(REF, REF_PREFIX, 0.5)
    out = build({"name": "ipo", "beta": 0.25, "ld_alpha": 0.5, "f_divergence": "js"})[0].loss(groups())
    close(out.loss, expected("ipo", {"beta": 0.25}, lp, rf, divergence="js"))


@pytest.mark.parametrize("name", ["nca_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired",
                                  "bco_pair"])
def test_ld_alpha_on_the_other_trl_losses_is_the_loss_of_the_desensitised_log_probs(name):
    cfg = {"name": name, "beta": 0.3, **({"reward_shift": False} if name == "bco_pair" else {})}
    lp, rf = desensitised(LOGPS, PREFIX, 0.3), desensitised(REF, REF_PREFIX, 0.3)
    out = build({**cfg, "ld_alpha": 0.3})[0].loss(groups())
    plain = build(cfg)[0].loss(Groups(logps=t64(lp), lengths=torch.tensor(LENS), ref_logps=t64(rf)))
    close(out.loss, float(plain.loss))


def test_use_weighting_weights_each_pair_by_its_wpo_weight():
    weights = wpo()
    out = build({"name": "dpo", "beta": 0.3, "use_weighting": True})[0].loss(groups())
    close(out.loss, expected("dpo", {"beta": 0.3}, weights=weights))
    assert max(weights) / min(weights) > 2  # the weights are far from uniform here


@pytest.mark.parametrize("name", ["cdpo", "ipo", "slic", "robust_dpo", "discopop", "sigmoid_norm"])
def test_use_weighting_with_an_f_divergence(name):
    opts = F_OBJECTIVES[name]
    out = build({"name": name, **opts, "use_weighting": True, "f_divergence": "forward_kl"})[0].loss(groups())
    close(out.loss, expected(name, opts, divergence="forward_kl", weights=wpo()))


def test_wpo_weights_use_the_raw_log_probs_and_are_detached():
    # TRL computes the weights from the per-token log-probs before LD-DPO's reweighting
    g = groups(grad=True)
    out = build({"name": "dpo", "beta": 0.3, "use_weighting": True, "ld_alpha": 0.5})[0].loss(g)
    lp, rf = desensitised(LOGPS, PREFIX, 0.5), desensitised(REF, REF_PREFIX, 0.5)
    close(out.loss, expected("dpo", {"beta": 0.3}, lp, rf, weights=wpo()))
    # detached: the gradient is the weighted DPO gradient, with no term through the weights
    (grad,) = torch.autograd.grad(out.loss, g.logps)
    g2 = groups(grad=True)
    unweighted = build({"name": "dpo", "beta": 0.3, "ld_alpha": 0.5})[0].loss(g2)
    per_pair = torch.autograd.grad(unweighted.loss * len(LOGPS), g2.logps)[0]  # Σ of the per-pair gradients
    torch.testing.assert_close(grad, per_pair * t64(wpo())[:, None] / len(LOGPS), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["nca_pair", "sppo_hard", "apo_zero", "apo_down", "bco_pair"])
def test_use_weighting_on_the_other_trl_losses(name):
    cfg = {"name": name, "beta": 0.3, **({"reward_shift": False} if name == "bco_pair" else {})}
    g = groups()
    plain = build(cfg)[0]
    per_pair = [float(plain.loss(Groups(logps=g.logps[i:i + 1], lengths=g.lengths[i:i + 1],
                                        ref_logps=g.ref_logps[i:i + 1])).loss) for i in range(4)]
    out = build({**cfg, "use_weighting": True})[0].loss(g)
    close(out.loss, mean(w * x for w, x in zip(wpo(), per_pair, strict=True)))


def test_bco_pair_reward_shift_moves_with_the_desensitised_rewards():
    obj = build({"name": "bco_pair", "beta": 0.3, "ld_alpha": 0.5})[0]
    obj.loss(groups())
    lp, rf = desensitised(LOGPS, PREFIX, 0.5), desensitised(REF, REF_PREFIX, 0.5)
    close(obj.delta, mean(x for row in beta_h(0.3, lp, rf) for x in row))


def test_defaults_change_nothing():
    g = groups()
    for name, opts in F_OBJECTIVES.items():
        plain = build({"name": name, **opts})[0]
        explicit = build({"name": name, **opts, "f_divergence": "reverse_kl", "f_alpha": 0.5, "ld_alpha": None,
                          "use_weighting": False})[0]
        assert torch.equal(plain.loss(g).loss, explicit.loss(g).loss) and plain.needs == explicit.needs


# --- (b) finite differences -----------------------------------------------------------------------

GRADCHECKS = [
    *({"name": n, **F_OBJECTIVES[n], "f_divergence": d, **({"f_alpha": 0.3} if d == "alpha" else {})}
      for n in ("dpo", "ipo", "robust_dpo", "discopop", "sigmoid_norm") for d in ("forward_kl", "js", "alpha")),
    {"name": "cdpo", "beta": 0.3, "label_smoothing": 0.2, "f_divergence": "js", "ld_alpha": 0.4},
    {"name": "dpo", "beta": 0.3, "ld_alpha": 0.4},
    {"name": "aot", "beta": 0.3, "ld_alpha": 0.4},
    {"name": "nca_pair", "beta": 0.3, "ld_alpha": 0.7, "use_weighting": True},
    {"name": "bco_pair", "beta": 0.3, "ld_alpha": 0.7, "use_weighting": True, "reward_shift": False},
    {"name": "dpo", "beta": 0.3, "use_weighting": True, "f_divergence": "alpha", "f_alpha": 0.7},
]


@pytest.mark.parametrize("cfg", GRADCHECKS, ids=[f"{c['name']}-{i}" for i, c in enumerate(GRADCHECKS)])
def test_gradcheck(cfg):
    """With respect to the policy's log-probs and, for LD-DPO, its prefix sums. The WPO weights
    are constants of the gradient (detached): Σ log Σ p² moves with the log-probs here, so the
    finite differences see them constant too."""
    obj = build(cfg)[0]
    lp0 = t64(LOGPS)

    def fn(lp, prefix):
        g = Groups(logps=lp, lengths=torch.tensor(LENS), ref_logps=t64(REF), prefix_logps=prefix,
                   ref_prefix_logps=t64(REF_PREFIX), log_sum_sq_probs=t64(LSQ) + (lp - lp0))
        return obj.loss(g).loss

    assert gradcheck(fn, (t64(LOGPS, True), t64(PREFIX, True)), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- (c) TRL 1.16's own loss code, on per-token log-probs ------------------------------------------

B, V = 4, 7
TOKEN_LENS = [[3, 5], [2, 4], [6, 1], [2, 2]]  # prefix shorter on either side, and a tie


class TokenLM:
    """Stands in for a model inside DPOTrainer._compute_loss: its fused-LM-head forward returns the
    given per-token log-probs (zero off the completion) and log Σ p²."""

    training = True
    is_gradient_checkpointing = False
    def __init__(self, per_token: torch.Tensor, lsq: torch.Tensor | None = None):
        self.per_token, self.lsq = per_token, lsq
        self._modules: dict = {}  # what accelerate's is_peft_model inspects: no submodules

    def __call__(self, **_):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=self.lsq)


@pytest.fixture(scope="module")
def token_data():
    """Random logits at every response token of B pairs, in prefkit's layout (a prompt's
    completions consecutive: chosen 0, rejected 0, chosen 1, ...), with labels and the reference's
    log-softmax rows."""
    gen = torch.Generator().manual_seed(11)
    lens = [n for pair in TOKEN_LENS for n in pair]
    width = 2 + max(lens)
    labels = torch.full((2 * B, width), IGNORE)
    for s, n in enumerate(lens):
        labels[s, 2:2 + n] = torch.randint(0, V, (n,), generator=gen)  # position 1 predicts the first token
    m = sum(lens)
    return {"labels": labels, "logits": torch.randn(m, V, generator=gen, dtype=torch.float64) * 1.5,
            "ref": F.log_softmax(torch.randn(m, V, generator=gen, dtype=torch.float64), -1), "width": width}


def prefkit_side(d, cfg: dict, logits: torch.Tensor, recompute: bool = True):
    obj = build(cfg)[0]
    stats = stats_from_hidden(logits, Head.identity(V), torch.ones_like(d["labels"]), d["labels"],
                              reference=Reference(logprobs=d["ref"].to(logits.dtype)), req=obj.needs.tokens,
                              chunk_size=5, recompute=recompute, group_size=2)

    def view(t):
        return None if t is None else t.view(B, 2)

    g = Groups(logps=view(stats.logps), lengths=view(stats.lengths), ref_logps=view(stats.ref_logps),
               prefix_logps=view(stats.prefix_logps), ref_prefix_logps=view(stats.ref_prefix_logps),
               log_sum_sq_probs=view(stats.log_sum_sq_probs))
    out = obj.loss(g)
    return out.loss, trl_metrics(g, out)


def to_trl_rows(d, per_token: torch.Tensor) -> torch.Tensor:
    """[2B, width − 1] in TRL's layout ([chosen rows; rejected rows], shifted positions), zeros off
    the completions; differentiable."""
    rows, cols = (d["labels"][:, 1:] != IGNORE).nonzero(as_tuple=True)
    trl_row = torch.where(rows % 2 == 0, rows // 2, B + rows // 2)
    return torch.zeros(2 * B, d["width"] - 1, dtype=per_token.dtype).index_put((trl_row, cols), per_token)


def trl_side(d, logits: torch.Tensor, loss_types: list[str], loss_weights: list[float] | None = None,
             **config):
    """TRL's _compute_loss with a policy and a reference that return these per-token values."""
    from trl import DPOTrainer

    targets = d["labels"][:, 1:][d["labels"][:, 1:] != IGNORE]
    logp = F.log_softmax(logits, -1)
    policy = TokenLM(to_trl_rows(d, logp.gather(-1, targets[:, None])[:, 0]),
                     to_trl_rows(d, torch.logsumexp(2 * logp, -1)).detach())
    reference = TokenLM(to_trl_rows(d, d["ref"].to(logits.dtype).gather(-1, targets[:, None])[:, 0]))
    completion = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), (to_trl_rows(d, torch.ones(len(targets))) != 0)
                            .long()], dim=1)
    inputs = {"input_ids": torch.ones(2 * B, d["width"], dtype=torch.long),
              "attention_mask": torch.ones(2 * B, d["width"], dtype=torch.long), "completion_mask": completion}
    trainer = object.__new__(DPOTrainer)
    settings = {"beta": 0.1, "label_smoothing": 0.0, "ld_alpha": None, "f_divergence_type": "reverse_kl",
                "f_alpha_divergence_coef": 0.5, "use_weighting": False, "discopop_tau": 0.05, **config}
    trainer.__dict__.update(
        model=policy, ref_model=reference, accelerator=FakeAccelerator(), aux_loss_enabled=False,
        args=SimpleNamespace(discopop_tau=settings.pop("discopop_tau"), gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, **settings)
    loss = trainer._compute_loss(policy, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_settings(cfg: dict) -> dict:
    """The DPOConfig settings of a prefkit objective config."""
    names = {"f_divergence": "f_divergence_type", "f_alpha": "f_alpha_divergence_coef", "tau": "discopop_tau"}
    full = {"js": "js_divergence", "alpha": "alpha_divergence"}
    out = {names.get(k, k): v for k, v in cfg.items() if k not in ("name", "length_normalize", "reward_shift")}
    if "f_divergence_type" in out:
        out["f_divergence_type"] = full.get(out["f_divergence_type"], out["f_divergence_type"])
    return out


LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "slic": "hinge", "robust_dpo": "robust", "discopop": "discopop",
              "sigmoid_norm": "sigmoid_norm", "nca_pair": "nca_pair", "bco_pair": "bco_pair",
              "sppo_hard": "sppo_hard", "aot": "aot", "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero",
              "apo_down": "apo_down"}
TRL_CASES = [
    *({"name": n, "beta": 0.5, "f_divergence": d} for n in ("dpo", "ipo", "slic", "robust_dpo", "discopop",
                                                             "sigmoid_norm") for d in ("forward_kl", "js")),
    {"name": "robust_dpo", "beta": 0.5, "label_smoothing": 0.2, "f_divergence": "js", "use_weighting": True},
    *({"name": n, "beta": 0.5, "ld_alpha": 0.3} for n in LOSS_TYPES),
    *({"name": n, "beta": 0.5, "use_weighting": True} for n in LOSS_TYPES if not n.startswith("aot")),
    {"name": "dpo", "beta": 0.5, "ld_alpha": 0.6, "use_weighting": True, "f_divergence": "js"},
    {"name": "ipo", "beta": 0.5, "ld_alpha": 0.0, "use_weighting": True, "f_divergence": "forward_kl"},
    {"name": "sigmoid_norm", "beta": 2.0, "ld_alpha": 0.5, "use_weighting": True},
]
FLOAT32_CASES = [  # TRL's α-divergence clamp exists for float16/bfloat16/float32 only (a KeyError on float64)
    {"name": n, "beta": 0.5, "f_divergence": "alpha", "f_alpha": a} for n in ("dpo", "ipo", "discopop")
    for a in (0.3, 0.8)] + [{"name": "dpo", "beta": 0.5, "f_divergence": "alpha", "ld_alpha": 0.5,
                             "use_weighting": True}]


def with_trl_defaults(cfg: dict) -> dict:
    """prefkit's defaults where they differ from DPOConfig's, made explicit on both sides."""
    extra = {"bco_pair": {"reward_shift": False}, "robust_dpo": {"label_smoothing": 0.1}}.get(cfg["name"], {})
    return {**extra, **cfg}


@pytest.mark.parametrize("cfg", TRL_CASES + FLOAT32_CASES,
                         ids=[f"{c['name']}-{i}" for i, c in enumerate(TRL_CASES + FLOAT32_CASES)])
def test_trl_dpo_trainer_on_per_token_log_probs(token_data, cfg):
    assert trl.__version__ == "1.16.0"
    d = token_data
    dtype = torch.float32 if cfg in FLOAT32_CASES else torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    cfg = with_trl_defaults(cfg)
    logits = d["logits"].to(dtype).clone().requires_grad_(True)
    trl_loss, trl_logged = trl_side(d, logits, [LOSS_TYPES[cfg["name"]]], **trl_settings(cfg))
    if cfg["name"] == "slic" and cfg.get("use_weighting"):
        # TRL 1.16 multiplies hinge's ReLU output by the weights in place (`*=`), which autograd
        # saved for its backward: TRL's loss has no gradient, so only the value is compared
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(trl_loss, logits)
        trl_grad = None
    else:
        (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    for recompute in (True, False):
        ours, logged = prefkit_side(d, cfg, logits, recompute)
        (grad,) = torch.autograd.grad(ours, logits)
        assert abs(trl_loss.item()) > 1e-3 and float(grad.abs().max()) > 1e-4
        torch.testing.assert_close(ours.to(dtype), trl_loss.detach(), rtol=tol, atol=tol)
        if trl_grad is None:
            continue
        torch.testing.assert_close(grad, trl_grad, rtol=tol, atol=tol)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert float(logged[key]) == pytest.approx(trl_logged[key], rel=tol, abs=tol), key


def test_trl_logs_desensitised_log_probs_prefkit_the_plain_ones(token_data):
    # a deliberate difference: with ld_alpha TRL's logps/chosen are the desensitised sums; prefkit's stay
    # the policy's log-probs (comparable across a sweep's objectives); the rewards agree (above)
    d = token_data
    cfg = {"name": "dpo", "beta": 0.5, "ld_alpha": 0.3}
    _, trl_logged = trl_side(d, d["logits"], ["sigmoid"], **trl_settings(cfg))
    _, logged = prefkit_side(d, cfg, d["logits"])
    _, plain = prefkit_side(d, {"name": "dpo", "beta": 0.5}, d["logits"])
    assert float(logged["logps/chosen"]) == float(plain["logps/chosen"])
    assert abs(float(logged["logps/chosen"]) - trl_logged["logps/chosen"]) > 1e-3


def test_trl_applies_label_smoothing_only_where_prefkit_has_the_option(token_data):
    """TRL 1.16 reads `label_smoothing` in robust, exo_pair, aot and aot_unpaired, whose prefkit
    objectives take it (robust_dpo, exo, aot, aot_unpaired); its `sigmoid` ignores it, so TRL's
    sigmoid with label smoothing is prefkit's dpo, not cdpo (pre-1.0 TRL's sigmoid smoothing)."""
    import inspect

    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    branches = source.split('loss_type == "')[1:]
    reads = {b.split('"')[0] for b in branches if "self.label_smoothing" in b.split("elif")[0]}
    assert reads == {"robust", "exo_pair", "aot", "aot_unpaired"}
    for name in ("robust_dpo", "exo", "aot", "aot_unpaired"):
        build({"name": name, "label_smoothing": 0.1})
    d = token_data
    trl_loss, _ = trl_side(d, d["logits"], ["sigmoid"], beta=0.5, label_smoothing=0.2)
    dpo, _ = prefkit_side(d, {"name": "dpo", "beta": 0.5}, d["logits"])
    cdpo, _ = prefkit_side(d, {"name": "cdpo", "beta": 0.5, "label_smoothing": 0.2}, d["logits"])
    torch.testing.assert_close(dpo, trl_loss, rtol=1e-12, atol=1e-12)
    assert abs(float(cdpo) - float(trl_loss)) > 1e-3


# --- (c) end to end: a real DPOTrainer on a tiny model ---------------------------------------------

E2E = [
    ({"loss_type": ["sigmoid"], "beta": 0.1, "ld_alpha": 0.5}, {"name": "dpo", "beta": 0.1, "ld_alpha": 0.5}),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "use_weighting": True},
     {"name": "dpo", "beta": 0.1, "use_weighting": True}),
    ({"loss_type": ["ipo"], "beta": 0.1, "f_divergence_type": "js_divergence", "ld_alpha": 0.3,
      "use_weighting": True}, {"name": "ipo", "beta": 0.1, "f_divergence": "js", "ld_alpha": 0.3,
                               "use_weighting": True}),
    ({"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "alpha_divergence",
      "f_alpha_divergence_coef": 0.3}, {"name": "dpo", "beta": 0.1, "f_divergence": "alpha", "f_alpha": 0.3}),
]


@pytest.fixture(scope="module")
def tiny_trl(tmp_path_factory):
    """A tiny model and a 4-pair dataset, as tests/test_trl_parity.py sets them up."""
    from test_trl_parity import ARCH as TRL_ARCH

    from prefkit import synthetic
    from prefkit.embedded import embedded_dir
    from prefkit.models import load_tokenizer

    root = tmp_path_factory.mktemp("trl_modifiers")
    path = str(embedded_dir("trl", TRL_ARCH, root / "cache"))
    rows = synthetic.preference_examples(4, 1, "train")
    data = {"prompt": [r["prompt"] for r in rows], "chosen": [" " + r["completions"][0] for r in rows],
            "rejected": [" " + r["completions"][1] for r in rows]}
    return {"path": path, "tok": load_tokenizer(path), "data": data, "root": root}


@pytest.mark.parametrize("trl_cfg, cfg", E2E, ids=[c[1]["name"] + str(i) for i, c in enumerate(E2E)])
def test_dpo_trainer_end_to_end(trl_cfg, cfg, tiny_trl):
    from test_trl_parity import assert_same_grads, dpo_trainer, grads

    from prefkit.modules import StatsLM, reference_hidden

    trainer, reference, batch = dpo_trainer(tiny_trl, **trl_cfg)
    model = trainer.model
    n = batch["input_ids"].shape[0] // 2
    order = torch.arange(2 * n).view(2, n).T.flatten()  # TRL's [chosen; rejected] -> prefkit's pairs

    def ours():
        obj = build(cfg)[0]
        ids, mask = batch["input_ids"][order], batch["attention_mask"][order]
        labels = ids.masked_fill(batch["completion_mask"][order] == 0, IGNORE)
        ref = reference_hidden(reference, ids, mask, labels)
        stats, _ = StatsLM(model)(ids, mask, labels, reference=ref, req=obj.needs.tokens, chunk_size=8,
                                  group_size=2)

        def view(t):
            return None if t is None else t.view(n, 2)

        g = Groups(logps=view(stats.logps), lengths=view(stats.lengths), ref_logps=view(stats.ref_logps),
                   prefix_logps=view(stats.prefix_logps), ref_prefix_logps=view(stats.ref_prefix_logps),
                   log_sum_sq_probs=view(stats.log_sum_sq_probs))
        return obj.loss(g).loss

    trl_loss = trainer._compute_loss(model, batch, False)
    loss = ours()
    assert abs(trl_loss.item()) > 1e-3
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-5, check_dtype=False)
    assert_same_grads(grads(model, trl_loss), grads(model, ours()))


# --- (d) the token statistics ----------------------------------------------------------------------

@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_log_sum_sq_probs_matches_the_full_vocabulary(recompute, chunk):
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randn(11, 4, generator=gen,
                                                                                           dtype=torch.float64)
    targets = torch.randint(0, 11, (9,), generator=gen)
    got = token_stats(hidden, targets, Head(weight), req=TokenRequest(log_sum_sq_probs=True, temperature=0.7),
                      chunk_size=chunk, recompute=recompute)
    p = F.softmax(hidden @ weight.T / 0.7, -1)
    torch.testing.assert_close(got["log_sum_sq_probs"], (p ** 2).sum(-1).log(), rtol=1e-12, atol=1e-12)
    assert not got["log_sum_sq_probs"].requires_grad


def naive_prefix(labels, per_token_value, group_size):
    """Σ of the first min over the group of response tokens, sequence by sequence, with loops."""
    values = iter(per_token_value.tolist())
    tokens = [[next(values) for _ in range(int((row[1:] != IGNORE).sum()))] for row in labels]
    out = []
    for s, seq in enumerate(tokens):
        group = tokens[s - s % group_size: s - s % group_size + group_size]
        out.append(sum(seq[:min(len(x) for x in group)]))
    return out


@pytest.mark.parametrize("group_size", [2, 3])
@pytest.mark.parametrize("recompute", [True, False])
def test_shared_prefix_sums_match_a_naive_loop_with_gradients(group_size, recompute):
    gen = torch.Generator().manual_seed(group_size)
    lens = [3, 5, 1, 1, 4, 2] if group_size == 2 else [3, 5, 1, 4, 4, 6]
    width = 3 + max(lens)
    labels = torch.full((6, width), IGNORE)
    for s, n in enumerate(lens):
        start = 1 + s % 2  # prompts of different lengths
        labels[s, start + 1:start + 1 + n] = torch.randint(0, V, (n,), generator=gen)
    hidden = torch.randn(6, width, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, generator=gen, dtype=torch.float64)
    ref_hidden = torch.randn(sum(lens), 4, generator=gen, dtype=torch.float64)
    ref = Reference(ref_hidden, Head(weight * 0.5))
    stats = stats_from_hidden(hidden, Head(weight), torch.ones_like(labels), labels, reference=ref,
                              req=TokenRequest(shared_prefix=True), chunk_size=2, recompute=recompute,
                              group_size=group_size)
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    targets = labels[:, 1:][rows, cols]
    logp = F.log_softmax(hidden[rows, cols] @ weight.T, -1).gather(-1, targets[:, None])[:, 0]
    ref_logp = F.log_softmax(ref_hidden @ (0.5 * weight).T, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(stats.prefix_logps, t64(naive_prefix(labels, logp, group_size)), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(stats.ref_prefix_logps, t64(naive_prefix(labels, ref_logp, group_size)),
                               rtol=1e-12, atol=1e-12)
    # the gradient of Σ c_s prefix_s reaches exactly the prefix tokens' hidden states
    c = torch.arange(1.0, 7.0, dtype=torch.float64)
    (got,) = torch.autograd.grad((c * stats.prefix_logps).sum(), hidden)
    keep = shared_prefix(rows, stats.lengths, group_size)
    (want,) = torch.autograd.grad((c[rows] * logp * keep).sum(), hidden)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    shortest = 0 if group_size == 2 else 2  # the group's shortest response: its prefix is all of it
    assert stats.prefix_logps[shortest] == stats.logps[shortest]
    assert (stats.prefix_logps != stats.logps).sum() >= 2


def test_shared_prefix_needs_the_group_size():
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2], [IGNORE, IGNORE, 3, IGNORE]])
    with pytest.raises(ValueError, match="group size"):
        stats_from_hidden(torch.zeros(2, 4, 3), Head(torch.zeros(5, 3)), torch.ones_like(labels), labels,
                          req=TokenRequest(shared_prefix=True))


# --- (e) needs, options and the errors --------------------------------------------------------------

def test_needs_of_the_modifiers():
    needs = build({"name": "dpo", "ld_alpha": 0.5})[0].needs
    assert needs.reference == "logits" and needs.tokens.shared_prefix  # per-token reference: online
    assert not needs.tokens.needs_reference_logits  # ... but no reference distribution statistic
    needs = build({"name": "dpo", "use_weighting": True})[0].needs
    assert needs.reference == "logps" and needs.cacheable and needs.tokens.log_sum_sq_probs
    needs = build({"name": "dpo", "f_divergence": "js"})[0].needs
    assert needs == build({"name": "dpo"})[0].needs
    needs = build({"name": "slic", "reference_free": True, "ld_alpha": 0.5})[0].needs
    assert needs.reference == "none" and needs.tokens.shared_prefix  # the policy's prefix only


def test_an_ld_alpha_run_cannot_use_the_reference_cache():
    from prefkit.reference import cache_wanted

    needs = build({"name": "dpo", "ld_alpha": 0.5})[0].needs
    assert not cache_wanted("auto", needs, "dpo")
    with pytest.raises(UserError, match="cannot be precomputed"):
        cache_wanted("true", needs, "dpo")


def test_the_options_each_objective_takes():
    from prefkit.objectives import REGISTRY

    takes = {n: set(c.modifier_options) for n, c in REGISTRY.items() if getattr(c, "modifier_options", ())}
    f_losses = {"dpo", "cdpo", "ipo", "slic", "robust_dpo", "discopop", "sigmoid_norm"}
    assert {n for n, t in takes.items() if "f_divergence" in t} == f_losses
    assert all("f_alpha" in takes[n] for n in f_losses)
    assert {n for n, t in takes.items() if "ld_alpha" in t} == f_losses | {"nca_pair", "bco_pair", "sppo_hard", "aot",
                                                                         "aot_unpaired", "apo_zero", "apo_down"}
    assert {n for n, t in takes.items() if "use_weighting" in t} == f_losses | {"nca_pair", "bco_pair", "sppo_hard",
                                                                              "apo_zero", "apo_down"}


@pytest.mark.parametrize("cfg, match", [
    ({"name": "dpo", "f_divergence": "hellinger"}, "unknown f_divergence 'hellinger'"),
    ({"name": "dpo", "f_divergence": "alpha", "f_alpha": 1.0}, r"f_alpha must be a number in \(0, 1\)"),
    ({"name": "dpo", "f_divergence": "alpha", "f_alpha": 0.0}, r"f_alpha must be a number in \(0, 1\)"),
    ({"name": "dpo", "f_divergence": "alpha", "f_alpha": -0.5}, r"f_alpha must be a number in \(0, 1\)"),
    ({"name": "dpo", "f_divergence": "alpha", "f_alpha": "half"}, r"f_alpha must be a number in \(0, 1\)"),
    ({"name": "dpo", "f_divergence": "js", "f_alpha": 0.3}, "f_alpha=0.3 is used only with f_divergence=alpha"),
    ({"name": "dpo", "ld_alpha": 1.5}, r"ld_alpha must be null \(off\) or a number in \[0, 1\]"),
    ({"name": "dpo", "ld_alpha": -0.1}, r"ld_alpha must be null \(off\) or a number in \[0, 1\]"),
    ({"name": "dpo", "ld_alpha": True}, r"ld_alpha must be null"),
    ({"name": "dpo", "use_weighting": "yes"}, "use_weighting must be true or false"),
    ({"name": "nca_pair", "f_divergence": "js"}, "objective nca_pair does not take f_divergence: f-DPO"),
    ({"name": "bco_pair", "f_divergence": "js"}, "objective bco_pair does not take f_divergence"),
    ({"name": "aot", "f_alpha": 0.3}, "objective aot does not take f_alpha"),
    ({"name": "aot", "use_weighting": True}, "objective aot does not take use_weighting: .*sort the pairs"),
    ({"name": "simpo", "ld_alpha": 0.5}, "objective simpo does not take ld_alpha"),
    ({"name": "tdpo2", "use_weighting": False}, "objective tdpo2 does not take use_weighting"),
    ({"name": "slic", "reference_free": True, "f_divergence": "js"}, "needs a reference model"),
    ({"name": "bco_pair", "ld_alpha": 2.0}, "objective bco_pair: ld_alpha must be"),
])
def test_options_that_do_not_fit_are_one_clear_user_error(cfg, match):
    with pytest.raises(UserError, match=match) as err:
        build(cfg)
    assert "\n" not in str(err.value)


def test_an_objective_may_have_an_option_of_the_same_name_of_its_own():
    from prefkit.objectives import REGISTRY, LossOutput, Needs, Objective, objective, register

    @objective("own_ld_test", needs=Needs())
    def own_ld(g: Groups, ld_alpha: float = 0.3) -> LossOutput:
        return LossOutput(ld_alpha * g.logps.sum())

    class OwnWeighting(Objective):
        def __init__(self, use_weighting: str = "uniform"):
            self.use_weighting = use_weighting

    register("own_weighting_test")(OwnWeighting)
    try:
        obj = build({"name": "own_ld_test", "ld_alpha": 0.5})[0]
        assert obj.hparams == {"ld_alpha": 0.5} and obj.modifiers.ld_alpha is None
        assert build({"name": "own_weighting_test", "use_weighting": "x"})[0].use_weighting == "x"
        with pytest.raises(UserError, match="does not take f_divergence"):
            build({"name": "own_ld_test", "f_divergence": "js"})
    finally:
        REGISTRY.pop("own_ld_test")
        REGISTRY.pop("own_weighting_test")


def test_the_yamls_give_the_modifier_defaults():
    import yaml

    from prefkit.config import conf_dir
    from prefkit.objectives import REGISTRY
    from prefkit.objectives.modifiers import MODIFIER_OPTIONS

    for name, cls in REGISTRY.items():
        path = conf_dir() / "objective" / f"{name}.yaml"
        if not path.exists():
            continue
        cfg = yaml.safe_load(path.read_text())
        for option in getattr(cls, "modifier_options", ()):
            assert cfg.get(option, "missing") == MODIFIER_OPTIONS[option], (name, option)
        assert not set(MODIFIER_OPTIONS) - set(getattr(cls, "modifier_options", ())) & set(cfg), name


def test_cli_overrides_reach_the_objective():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from prefkit.config import conf_dir, register_resolvers, validate

    validate("align", ["objective=dpo", "objective.f_divergence=js", "objective.ld_alpha=0.5",
                       "objective.use_weighting=true"])
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("align", ["objective=dpo", "objective.f_divergence=alpha", "objective.f_alpha=0.25",
                                "objective.ld_alpha=0.5"])
    GlobalHydra.instance().clear()
    obj = build(OmegaConf.to_container(cfg.objective, resolve=True))[0]
    assert (obj.modifiers.f_divergence, obj.modifiers.f_alpha, obj.modifiers.ld_alpha) == ("alpha", 0.25, 0.5)
    with pytest.raises(UserError, match="f_alpha"):
        validate("align", ["objective=dpo", "objective.f_alpha=abc"])

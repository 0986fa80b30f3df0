"""The objective API: what an objective declares it needs, what it receives, what it returns.

An objective is a function (or, if it keeps state across steps, a class) from a `Groups` batch
to a `LossOutput`, registered under a name that a YAML file in conf/objective/ selects:

    @objective("my_dpo", needs=Needs(reference="logps"))
    def my_dpo(g: Groups, beta: float = 0.1) -> LossOutput:
        margin = beta * (g.logratios[:, 0] - g.logratios[:, 1])
        return LossOutput(-F.logsigmoid(margin).mean(), rewards=beta * g.logratios.detach())

    # conf/objective/my_dpo.yaml:   name: my_dpo \n beta: 0.1

The trainer feeds each objective only what its `Needs` ask for: scalar reference log-probs
(precomputed once per run and cached), the reference's full distribution at every response
token (for a token-level KL or logit mixing), per-completion rewards from the data, K
completions per prompt, a scalar reward head on the policy, or no reference model at all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.modifiers import MODIFIER_OPTIONS, WHY_NOT, Modifiers
from prefkit.stateful import Stateful
from prefkit.tokenstats import TokenRequest


@dataclass(frozen=True)
class Needs:
    reference: str = "logps"  # "none" | "logps" (scalar, cacheable) | "logits" (full distribution, online)
    cacheable: bool = True  # False when the reference moves (TR-DPO): its log-probs cannot be precomputed
    rewards: bool = False  # per-completion rewards must come with the data (or from a reward model)
    group_size: int | None = 2  # completions per prompt: 2 = pairs; None = any K >= 2
    reward_head: bool = False  # a scalar reward head on the policy's last hidden state (DRDO)
    # "preference": ranked completions; "unpaired": one completion with a desirable/undesirable
    # label per prompt, plus a mismatched completion for the KL reference point (KTO)
    rows: str = "preference"
    tokens: TokenRequest = field(default_factory=TokenRequest)

    def __post_init__(self) -> None:
        if self.reference not in ("none", "logps", "logits"):
            raise ValueError(f"Needs.reference must be none, logps or logits, not {self.reference!r}")
        if self.rows not in ("preference", "unpaired"):
            raise ValueError(f"Needs.rows must be preference or unpaired, not {self.rows!r}")
        if self.tokens.needs_reference_logits and self.reference != "logits":
            object.__setattr__(self, "reference", "logits")


@dataclass
class Groups:
    """A batch of B prompts with K completions each; every tensor is [B, K], completion 0 the
    preferred one (for pairs: [chosen, rejected]; for K-way data: sorted best first)."""

    logps: Tensor  # Σ_t log π_θ(y_t | x, y_<t), differentiable
    lengths: Tensor  # response tokens
    training: bool = True
    ref_logps: Tensor | None = None
    kl: Tensor | None = None  # Σ_t KL(π_ref ‖ π_θ) along the response, differentiable (TDPO)
    reverse_kl: Tensor | None = None  # Σ_t KL(π_θ ‖ π_ref), no gradient
    mixture_logps: dict[float, Tensor] = field(default_factory=dict)  # λ -> log-probs under the logit mixture
    rewards: Tensor | None = None  # rewards from the data or a reward model, no gradient
    reward_pred: Tensor | None = None  # the policy's reward head, differentiable
    labels: Tensor | None = None  # [B] bool, unpaired rows: completion 0 desirable (True) or not
    log_sum_sq_probs: Tensor | None = None  # Σ_t log Σ_v π_θ(v|s_t)², no gradient (WPO's weights)
    prefix_logps: Tensor | None = None  # logps over the group's shared prefix (LD-DPO), differentiable
    ref_prefix_logps: Tensor | None = None  # ref_logps over the same prefix
    # set by the modifiers (`Modifiers.prepare`) rather than the trainer:
    f_scores: Tensor | None = None  # f′(π_θ/π_ref) under an f-divergence (f-DPO); None: the log-ratio
    weights: Tensor | None = None  # [B] per-prompt loss weights (WPO); None: all 1

    @property
    def scores(self) -> Tensor:
        """What the losses of the chosen − rejected difference compare: f′(π_θ(y|x)/π_ref(y|x))
        under an f-divergence (f-DPO), the log-ratio h under DPO's reverse KL."""
        return self.logratios if self.f_scores is None else self.f_scores

    def reduce(self, losses: Tensor) -> Tensor:
        """The batch's loss from per-prompt losses [B]: their mean, weighted when `weights` is set."""
        return losses.mean() if self.weights is None else (self.weights * losses).mean()

    @property
    def logratios(self) -> Tensor:
        """log π_θ(y|x) − log π_ref(y|x)."""
        if self.ref_logps is None:
            raise RuntimeError("this objective declared no reference, so it has no log-ratios")
        return self.logps - self.ref_logps

    @property
    def mean_logps(self) -> Tensor:
        """Length-normalised log-probs (SimPO, ORPO, RRHF)."""
        return self.logps / self.lengths.clamp(min=1)


@dataclass
class LossOutput:
    loss: Tensor  # scalar, averaged over the batch's groups
    rewards: Tensor | None = None  # [B, K] implicit rewards (detached), logged with TRL's names
    metrics: dict[str, Any] = field(default_factory=dict)


class Objective(Stateful):
    """Base class. Subclasses set `name` and `needs` (or compute `needs` from their options)
    and implement `loss`. Stateful objectives also override state_dict/load_state_dict and
    on_optimizer_step (see prefkit.trainer.Stateful)."""

    name: str = ""
    needs: Needs = Needs()
    logs: tuple[str, ...] = ()  # the metrics it logs beyond TRL's (see `logged_metrics`)
    modifier_options: tuple[str, ...] = ()  # the MODIFIER_OPTIONS it takes
    modifiers: Modifiers = Modifiers()

    def loss(self, g: Groups) -> LossOutput:
        raise NotImplementedError

    def bind(self, **context: Any) -> None:
        """Receive trainer context (e.g. the reference model, for TR-DPO). Default: nothing."""


REGISTRY: dict[str, Callable[..., Objective]] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make a stateful Objective subclass selectable as `objective=<name>`."""
    def deco(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def options_of(modifiers: tuple[str, ...]) -> tuple[str, ...]:
    """The options of these modifiers (f_divergence brings f_alpha)."""
    unknown = set(modifiers) - {"f_divergence", "ld_alpha", "use_weighting"}
    if unknown:
        raise ValueError(f"unknown modifiers {sorted(unknown)}")
    return tuple(o for o in MODIFIER_OPTIONS if o in modifiers or (o == "f_alpha" and "f_divergence" in modifiers))


def objective(name: str, needs: Needs | Callable[..., Needs], logs: tuple[str, ...] = (),
              modifiers: tuple[str, ...] = ()) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Function decorator: register `fn(groups, **hyperparameters) -> LossOutput` as an objective.
    `needs` may be a function of the hyperparameters when an option changes what is needed; `logs`
    names the metrics its LossOutput carries (an experiment's claims are checked against them);
    `modifiers` the TRL options it takes around its loss ("f_divergence": it reads `g.scores`;
    "use_weighting": it reduces with `g.reduce`; "ld_alpha"), see `Modifiers`."""
    takes = options_of(modifiers)

    def deco(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        params = {k for k in list(inspect.signature(fn).parameters)[1:]}

        class FunctionObjective(Objective):
            def __init__(self, **hparams: Any):
                unknown = set(hparams) - params - set(takes)
                if unknown:
                    raise UserError(f"objective {name} has no option {', '.join(sorted(unknown))}; "
                                    f"valid: {', '.join(sorted(params | set(takes))) or 'none'}")
                self.hparams = hparams
                self.fn_hparams = {k: v for k, v in hparams.items() if k in params}
                self.modifiers = Modifiers.parse(name, **{k: v for k, v in hparams.items() if k in takes})
                base = needs(**self.fn_hparams) if callable(needs) else needs
                self.needs = self.modifiers.widen(base, name)

            def loss(self, g: Groups) -> LossOutput:
                return fn(self.modifiers.prepare(g), **self.fn_hparams)

        FunctionObjective.__name__ = FunctionObjective.__qualname__ = f"{name}_objective"
        FunctionObjective.__doc__ = fn.__doc__
        FunctionObjective.name = name
        FunctionObjective.logs = tuple(logs)
        FunctionObjective.modifier_options = takes
        FunctionObjective.fn_params = frozenset(params)
        REGISTRY[name] = FunctionObjective
        fn.objective_class = FunctionObjective
        return fn
    return deco


# Options every objective accepts, handled around the loss rather than inside it.
COMMON_OPTIONS = ("name", "sft_weight", "import")


def build(cfg: dict[str, Any]) -> tuple[Objective, float]:
    """Instantiate the objective a config selects; returns it and its SFT weight."""
    import importlib
    import sys

    import prefkit.objectives  # noqa: F401  (registers the built-in objectives)
    from prefkit.config import importable_dirs

    cfg = dict(cfg)
    for module in (cfg.get("import") or []) if isinstance(cfg.get("import"), list) else \
            ([cfg["import"]] if cfg.get("import") else []):
        sys.path[:0] = [d for d in importable_dirs() if d not in sys.path]
        try:
            importlib.import_module(module)
        except Exception as err:
            raise UserError(f"objective {cfg['name']}: importing {module} failed ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    name = str(cfg["name"])
    obj = instantiate(name, {k: v for k, v in cfg.items() if k not in COMMON_OPTIONS})
    return obj, float(cfg.get("sft_weight") or 0.0)


def _accepts(cls: Callable[..., Objective], option: str) -> bool:
    """Whether an objective takes this option: as a modifier, or as an option of its own (a user's
    objective may have an `ld_alpha` of its own making)."""
    if option in getattr(cls, "modifier_options", ()):
        return True
    params = getattr(cls, "fn_params", None)
    if params is None:  # a class: its constructor's
        params = inspect.signature(cls).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return True
    return option in params


def instantiate(name: str, hparams: dict[str, Any]) -> Objective:
    """The registered objective `name` with these options (UserError for any that do not fit)."""
    if name not in REGISTRY:
        raise UserError(f"unknown objective '{name}'; registered: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    for option in MODIFIER_OPTIONS:
        if option in hparams and not _accepts(cls, option):
            takers = sorted(n for n, c in REGISTRY.items() if option in getattr(c, "modifier_options", ()))
            why = getattr(cls, "modifier_note", "") or WHY_NOT[option]
            raise UserError(f"objective {name} does not take {option}: {why}; objectives that do: "
                            f"{', '.join(takers) or 'none'}")
    try:
        return cls(**hparams)
    except TypeError as err:
        raise UserError(f"objective {name}: {err}") from None


def with_tokens(needs: Needs, **changes: Any) -> Needs:
    return replace(needs, tokens=replace(needs.tokens, **changes))


def trl_metrics(g: Groups, out: LossOutput) -> dict[str, Tensor]:
    """TRL's metric names: first completion = chosen, last = rejected."""
    metrics: dict[str, Tensor] = {
        "logps/chosen": g.logps[:, 0].detach().mean(), "logps/rejected": g.logps[:, -1].detach().mean()}
    if out.rewards is not None:
        chosen, rejected = out.rewards[:, 0].detach(), out.rewards[:, -1].detach()
        metrics.update({
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
        })
    return metrics


TRL_METRICS = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies")


def sft_nll(g: Groups) -> Tensor:
    """Token-mean NLL of the chosen responses over the batch (TRL's `sft` loss term); for unpaired
    rows, of the desirable ones (zero when the micro-batch has none)."""
    if g.labels is not None:
        keep = g.labels.bool()
        return -g.logps[keep, 0].sum() / g.lengths[keep, 0].sum().clamp(min=1)
    return -g.logps[:, 0].sum() / g.lengths[:, 0].sum().clamp(min=1)


def logsigmoid(x: Tensor) -> Tensor:
    return torch.nn.functional.logsigmoid(x)

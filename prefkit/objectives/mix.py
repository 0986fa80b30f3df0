"""Loss mixtures: `objective=mix`, a weighted sum of registered objectives on one forward pass,

    L = Σ_i w_i · L_i,

as MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
Mixed Preference Optimization": DPO 0.8 + BCO 0.2 + SFT 1.0) or RPO (Pang et al. 2024, "Iterative
Reasoning Preference Optimization": DPO + NLL) combine them; TRL 1.16's `loss_type=[...]` with
`loss_weights`. Each part is {name: <objective>, weight: w, <its own options>}.

The parts share one policy forward and one reference pass, so the mixture needs the union of
their needs: the strictest reference (none < cached log-probs < online), rewards or a reward head
if any part reads them, every token statistic any part asks for; the group sizes, row kinds and
logit temperatures must agree. Each part's loss and metrics are logged under its name
(`dpo/loss`, `bco_pair/rewards/margins`; a second part of the same objective is `dpo_2`), and
stateful parts keep their state, checkpointed under the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from torch import Tensor

from prefkit.errors import UserError
from prefkit.objectives.base import (
    COMMON_OPTIONS,
    Groups,
    LossOutput,
    Needs,
    Objective,
    instantiate,
    register,
    trl_metrics,
)
from prefkit.tokenstats import TokenRequest

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
# MPO's mixture (Wang et al. 2024; TRL's documented loss_weights [0.8, 0.2, 1.0]), conf/objective/mix.yaml's
MPO = ({"name": "dpo", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2}, {"name": "sft", "weight": 1.0})
_REFERENCE_ORDER = ("none", "logps", "logits")


@dataclass
class Part:
    key: str  # the metrics' and the state's prefix: the objective's name (name_2, ... for repeats)
    weight: float
    objective: Objective

    def metric(self, name: str) -> str:
        """A metric of this part as the mixture logs it: under the part's key, without repeating
        the objective's own prefix (bco_pair's `bco_pair/delta` stays `bco_pair/delta`)."""
        own = f"{self.objective.name}/"
        return self.key + "/" + (name[len(own):] if name.startswith(own) else name)


def _plain(parts: Any) -> Any:
    """Hydra's ListConfig/DictConfig as plain Python (a config composed without to_container)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(parts, resolve=True) if OmegaConf.is_config(parts) else parts


def _check_values(key: str, options: dict[str, Any]) -> None:
    """The ranges prefkit.schema enforces on `objective.<option>`, for a part's options (the schema
    sees only the mixture's top level)."""
    from prefkit.schema import RULES

    for rule in RULES:
        section, _, leaf = rule.key.partition(".")
        if section == "objective" and leaf in options and not rule.check(options[leaf]):
            raise UserError(f"mix part {key}: bad value for {leaf}: {options[leaf]!r} (must be {rule.describe()})")


def _parts(parts: Any) -> list[Part]:
    parts = _plain(parts)
    if not isinstance(parts, (list, tuple)) or not parts:
        raise UserError("mix: parts must be a non-empty list of {name: <objective>, weight: w, <options>}")
    out: list[Part] = []
    for i, spec in enumerate(parts):
        if not isinstance(spec, dict) or "name" not in spec:
            raise UserError(f"mix: part {i + 1} must be a mapping with a name, e.g. {{name: dpo, weight: 1.0}}; "
                            f"got {spec!r}")
        options = dict(spec)
        name, weight = str(options.pop("name")), options.pop("weight", 1.0)
        if name == "mix":
            raise UserError("mix: a part cannot itself be a mix; list its parts in the outer one")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise UserError(f"mix part {name}: weight must be a number >= 0, got {weight!r}")
        common = sorted(set(options) & set(COMMON_OPTIONS))
        if common:
            raise UserError(f"mix part {name}: {', '.join(common)} belongs to the mixture, not a part "
                            "(an NLL term is a part: {name: sft, weight: w})")
        repeats = sum(p.objective.name == name for p in out)
        key = name if repeats == 0 else f"{name}_{repeats + 1}"
        _check_values(key, options)
        out.append(Part(key, float(weight), instantiate(name, options)))
    return out


def _merge_tokens(requests: list[TokenRequest]) -> TokenRequest:
    """One token request that computes what each of `requests` asks for."""
    merged: dict[str, Any] = {}
    for f in fields(TokenRequest):
        values = [getattr(r, f.name) for r in requests]
        if isinstance(f.default, bool):
            merged[f.name] = any(values)
        elif f.name == "temperature":
            if len(set(values)) > 1:
                raise UserError(f"mix: parts compute log-probs at different logit temperatures "
                                f"({sorted(set(values))}); one forward pass has one temperature")
            merged[f.name] = values[0]
        elif f.name == "mixtures":
            merged[f.name] = tuple(dict.fromkeys(lam for v in values for lam in v))
        elif f.name == "mixture_dtype":
            dtypes = {r.mixture_dtype for r in requests if r.mixtures}
            if len(dtypes) > 1:
                raise UserError(f"mix: parts compute logit mixtures in different dtypes ({sorted(map(str, dtypes))})")
            merged[f.name] = dtypes.pop() if dtypes else f.default
        else:  # a new TokenRequest field must say here how requests combine
            raise NotImplementedError(f"mix cannot merge TokenRequest.{f.name}")
    return TokenRequest(**merged)


def union_needs(parts: list[Part]) -> Needs:
    """What one forward and one reference pass must provide for every part."""
    needs = [p.objective.needs for p in parts]
    sizes = {n.group_size for n in needs} - {None}
    if len(sizes) > 1:
        by_part = ", ".join(f"{p.key}: {p.objective.needs.group_size or 'any K'}" for p in parts)
        raise UserError(f"mix: parts take different numbers of completions per prompt ({by_part})")
    rows = {n.rows for n in needs}
    if len(rows) > 1:
        raise UserError("mix: parts read different kinds of rows (" +
                        ", ".join(f"{p.key}: {p.objective.needs.rows}" for p in parts) + ")")
    moving = [p.key for p in parts if not p.objective.needs.cacheable]
    if len(moving) > 1:
        raise UserError(f"mix: {' and '.join(moving)} would each move the one shared reference; use one of them")
    return Needs(reference=max((n.reference for n in needs), key=_REFERENCE_ORDER.index),
                 cacheable=not moving, rewards=any(n.rewards for n in needs),
                 group_size=sizes.pop() if sizes else None, reward_head=any(n.reward_head for n in needs),
                 rows=rows.pop(), tokens=_merge_tokens([n.tokens for n in needs]))


@register("mix")
class Mix(Objective):
    """Σ_i w_i · L_i over `parts` (see the module docstring). `rewards` (TRL's top-level
    `rewards/*`) are the first part's that has any; each part's are logged as `<key>/rewards/*`.
    A part that moves the reference (tr_dpo) moves it for every part: they share one."""

    modifier_note = "each part takes its own, e.g. parts: [{name: dpo, ld_alpha: 0.5}, {name: sft}]"

    def __init__(self, parts: Any = MPO):
        self.parts = _parts(parts)
        self.needs = union_needs(self.parts)
        self.logs = tuple(p.metric(m) for p in self.parts for m in ("loss", *REWARD_METRICS, *p.objective.logs))

    def loss(self, g: Groups) -> LossOutput:
        total: Tensor | float = 0.0
        rewards, metrics = None, {}
        for p in self.parts:
            # a part needing less than the mixture sees only what it declared (e.g. no reference)
            out = p.objective.loss(g if p.objective.needs.reference != "none" else replace(g, ref_logps=None))
            total = total + p.weight * out.loss
            own = {k: v for k, v in trl_metrics(g, out).items() if k in REWARD_METRICS}
            metrics.update({p.metric(k): v for k, v in {"loss": out.loss.detach(), **own, **out.metrics}.items()})
            if rewards is None:
                rewards = out.rewards
        return LossOutput(total, rewards=rewards, metrics=metrics)

    def bind(self, **context: Any) -> None:
        for p in self.parts:
            p.objective.bind(**context)

    def on_optimizer_step(self, accelerator) -> dict[str, float]:
        return {p.metric(k): v for p in self.parts for k, v in p.objective.on_optimizer_step(accelerator).items()}

    def on_skipped_step(self) -> None:
        for p in self.parts:
            p.objective.on_skipped_step()

    def state_dict(self) -> dict[str, Any]:
        return {f"{p.key}/{k}": v for p in self.parts for k, v in p.objective.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.parts:
            prefix = f"{p.key}/"
            p.objective.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

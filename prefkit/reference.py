"""Where an align step gets the reference's part of a micro-batch. One strategy per way of
having a reference, chosen once (`choose`) from the objective's Needs and the hardware, so the
step itself never branches on it:

    NoReference    the objective needs none (SimPO, ORPO, DRDO): nothing is loaded
    CachedLogps    scalar sequence log-probs, computed once per run and cached (DPO, IPO, EXO, ...)
    Online         a frozen copy of the initial model, run on every micro-batch (TDPO, ε-DPO)
    Moving         Online, with weights the objective moves during training (TR-DPO): never cached
    AdapterOff     LoRA: the policy itself with its adapter disabled (no second copy in memory)
    Sharded        FSDP / DeepSpeed ZeRO-3: the reference sharded too; its forward returns the
                   log-softmax rows the statistics need
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from prefkit import packing, refcache
from prefkit.data import Encoded
from prefkit.engine import is_sharded, prepare_reference
from prefkit.errors import UserError
from prefkit.models import freeze, is_peft, load_model
from prefkit.modules import ShardableReference, backbone, reference_hidden
from prefkit.objectives import Needs
from prefkit.tokenstats import Reference

Batch = dict[str, Tensor]


class ReferenceStrategy:
    """(What the token statistics need from the reference, cached sequence log-probs [B·K]) for
    the micro-batch `batch` made of the groups `indices` of `split`."""

    module: nn.Module | None = None  # the reference model, for objectives that move it

    def for_batch(self, batch: Batch, split: str, indices: list[int]) -> tuple[Reference | None, Tensor | None]:
        raise NotImplementedError


class NoReference(ReferenceStrategy):
    def for_batch(self, batch, split, indices):
        return None, None


@dataclass
class CachedLogps(ReferenceStrategy):
    logps: dict[str, Tensor]  # split -> [n_groups, K]

    def for_batch(self, batch, split, indices):
        return None, self.logps[split][indices].to(batch["input_ids"].device).flatten()


@dataclass
class Online(ReferenceStrategy):
    module: nn.Module

    def for_batch(self, batch, split, indices):
        return reference_hidden(self.module, **batch), None


class Moving(Online):
    """Online, but the objective updates its weights (TR-DPO's θ_ref ← α θ + (1 − α) θ_ref)."""


@dataclass
class AdapterOff(ReferenceStrategy):
    lm: nn.Module  # the peft policy

    def for_batch(self, batch, split, indices):
        return reference_hidden(self.lm, **batch, context=self.lm.disable_adapter), None


@dataclass
class Sharded(ReferenceStrategy):
    module: nn.Module  # a ShardableReference inside the engine
    temperature: float = 1.0
    chunk: int | None = None

    def for_batch(self, batch, split, indices):
        return self.module(**batch, temperature=self.temperature, chunk_size=self.chunk), None


@dataclass
class Setup:
    """What choosing a reference needs to know."""

    cfg: DictConfig  # the align config
    needs: Needs
    objective: str
    accelerator: Any
    policy_lm: nn.Module
    init_path: str
    groups: dict[str, list[list[Encoded]]]
    run: Path
    pad: int
    chunk: int | None
    inputs: dict[str, Any] = field(default_factory=dict)  # the job's lineage inputs (the cache key goes in)


def cache_wanted(setting: Any, needs: Needs, objective: str) -> bool:
    """reference.cache: auto (when the objective allows), true (required), false (always online)."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false"):
        raise UserError(f"reference.cache must be auto, true or false, not '{setting}'")
    cacheable = needs.reference == "logps" and needs.cacheable
    if value == "true" and not cacheable:
        why = "needs no reference" if needs.reference == "none" else (
            "needs the reference's full distribution" if needs.reference == "logits" else "moves its reference")
        raise UserError(f"reference.cache=true, but {objective} {why}: its reference cannot be precomputed")
    return cacheable and value != "false"


def choose(s: Setup) -> ReferenceStrategy:
    lora, sharded = is_peft(s.policy_lm), is_sharded(s.accelerator)
    if lora and sharded:
        raise UserError("peft=lora under FSDP/DeepSpeed is not supported; use hardware=gpu or hardware=ddp")
    if s.needs.reference == "none":
        return NoReference()
    temperature = s.needs.tokens.temperature
    if cache_wanted(s.cfg.reference.cache, s.needs, s.objective):
        return _cached(s, lora, sharded, temperature)
    if lora:
        return AdapterOff(s.policy_lm)
    if sharded:
        return Sharded(_load(s, sharded=True), temperature, s.chunk)
    reference = _load(s, sharded=False)
    return Online(reference) if s.needs.cacheable else Moving(reference)


def _load(s: Setup, sharded: bool) -> nn.Module:
    """The frozen initial model, placed for the engine."""
    lm = freeze(load_model(s.cfg.model, s.init_path, "reference"))
    packing.enable(backbone(lm), s.cfg.hardware.get("packing", False))
    if sharded:
        return prepare_reference(s.accelerator, ShardableReference(lm), s.cfg.hardware, s.cfg.model)
    return lm.to(s.accelerator.device)


def _cached(s: Setup, lora: bool, sharded: bool, temperature: float) -> CachedLogps:
    ref_dtype = str(s.cfg.model.dtype if lora else s.cfg.model.reference_dtype)
    key = refcache.cache_key(s.groups, s.init_path, ref_dtype, temperature)
    s.inputs["reference_logps_cache"] = key

    def make() -> nn.Module:  # only when the cache has to be computed
        return s.policy_lm.to(s.accelerator.device) if lora else _load(s, sharded)

    # one process computes and the others read its file (under a sharding engine all take part)
    with contextlib.nullcontext() if sharded else s.accelerator.main_process_first():
        logps = refcache.load_or_compute(
            s.run, key, s.groups, make, s.pad, s.accelerator.device, int(s.cfg.hardware.micro_batch_size) * 4,
            temperature, s.chunk, s.accelerator.is_main_process, context=s.policy_lm.disable_adapter if lora else None)
    return CachedLogps(logps)

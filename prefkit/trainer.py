"""The one training loop that sft, reward and align share.

A stage hands it a model, the number of training examples, and two functions: `loss_fn(indices,
train)` turns a micro-batch of example indices into (loss, metrics), `eval_fn()` returns held-out
metrics. The loop owns everything else: optimizer and schedule, gradient accumulation and
clipping, evaluation and checkpoints every N steps, exact resume, non-finite-loss skipping,
metrics.jsonl, the progress bar and (optionally) wandb.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from prefkit import checkpoint
from prefkit.console import console, log, progress
from prefkit.data import EpochSampler
from prefkit.errors import UserError
from prefkit.rundir import MetricsLog, atomic_dir, config_hash, write_json

LossFn = Callable[[list[int], bool], tuple[Tensor, dict[str, Any]]]


class Stateful:
    """Anything whose state must survive a resume (an objective's β, a moving reference...)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_optimizer_step(self, accelerator) -> dict[str, float]:
        """Called after each successful optimizer step; may return metrics to log."""
        return {}

    def on_skipped_step(self) -> None:
        """Called when a step is skipped for a non-finite loss (drop accumulated statistics)."""


def make_accelerator(hardware: DictConfig, model_cfg: DictConfig | None = None, train: DictConfig | None = None):
    """An Accelerator for the hardware config. DDP needs nothing but the launcher (accelerate
    launch / torchrun); FSDP and DeepSpeed ZeRO get their plugin from hardware.fsdp /
    hardware.deepspeed (the block to wrap from the model config)."""
    from accelerate import Accelerator

    precision = {"fp32": "no", "float32": "no", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                 "float16": "fp16"}.get(str(hardware.precision))
    if precision is None:
        raise UserError(f"unknown hardware.precision '{hardware.precision}'; valid: fp32, bf16, fp16")
    if hardware.get("num_threads"):
        torch.set_num_threads(int(hardware.num_threads))
    kwargs: dict[str, Any] = {}
    distributed = str(hardware.get("distributed", "none"))
    if distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        f = hardware.fsdp
        block = model_cfg.get("fsdp_block") if model_cfg is not None else None
        if not block:
            raise UserError("hardware=fsdp needs model.fsdp_block (the transformer block class to wrap)")
        version = int(f.get("version", 2))
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=version, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[str(block)],
            reshard_after_forward=bool(f.reshard_after_forward), cpu_offload=bool(f.cpu_offload),
            activation_checkpointing=bool(f.activation_checkpointing), state_dict_type="FULL_STATE_DICT",
            **({"use_orig_params": True} if version == 1 else {}))
    elif distributed == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        d = hardware.deepspeed
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=int(d.zero_stage), offload_optimizer_device=str(d.offload_optimizer),
            offload_param_device=str(d.offload_param), zero3_init_flag=False, zero3_save_16bit_model=True,
            gradient_clipping=float(train.max_grad_norm) if train is not None and train.get("max_grad_norm") else None)
    elif distributed not in ("none", "ddp"):
        raise UserError(f"unknown hardware.distributed '{distributed}'; valid: none, ddp, fsdp, deepspeed")
    acc = Accelerator(cpu=str(hardware.device) == "cpu", mixed_precision=precision, **kwargs)
    if distributed in ("fsdp", "deepspeed") and acc.num_processes == 1 and str(hardware.device) == "cpu":
        raise UserError(f"hardware.distributed={distributed} needs GPUs and a launcher "
                        "(accelerate launch --num_processes N -m prefkit.cli ...)")
    return acc


def is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: parameters exist whole only inside a module's forward."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    name = str(cfg.optimizer).lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                 weight_decay=cfg.get("weight_decay", 0.0), eps=cfg.get("eps", 1e-8))
    if name == "rmsprop":  # the DPO/TDPO reference code's choice: Adam-like quality, half the state
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.get("weight_decay", 0.0))
    raise UserError(f"unknown train.optimizer '{cfg.optimizer}'; valid: adamw, rmsprop, sgd")


def _schedule(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier after `step` optimizer steps: linear warmup, then constant, linear or cosine decay."""
    def warm(step: int) -> float:
        return min(1.0, (step + 1) / (warmup + 1)) if warmup > 0 else 1.0

    if name == "constant":
        return warm
    if name == "linear":
        return lambda s: warm(s) * max(0.0, 1 - max(0, s - warmup) / max(1, total - warmup))
    if name == "cosine":
        return lambda s: warm(s) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total - warmup))))
    raise UserError(f"unknown train.scheduler '{name}'; valid: constant, linear, cosine")


@dataclass
class Plan:
    """Batch arithmetic: global batch = micro-batch × accumulation × processes."""

    batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    total_steps: int
    steps_per_epoch: int

    @classmethod
    def make(cls, train: DictConfig, hardware: DictConfig, n_examples: int, world_size: int) -> Plan:
        batch, micro = int(train.batch_size), int(hardware.micro_batch_size)
        micro = min(micro, batch // world_size) if batch >= world_size else micro
        per_step = micro * world_size
        if batch % per_step:
            raise UserError(f"train.batch_size={batch} is not a multiple of hardware.micro_batch_size={micro} "
                            f"× {world_size} process(es)")
        steps_per_epoch = max(1, n_examples // batch)
        total = int(train.max_steps) if train.get("max_steps") else int(train.epochs * steps_per_epoch)
        return cls(batch, micro, batch // per_step, world_size, total, steps_per_epoch)


@dataclass
class Trainer:
    cfg: DictConfig  # the stage config; uses cfg.train, cfg.hardware, cfg.logger
    out: Path  # the job directory
    model: nn.Module
    accelerator: Any
    n_train: int
    loss_fn: LossFn
    eval_fn: Callable[[], dict[str, float]] | None = None
    # writes an HF model dir: (path, final?, full state dict gathered from a sharded engine or None)
    save_fn: Callable[[Path, bool, dict | None], None] | None = None
    stateful: dict[str, Stateful] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.cfg.train
        self.plan = Plan.make(t, self.cfg.hardware, self.n_train, self.accelerator.num_processes)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(t, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(str(t.scheduler), int(t.warmup_steps), self.plan.total_steps))
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.sampler = EpochSampler(self.n_train, self.plan.batch_size, int(self.cfg.seed))
        self.step = 0
        self.skipped = 0
        self.bad_in_a_row = 0
        self.tokens = 0

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """checkpoints/step-<N>/ (see prefkit.checkpoint), staged and renamed into place; the oldest
        beyond train.keep_checkpoints are removed."""
        acc = self.accelerator
        target = self.out / "checkpoints" / f"step-{self.step}"
        weights = acc.get_state_dict(self.model)  # a collective under FSDP/ZeRO-3: every process takes part
        frozen = self._frozen_names()
        if frozen:  # LoRA: the frozen base comes back from its own files; save only what trains
            weights = {k: v for k, v in weights.items() if k not in frozen}
        staging = target.with_name(f".{target.name}.tmp")
        sharded = is_sharded(acc)
        if sharded:  # sharded optimizer state: the engine writes it, every process its part
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(str(staging / "engine"))
        if acc.is_main_process:
            state = checkpoint.TrainingState(
                progress=checkpoint.Progress(self.step, self.skipped, self.bad_in_a_row, self.tokens),
                config_hash=config_hash(self.cfg), scheduler=self.scheduler.state_dict(),
                sampler=self.sampler.state_dict(), optimizer=None if sharded else self.optimizer.state_dict(),
                stateful={k: v.state_dict() for k, v in self.stateful.items()}, partial_weights=bool(frozen))
            checkpoint.save(staging, weights, state)
            if self.save_fn and self.cfg.train.get("keep_checkpoints_after_training"):
                self.save_fn(staging / "model", False, weights if sharded else None)  # sampleable checkpoint
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # the checkpoint exists only once complete
            for old in checkpoint.listed(self.out / "checkpoints")[:-int(self.cfg.train.get("keep_checkpoints", 2))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def maybe_resume(self) -> bool:
        """Restore the newest readable checkpoint; a corrupt one is set aside with a line saying so,
        and the one before it is tried (or training starts over)."""
        for ckpt in reversed(checkpoint.listed(self.out / "checkpoints")):
            try:
                weights, state = checkpoint.load(ckpt)
            except checkpoint.CorruptCheckpoint as err:
                moved = checkpoint.set_aside(ckpt) if self.accelerator.is_main_process else ckpt
                console.print(f"[yellow]checkpoint {ckpt} is unreadable ({err}); set aside as {moved.name}[/]")
                continue
            self._restore(ckpt, weights, state)
            return True
        return False

    def _restore(self, ckpt: Path, weights: dict[str, Tensor], state: checkpoint.TrainingState) -> None:
        if state.config_hash != config_hash(self.cfg):
            raise UserError(f"{ckpt} was made with a different config; rerun with the same overrides to resume, "
                            "or pass overwrite=true to start over")
        if state.optimizer is None:  # written by a sharding engine: it restores weights and optimizer
            self.accelerator.load_state(str(ckpt / "engine"))
        else:
            load_tensors(self.accelerator.unwrap_model(self.model), weights, partial=state.partial_weights)
            self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.sampler.load_state_dict(state.sampler)
        p = state.progress
        self.step, self.skipped, self.bad_in_a_row, self.tokens = p.step, p.skipped, p.bad_in_a_row, p.tokens
        for key, obj in self.stateful.items():
            obj.load_state_dict(state.stateful.get(key, {}))
        checkpoint.set_rng_state(state.rng)
        console.print(f"resumed from {ckpt} (step {self.step}/{self.plan.total_steps})")

    def _frozen_names(self) -> set[str]:
        module = self.accelerator.unwrap_model(self.model)
        names = {n for n, p in module.named_parameters() if not p.requires_grad}
        buffers = {n for n, _ in module.named_buffers()}
        return names | buffers if names else set()

    # --- the loop ---------------------------------------------------------------------------

    def _micro_batches(self) -> list[list[int]]:
        """This process's micro-batches of the next global batch."""
        acc, plan = self.accelerator, self.plan
        batch = self.sampler.next()
        per_micro = plan.micro_batch_size * plan.world_size
        out = []
        for a in range(plan.accumulation):
            chunk = batch[a * per_micro:(a + 1) * per_micro]
            out.append(chunk[acc.process_index * plan.micro_batch_size:(acc.process_index + 1) * plan.micro_batch_size])
        return out

    def _train_step(self) -> dict[str, float]:
        acc, plan = self.accelerator, self.plan
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        bad = torch.zeros((), device=acc.device)
        micros = self._micro_batches()
        for i, indices in enumerate(micros):
            sync = i == len(micros) - 1
            ctx = acc.no_sync(self.model) if not sync and plan.world_size > 1 else _nullctx()
            with ctx, acc.autocast():
                loss, metrics = self.loss_fn(indices, True)
                if not torch.isfinite(loss.detach()):
                    bad += 1
                acc.backward(loss / plan.accumulation)
            for key, val in metrics.items():
                sums[key] += float(val) / plan.accumulation
            sums["loss"] += float(loss.detach()) / plan.accumulation
        bad = acc.reduce(bad, reduction="sum") if plan.world_size > 1 else bad
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), float(self.cfg.train.max_grad_norm)) \
            if self.cfg.train.get("max_grad_norm") else None
        if bad > 0 or (grad_norm is not None and not torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            for obj in self.stateful.values():
                obj.on_skipped_step()
            self.skipped += 1
            self.bad_in_a_row += 1
            limit = int(self.cfg.train.get("max_bad_steps", 5))
            if self.bad_in_a_row >= limit:
                raise UserError(f"aborted: {self.bad_in_a_row} optimizer steps in a row had a non-finite loss or "
                                f"gradient (last at step {self.step + 1}); lower train.lr or check the data")
            return {"skipped_steps": self.skipped, "nonfinite": 1.0}
        self.bad_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for obj in self.stateful.values():
            for key, val in obj.on_optimizer_step(acc).items():
                sums[key] = val
        if grad_norm is not None:
            sums["grad_norm"] = float(grad_norm)
        sums["skipped_steps"] = self.skipped
        return dict(sums)

    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, resuming from the job's last checkpoint if there is one."""
        acc, plan, t = self.accelerator, self.plan, self.cfg.train
        resumed = self.maybe_resume()
        metrics_log = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resumed else None) \
            if acc.is_main_process else None
        wandb_run = self._wandb() if acc.is_main_process else None
        console.print(f"[bold]{self.cfg.stage}[/] {self.out}: {plan.total_steps} steps of {plan.batch_size} "
                      f"({plan.micro_batch_size} × {plan.accumulation} accumulation × {plan.world_size} process(es))")
        last_eval: dict[str, float] = {}
        eval_every, save_every = int(t.get("eval_every") or 0), int(t.get("save_every") or 0)
        log_every = int(self.cfg.logger.get("every", 10))

        def emit(row: dict[str, Any]) -> None:
            if metrics_log:
                metrics_log.log(row)
            if wandb_run:
                wandb_run.log(row, step=self.step)

        if self.eval_fn and t.get("eval_at_start") and not resumed:
            last_eval = self._evaluate()
            emit({"step": 0, **last_eval})
        window: dict[str, list[float]] = defaultdict(list)
        t0, tok0 = time.perf_counter(), self.tokens
        bar = progress(loss="loss", lr="lr", tps="tok/s")
        with bar:
            task = bar.add_task(str(self.cfg.stage), total=plan.total_steps, completed=self.step,
                                loss="-", lr="-", tps="-")
            while self.step < plan.total_steps:
                row = self._train_step()
                self.tokens += int(row.pop("num_tokens", 0))
                for key, val in row.items():
                    window[key].append(val)
                if "nonfinite" in row:
                    continue
                elapsed = time.perf_counter() - t0
                tps = (self.tokens - tok0) / max(elapsed, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                bar.update(task, completed=self.step, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                if self.step % log_every == 0 or self.step == plan.total_steps:
                    means = {k: float(np.mean(v)) for k, v in window.items()}
                    means["skipped_steps"] = float(self.skipped)  # a running count, not a mean
                    emit({"step": self.step, "epoch": self.step / plan.steps_per_epoch, "lr": lr,
                          "tokens": self.tokens, "tokens_per_s": tps, **means})
                    window.clear()
                if self.eval_fn and eval_every and (self.step % eval_every == 0 or self.step == plan.total_steps):
                    last_eval = self._evaluate()
                    emit({"step": self.step, **last_eval})
                if save_every and self.step % save_every == 0 and self.step < plan.total_steps:
                    self.save_checkpoint()
        if self.eval_fn and not last_eval:
            last_eval = self._evaluate()
            emit({"step": self.step, **last_eval})
        if metrics_log:
            metrics_log.close()
        if wandb_run:
            wandb_run.finish()
        return {**last_eval, "skipped_steps": float(self.skipped), "steps": float(self.step),
                "tokens": float(self.tokens)}

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            result = self.eval_fn()
        self.model.train()
        summary = "  ".join(f"{k} {v:.4g}" for k, v in list(result.items())[:6])
        console.print(f"  step {self.step}: {summary}")
        return result

    def _wandb(self):
        if not self.cfg.logger.get("wandb"):
            return None
        import wandb

        run_id = wandb_run_id(self.out, self.cfg)
        return wandb.init(project=str(self.cfg.logger.project), name=f"{self.cfg.run.name}/{self.out.parent.name}/"
                          f"{self.out.name}", id=run_id, resume="allow", dir=str(self.out),
                          config=OmegaConf.to_container(self.cfg, resolve=True))

    def finalize(self, save_dir: Path) -> None:
        """Write the final model (atomically) and drop the now-redundant checkpoints."""
        self.accelerator.wait_for_everyone()
        full = self.accelerator.get_state_dict(self.model) if is_sharded(self.accelerator) else None
        if self.accelerator.is_main_process and self.save_fn:
            with atomic_dir(save_dir) as tmp:
                self.save_fn(tmp, True, full)
        if self.accelerator.is_main_process and not self.cfg.train.get("keep_checkpoints_after_training", False):
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        write_json(self.out / "plan.json", self.plan.__dict__) if self.accelerator.is_main_process else None
        log.debug("finalized %s", save_dir)


def wandb_run_id(out: Path, cfg: DictConfig) -> str:
    """One wandb run per job: its place in the run directory and its config (a resume finds it again)."""
    return hashlib.sha256(f"{out.resolve()}|{config_hash(cfg)}".encode()).hexdigest()[:16]


def load_tensors(model: nn.Module, tensors: dict[str, Tensor], partial: bool = False) -> None:
    """Load a state dict saved by `checkpoint.save`: every parameter must come back, except tied
    ones whose twin did (and, for `partial` checkpoints, the frozen ones)."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[n].data_ptr() for n in tensors if n in params}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    untied_missing = [n for n in missing if params[n].data_ptr() not in loaded_ptrs
                      and (not partial or n in trainable)]
    if untied_missing or unexpected:
        raise UserError(f"checkpoint does not match the model (missing: {untied_missing[:3]}, "
                        f"unexpected: {list(unexpected)[:3]})")


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def prepare_reference(accelerator, module: nn.Module, hardware: DictConfig, model_cfg: DictConfig) -> nn.Module:
    """Place the frozen reference for the engine in use: as is (one device, DDP: no gradients, so
    nothing to synchronise), sharded block by block with FSDP2's fully_shard (hardware=fsdp), or in
    a DeepSpeed ZeRO-3 inference engine (hardware=deepspeed_zero3), so that it costs each GPU
    only its shard. Its forward then gathers the weights (prefkit.logprobs.ReferenceModule)."""
    from accelerate.utils import DistributedType

    module.eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import fully_shard

        block = str(model_cfg.fsdp_block)
        module.to(accelerator.device)
        for sub in module.modules():
            if type(sub).__name__ == block:
                fully_shard(sub)
        return fully_shard(module)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": ds.get("train_micro_batch_size_per_gpu", 1),
                  "zero_optimization": {"stage": 3 if ds["zero_optimization"]["stage"] == 3 else 0},
                  "bf16": {"enabled": str(hardware.precision) in ("bf16", "bfloat16")},
                  "fp16": {"enabled": str(hardware.precision) in ("fp16", "float16")}}
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()
        return engine
    return module.to(accelerator.device)

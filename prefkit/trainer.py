"""The one training loop that sft, reward and align share.

A stage hands it a model, the number of training examples, and up to three functions of the
(prepared) model: `loss_fn(model, indices, training)` turns a micro-batch of example indices into
(loss, metrics), `eval_fn(model)` returns held-out metrics, `save_fn(module, path, final, state)`
writes an HF model directory. The loop owns everything else: optimizer and schedule, gradient
accumulation and clipping, evaluation and checkpoints every N steps, exact resume (prefkit.
checkpoint), non-finite-loss skipping, metrics.jsonl, the progress bar and (optionally) wandb.
"""

from __future__ import annotations

import contextlib
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
from prefkit.engine import is_sharded
from prefkit.errors import Diverged, UserError
from prefkit.rundir import MetricsLog, atomic_dir, command_keys, config_differences, config_hash, identity, write_json
from prefkit.stateful import Stateful

LossFn = Callable[[nn.Module, list[int], bool], tuple[Tensor, dict[str, Any]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
# (the unwrapped module, directory, final?, the full state dict a sharding engine gathered, or None)
SaveFn = Callable[[nn.Module, Path, bool, "dict | None"], None]


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

    def length(self, train: DictConfig, n_examples: int) -> str:
        """Which of max_steps and epochs is in force, said at the start of training."""
        epochs = self.total_steps * self.batch_size / max(n_examples, 1)
        if train.get("max_steps"):
            return (f"train.max_steps={self.total_steps} wins over train.epochs={train.epochs}: "
                    f"{epochs:.3g} epoch{'' if epochs == 1 else 's'} of {n_examples:,} examples")
        return f"train.epochs={train.epochs} of {n_examples:,} examples (train.max_steps=null)"


@dataclass
class Trainer:
    cfg: DictConfig  # the stage config; uses cfg.train, cfg.hardware, cfg.logger
    out: Path  # the job directory
    model: nn.Module
    accelerator: Any
    n_train: int
    loss_fn: LossFn
    eval_fn: EvalFn | None = None
    save_fn: SaveFn | None = None
    stateful: dict[str, Stateful] = field(default_factory=dict)
    on_step: Callable[[int], None] | None = None  # called after every optimizer step (benchmarks time it)
    lengths: list[int] | None = None  # each training example's tokens, for train.group_by_length

    def __post_init__(self) -> None:
        t = self.cfg.train
        self.plan = Plan.make(t, self.cfg.hardware, self.n_train, self.accelerator.num_processes)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(t, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(str(t.scheduler), int(t.warmup_steps), self.plan.total_steps))
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        group = bool(t.get("group_by_length", False))
        if group and self.lengths is None:
            raise ValueError("train.group_by_length needs the training examples' lengths")
        self.sampler = EpochSampler(self.n_train, self.plan.batch_size, int(self.cfg.seed),
                                    lengths=self.lengths if group else None)
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
                config_hash=config_hash(self.cfg), config=identity(self.cfg), scheduler=self.scheduler.state_dict(),
                sampler=self.sampler.state_dict(), optimizer=None if sharded else self.optimizer.state_dict(),
                stateful={k: v.state_dict() for k, v in self.stateful.items()}, partial_weights=bool(frozen))
            checkpoint.save(staging, weights, state)
            if self.save_fn and self.cfg.train.get("keep_checkpoints_after_training"):  # a sampleable checkpoint
                self.save_fn(acc.unwrap_model(self.model), staging / "model", False, weights if sharded else None)
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
            # an option added to prefkit since, left at its default, is no difference (rundir.config_differences)
            diff = ["not recorded"] if state.config is None else config_differences(
                state.config, self.cfg, named=command_keys())
            if diff:
                raise UserError(f"{ckpt} was made with a different config ({'; '.join(diff)}); rerun with the same "
                                "overrides to resume, or pass overwrite=true to start over")
        if state.optimizer is None:  # written by a sharding engine: it restores weights and optimizer
            self.accelerator.load_state(str(ckpt / "engine"))
        else:
            checkpoint.load_weights(self.accelerator.unwrap_model(self.model), weights, partial=state.partial_weights)
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
        self._before_step = (self.sampler.state_dict(), checkpoint.rng_state())  # to abandon it cleanly
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        bad = torch.zeros((), device=acc.device)
        micros = self._micro_batches()
        for i, indices in enumerate(micros):
            sync = i == len(micros) - 1
            ctx = acc.no_sync(self.model) if not sync and plan.world_size > 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss, metrics = self.loss_fn(self.model, indices, True)
                if not torch.isfinite(loss.detach()):
                    bad += 1
                acc.backward(loss / plan.accumulation)
            for key, val in metrics.items():
                sums[key] += float(val) / plan.accumulation
            sums["loss"] += float(loss.detach()) / plan.accumulation
        bad = acc.reduce(bad, reduction="sum") if plan.world_size > 1 else bad
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), float(self.cfg.train.max_grad_norm)) \
            if self.cfg.train.get("max_grad_norm") else None
        # fp16 loss scaling (a GradScaler, on CUDA): gradients that overflow at the current scale are the
        # scaler's business, not a bad step; its own step skips the update and lowers the scale
        scaler = getattr(acc, "scaler", None)
        if bad > 0 or (scaler is None and grad_norm is not None and not torch.isfinite(grad_norm)):
            self._skip_step()
            if scaler is not None:  # forget this step's unscale_ record, keep the scale
                scaler.update(new_scale=scaler.get_scale())
            self.bad_in_a_row += 1
            limit = int(self.cfg.train.get("max_bad_steps", 5))
            if self.bad_in_a_row >= limit:
                raise Diverged(f"aborted: {self.bad_in_a_row} optimizer steps in a row had a non-finite loss or "
                                f"gradient (last at step {self.step + 1}); lower train.lr or check the data")
            return {"skipped_steps": self.skipped, "nonfinite": 1.0}
        self.optimizer.step()
        if getattr(self.optimizer, "step_was_skipped", False):  # the loss scale was too high for these gradients
            self._skip_step()
            return {"skipped_steps": self.skipped, "nonfinite": 1.0, "loss_scale_overflow": 1.0}
        self.bad_in_a_row = 0
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

    def _skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for obj in self.stateful.values():
            obj.on_skipped_step()
        self.skipped += 1

    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, resuming from the job's last checkpoint if there is one."""
        plan, t = self.plan, self.cfg.train
        resumed = self.maybe_resume()
        log = _Log(self, resumed)
        console.print(f"[bold]{self.cfg.stage}[/] {self.out}: {plan.total_steps} steps of {plan.batch_size} "
                      f"({plan.micro_batch_size} × {plan.accumulation} accumulation × {plan.world_size} process(es)); "
                      f"{plan.length(t, self.n_train)}")
        eval_every, save_every = int(t.get("eval_every") or 0), int(t.get("save_every") or 0)
        last_eval: dict[str, float] = {}
        if self.eval_fn and t.get("eval_at_start") and not resumed:
            last_eval = log.eval(0, self._evaluate())
        try:
            last_eval = self._loop(log, last_eval, eval_every, save_every)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: abandon the step in progress, keep what is done
            log.close()
            raise self._stopped(stop) from None
        if self.eval_fn and not last_eval:
            last_eval = log.eval(self.step, self._evaluate())
        log.close()
        return {**last_eval, "skipped_steps": float(self.skipped), "steps": float(self.step),
                "tokens": float(self.tokens)}

    def _loop(self, log: _Log, last_eval: dict, eval_every: int, save_every: int) -> dict[str, float]:
        plan = self.plan
        with log.bar:
            while self.step < plan.total_steps:
                # one optimizer step over the accumulated micro-batches (or a skipped one)
                row = self._train_step()
                if "nonfinite" in row:
                    log.window(row)
                    continue
                log.train(row)
                if self.on_step:
                    self.on_step(self.step)
                # held-out metrics every eval_every steps and at the end
                if self.eval_fn and eval_every and (self.step % eval_every == 0 or self.step == plan.total_steps):
                    last_eval = log.eval(self.step, self._evaluate())
                # a full-state checkpoint every save_every steps (the final model is written by finalize)
                if save_every and self.step % save_every == 0 and self.step < plan.total_steps:
                    self.save_checkpoint()
        return last_eval

    def _stopped(self, stop: KeyboardInterrupt) -> Exception:
        """Checkpoint the last completed step (one process: seconds) and say how far it got."""
        from prefkit.config import Stopped, Terminated

        how, code = ("stopped by SIGTERM", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        done = checkpoint.listed(self.out / "checkpoints")
        if self.step > 0 and self.plan.world_size == 1 and not (done and checkpoint.step_of(done[-1]) == self.step):
            # back to the end of the last completed step: its data position, RNG, no partial gradients
            sampler_state, rng = getattr(self, "_before_step", (self.sampler.state_dict(), checkpoint.rng_state()))
            self.sampler.load_state_dict(sampler_state)
            checkpoint.set_rng_state(rng)
            self.optimizer.zero_grad(set_to_none=True)
            for obj in self.stateful.values():
                obj.on_skipped_step()
            self.save_checkpoint()
        kept = f"checkpoint of step {self.step} saved" if self.step > 0 else "no step was completed"
        return Stopped(f"{how} at step {self.step}/{self.plan.total_steps} ({kept})", code)

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            result = self.eval_fn(self.model)
        self.model.train()
        summary = "  ".join(f"{k} {v:.4g}" for k, v in list(result.items())[:6])
        console.print(f"  step {self.step}: {summary}")
        return result

    def _wandb(self):
        if not self.cfg.logger.get("wandb"):
            return None
        import wandb

        return wandb.init(**wandb_init_args(self.cfg, self.out))

    def finalize(self, save_dir: Path) -> None:
        """Write the final model (atomically) and drop the now-redundant checkpoints."""
        self.accelerator.wait_for_everyone()
        full = self.accelerator.get_state_dict(self.model) if is_sharded(self.accelerator) else None
        if self.accelerator.is_main_process and self.save_fn:
            with atomic_dir(save_dir) as tmp:
                self.save_fn(self.accelerator.unwrap_model(self.model), tmp, True, full)
        if self.accelerator.is_main_process and not self.cfg.train.get("keep_checkpoints_after_training", False):
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        write_json(self.out / "plan.json", self.plan.__dict__) if self.accelerator.is_main_process else None
        log.debug("finalized %s", save_dir)


class _Log:
    """Where a run's numbers go: metrics.jsonl (main process), wandb, the progress bar, and the
    window of training rows averaged between two log lines."""

    def __init__(self, trainer: Trainer, resumed: bool):
        self.t = trainer
        main = trainer.accelerator.is_main_process
        self.file = MetricsLog(trainer.out / "metrics.jsonl", resume_step=trainer.step if resumed else None) \
            if main else None
        self.wandb = trainer._wandb() if main else None
        self.every = int(trainer.cfg.logger.get("every", 10))
        self.rows: dict[str, list[float]] = defaultdict(list)
        self.t0, self.tokens0 = time.perf_counter(), trainer.tokens
        self.bar = progress(loss="loss", lr="lr", tps="tok/s")
        self.task = self.bar.add_task(str(trainer.cfg.stage), total=trainer.plan.total_steps,
                                      completed=trainer.step, loss="-", lr="-", tps="-")

    def emit(self, row: dict[str, Any]) -> None:
        if self.file:
            self.file.log(row)
        if self.wandb:
            self.wandb.log(wandb_keys(row), step=self.t.step)

    def window(self, row: dict[str, Any]) -> None:
        self.t.tokens += int(row.pop("num_tokens", 0))
        for key, val in row.items():
            self.rows[key].append(val)

    def train(self, row: dict[str, Any]) -> None:
        self.window(row)
        t = self.t
        tps = (t.tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
        lr = t.scheduler.get_last_lr()[0]
        self.bar.update(self.task, completed=t.step, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
        if t.step % self.every == 0 or t.step == t.plan.total_steps:
            means = {k: float(np.mean(v)) for k, v in self.rows.items()}
            means["skipped_steps"] = float(t.skipped)  # a running count, not a mean
            self.emit({"step": t.step, "epoch": t.step / t.plan.steps_per_epoch, "lr": lr, "tokens": t.tokens,
                       "tokens_per_s": tps, **means})
            self.rows.clear()

    def eval(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        self.emit({"step": step, **metrics})
        return metrics

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


def wandb_init_args(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """A sweep's runs grouped as the run directory groups them: group = run name, job type = stage,
    name = job; tags for the objective and seed. Files (offline runs too) go to <job>/wandb/."""
    tags = [f"seed:{cfg.seed}"]
    if cfg.get("objective") is not None:
        tags.insert(0, f"objective:{cfg.objective.name}")
    return {"project": str(cfg.logger.project), "group": str(cfg.run.name), "job_type": str(cfg.stage),
            "name": out.name, "tags": tags, "id": wandb_run_id(out, cfg), "resume": "allow", "dir": str(out),
            "config": OmegaConf.to_container(cfg, resolve=True)}


def wandb_keys(row: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl keys as TRL logs them to wandb: eval_x -> eval/x, everything else train/x."""
    return {f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}": v for k, v in row.items() if k != "step"}


def wandb_run_id(out: Path, cfg: DictConfig) -> str:
    """One wandb run per job: its place in the run directory and its config (a resume finds it again)."""
    return hashlib.sha256(f"{out.resolve()}|{config_hash(cfg)}".encode()).hexdigest()[:16]

"""What the three training stages (sft, reward, align) share, in the order a stage uses it:
where the model starts, the data as token ids, the model prepared for training, the held-out
loop, the function that saves it, and the trainer run from start to final model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from prefkit import packing
from prefkit.console import console
from prefkit.data import Encoded, check_unknown, encode, encode_options
from prefkit.datasets import load_rows, with_mismatched
from prefkit.errors import UserError
from prefkit.models import load_model, resolve_model_path, save_policy
from prefkit.modules import StatsLM, backbone
from prefkit.objectives import Needs
from prefkit.rundir import Job, job_input, require_job
from prefkit.stateful import Stateful
from prefkit.trainer import EvalFn, LossFn, SaveFn, Trainer

# --- where the model starts ---------------------------------------------------------------------


def consumed_sft(cfg: DictConfig, run: Path) -> Job | None:
    """The run's SFT job this stage starts from (policy.init=sft), or None."""
    if str(cfg.policy.init) != "sft":
        return None
    return require_job(run, "sft", cfg.policy.get("sft_job"), key="policy.sft_job",
                       how=f"prefkit sft run.name={cfg.run.name}")


def policy_init(cfg: DictConfig, run: Path) -> tuple[str, dict[str, Any]]:
    """The run's SFT model (policy.init=sft), the base model (base), or a path; and the lineage
    record of that input."""
    init = str(cfg.policy.init)
    if init == "sft":
        job = require_job(run, "sft", cfg.policy.get("sft_job"), key="policy.sft_job",
                          how=f"prefkit sft run.name={cfg.run.name}")
        return str(job.path / "model"), {"sft": job_input(job)}
    if init == "base":
        path = resolve_model_path(cfg.model, Path(cfg.run.root) / ".cache")
        return path, {"base_model": path}
    return init, {"model": init}


# --- the data -----------------------------------------------------------------------------------

def load_groups(cfg: DictConfig, needs: Needs, split: str, run: Path, tokenizer) -> list[dict]:
    """The split's rows as the objective takes them: preference groups, or unpaired rows each with a
    completion of another prompt (KTO's reference point)."""
    if needs.rows == "unpaired":
        # seeded by the dataset's seed, not the training seed: every job of a sweep pairs the same way
        return with_mismatched(load_rows(cfg.dataset, "unpaired", split, run, tokenizer),
                               int(cfg.dataset.get("seed") or 0))
    return load_rows(cfg.dataset, "preference", split, run, tokenizer)


def to_groups(rows: list[dict], needs: Needs, name: str) -> list[dict]:
    """Check the rows' group size against what the objective takes; pair objectives get each
    K-way group's best and worst completion."""
    sizes = {len(r["completions"]) for r in rows}
    if len(sizes) > 1:
        raise UserError(f"preference rows have different numbers of completions ({sorted(sizes)}); "
                        "every prompt needs the same K")
    k = sizes.pop()
    if needs.group_size == 2 and k > 2:
        console.print(f"{name} takes pairs: using each group's first (best) and last (worst) of {k} completions")
        rows = [{**r, "completions": [r["completions"][0], r["completions"][-1]],
                 **({"rewards": [r["rewards"][0], r["rewards"][-1]]} if r.get("rewards") else {})} for r in rows]
    return rows


def group_lengths(groups: list[list[Encoded]]) -> list[int]:
    """Each group's width in a padded batch: its longest sequence."""
    return [max(len(s.ids) for s in g) for g in groups]


def encode_groups(rows: list[dict], tokenizer, ds: DictConfig, split: str) -> list[list[Encoded]]:
    opts = encode_options(ds)
    groups = [[encode(tokenizer, r["prompt"], c, where=f" in {split} row {i}", **opts) for c in r["completions"]]
              for i, r in enumerate(rows)]
    check_unknown([s for g in groups for s in g], tokenizer, ds, f"dataset {ds.name} ({split})")
    return groups


# --- the model ----------------------------------------------------------------------------------

def prepare_model(cfg: DictConfig, path: str, reward_head: bool = False) -> StatsLM:
    """The trainable model: the model config's dtype, LoRA when asked (cfg.peft), gradient
    checkpointing and padding-free packing when the hardware config turns them on, and a scalar
    reward head when asked."""
    lm = load_model(cfg.model, path, "policy", cfg.peft)
    if cfg.hardware.get("gradient_checkpointing"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packing.enable(backbone(lm), cfg.hardware.get("packing", False))
    return StatsLM(lm, reward_head=reward_head)


def saver(tokenizer, extra: Callable[[StatsLM, Path, dict | None], None] | None = None) -> SaveFn:
    """The save function of a training stage: the LM as an HF directory (a LoRA policy merged, on a
    copy unless final, so training can go on), then `extra` (a reward head, a reward model's meta)."""
    def save(module: StatsLM, path: Path, final: bool, state: dict | None) -> None:
        save_policy(module.lm, tokenizer, path, final, state)
        if extra is not None:
            extra(module, path, state)
    return save


# --- held-out evaluation and the run ------------------------------------------------------------

StepFn = Callable[[nn.Module, list[int]], tuple[Tensor, dict[str, Any]]]


def evaluator(step: StepFn, n: int, micro_batch: int) -> EvalFn:
    """The held-out loop: every example once, micro-batch by micro-batch, each metric averaged
    over examples and prefixed eval_."""
    def evaluate(model: nn.Module) -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        for start in range(0, n, micro_batch):
            idx = list(range(start, min(n, start + micro_batch)))
            loss, metrics = step(model, idx)
            for key, val in {"loss": loss, **metrics}.items():
                if key != "num_tokens":
                    sums[key] += float(val) * len(idx) / n
        return {f"eval_{k}": v for k, v in sums.items()}
    return evaluate


def train(cfg: DictConfig, out: Path, module: nn.Module, accelerator, train_lengths: list[int], loss_fn: LossFn,
          eval_fn: EvalFn | None, save_fn: SaveFn, stateful: dict[str, Stateful] | None = None) -> dict[str, float]:
    """Fit (resuming if a checkpoint exists), then write the final model to <out>/model.
    `train_lengths`: each training example's tokens (a group's: its longest sequence)."""
    trainer = Trainer(cfg, out, module, accelerator, len(train_lengths), loss_fn, eval_fn, save_fn,
                      stateful=stateful or {}, lengths=train_lengths)
    final = trainer.fit()
    trainer.finalize(out / "model")
    return final

"""`prefkit align objective=<name>`: train a policy on preference data with any registered
objective. The policy starts from the run's SFT model (or `policy.init=base|<path>`), the
reference is the same model frozen, and the objective's `Needs` decide what is computed:
scalar reference log-probs (cached once per run), the reference's full distribution, rewards,
a reward head, or no reference at all.

Writes <run>/align/<job>/model (plus reward_head.safetensors for DRDO) and summary.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from prefkit import refcache
from prefkit.console import console
from prefkit.data import Encoded, collate, encode, encode_options
from prefkit.datasets import load_rows
from prefkit.errors import UserError
from prefkit.logprobs import PolicyModule, ReferenceModule, chunk_setting, reference_hidden
from prefkit.models import freeze, is_peft, load_model, load_tokenizer, resolve_model_path, save_policy
from prefkit.objectives import Groups, Needs, Objective, build, sft_nll, trl_metrics
from prefkit.rewardmodel import save_reward_head
from prefkit.rundir import job_input, require_job, run_dir, start_job, write_json, write_lineage
from prefkit.trainer import Trainer, is_sharded, make_accelerator, prepare_reference

log = logging.getLogger("prefkit")


def policy_init(cfg: DictConfig, run: Path) -> tuple[str, dict[str, Any]]:
    """Where the policy (and reference) start: the run's SFT model, the base model, or a path."""
    init = str(cfg.policy.init)
    if init == "sft":
        job = require_job(run, "sft", cfg.policy.get("sft_job"), key="policy.sft_job",
                          how=f"prefkit sft run.name={cfg.run.name}")
        return str(job.path / "model"), {"sft": job_input(job)}
    if init == "base":
        path = resolve_model_path(cfg.model, Path(cfg.run.root) / ".cache")
        return path, {"base_model": path}
    return init, {"model": init}


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


def encode_groups(rows: list[dict], tokenizer, ds: DictConfig, split: str) -> list[list[Encoded]]:
    opts = encode_options(ds)
    return [[encode(tokenizer, r["prompt"], c, where=f" in {split} row {i}", **opts) for c in r["completions"]]
            for i, r in enumerate(rows)]


def row_rewards(rows: list[dict]) -> Tensor | None:
    if all(r.get("rewards") is not None for r in rows):
        return torch.tensor([r["rewards"] for r in rows], dtype=torch.float32)
    return None


@dataclass
class AlignStep:
    """The loss and metrics of one micro-batch of groups: collate, the reference's part (its
    hidden states online, or the cached log-probs), the policy's token statistics, the objective.
    The align stage's forward; scripts/bench_align.py times exactly this."""

    objective: Objective
    groups: dict[str, list[list[Encoded]]]  # split -> groups of encoded completions
    pad: int
    device: torch.device
    chunk: int | None  # hardware.logprob_chunk (None: by vocabulary size)
    recompute: bool  # recompute the LM head in backward instead of keeping chunk logits
    reference: nn.Module | None = None  # None when cached or not needed
    sharded: bool = False  # the reference is a sharded ReferenceModule
    ref_context: Callable[[], Any] | None = None  # LoRA: the policy with its adapter off
    ref_cache: dict[str, Tensor] | None = None  # split -> [n_groups, K] reference log-probs
    rewards: dict[str, Tensor | None] = field(default_factory=dict)
    sft_weight: float = 0.0

    def __call__(self, model: nn.Module, split: str, indices: list[int], training: bool
                 ) -> tuple[Tensor, dict[str, Any]]:
        needs = self.objective.needs
        seqs = [seq for i in indices for seq in self.groups[split][i]]
        batch = {k: v.to(self.device) for k, v in collate(seqs, self.pad).items()}
        b, k = len(indices), len(self.groups[split][indices[0]])
        ref = None
        if self.reference is not None:
            ref = self.reference(**batch, temperature=needs.tokens.temperature, chunk_size=self.chunk) \
                if self.sharded else reference_hidden(self.reference, **batch, context=self.ref_context)
        stats, reward_pred = model(**batch, reference=ref, req=needs.tokens, chunk_size=self.chunk,
                                   recompute=self.recompute)

        def view(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.view(b, k)

        ref_logps = stats.ref_logps
        if self.ref_cache is not None:
            ref_logps = self.ref_cache[split][indices].to(self.device).flatten()
        rewards = self.rewards.get(split)
        g = Groups(logps=view(stats.logps), lengths=view(stats.lengths), training=training,
                   ref_logps=view(ref_logps) if needs.reference != "none" else None,
                   kl=view(stats.kl), reverse_kl=view(stats.reverse_kl),
                   mixture_logps={lam: view(t) for lam, t in stats.mixture_logps.items()},
                   rewards=None if rewards is None else rewards[indices].to(self.device),
                   reward_pred=view(reward_pred))
        result = self.objective.loss(g)
        loss = result.loss
        metrics: dict[str, Any] = {**trl_metrics(g, result), **result.metrics}
        if self.sft_weight:
            nll = sft_nll(g)
            loss = loss + self.sft_weight * nll
            metrics["sft/nll"] = nll.detach()
        metrics["num_tokens"] = int(batch["attention_mask"].sum())
        return loss, metrics


def run(cfg: DictConfig) -> float | None:
    """Returns the held-out loss (the value Hydra's Optuna sweeper minimises)."""
    out = start_job(cfg)
    if out is None:
        from prefkit.rundir import job_dir
        summary = job_dir() / "summary.json"
        return json.loads(summary.read_text()).get("eval_loss") if summary.exists() else None
    torch.manual_seed(int(cfg.seed))
    run = run_dir(cfg)
    objective, sft_weight = build(OmegaConf.to_container(cfg.objective, resolve=True))
    needs = objective.needs
    init_path, inputs = policy_init(cfg, run)
    trust = bool(cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(init_path, trust_remote_code=trust)

    rows = {split: to_groups(load_rows(cfg.dataset, "preference", split, run, tokenizer), needs, objective.name)
            for split in ("train", "eval")}
    groups = {split: encode_groups(r, tokenizer, cfg.dataset, split) for split, r in rows.items()}
    rewards = {split: row_rewards(r) for split, r in rows.items()}
    if needs.rewards or cfg.rewards.source == "model":
        rewards = reward_columns(cfg, run, rows, rewards, inputs)
    if needs.group_size is None and len(groups["train"][0]) < 2:
        raise UserError(f"{objective.name} needs at least two completions per prompt")

    accelerator = make_accelerator(cfg.hardware, cfg.model, cfg.train)
    device = accelerator.device
    lm = load_model(cfg.model, init_path, "policy", cfg.peft)
    if cfg.hardware.get("gradient_checkpointing"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PolicyModule(lm, reward_head=needs.reward_head)

    # The reference: the initial model, frozen; with LoRA, the policy itself with its adapter off;
    # under FSDP/ZeRO-3, a sharded module whose forward returns what the loss needs.
    lora, sharded = is_peft(lm), is_sharded(accelerator)
    if lora and sharded:
        raise UserError("peft=lora under FSDP/DeepSpeed is not supported; use hardware=gpu or hardware=ddp")
    ref_context = lm.disable_adapter if lora else None
    ref_dtype = str(cfg.model.dtype if lora else cfg.model.reference_dtype)
    chunk = chunk_setting(cfg.hardware.logprob_chunk)
    temperature = needs.tokens.temperature

    def make_reference():
        if lora:
            return lm.to(device)
        ref_lm = freeze(load_model(cfg.model, init_path, "reference"))
        return prepare_reference(accelerator, ReferenceModule(ref_lm), cfg.hardware, cfg.model) if sharded \
            else ref_lm.to(device)

    reference, ref_cache = None, None
    cache_setting = str(cfg.reference.cache).lower()
    if cache_setting not in ("auto", "true", "false"):
        raise UserError(f"reference.cache must be auto, true or false, not '{cfg.reference.cache}'")
    cacheable = needs.reference == "logps" and needs.cacheable
    if cache_setting == "true" and not cacheable:
        why = "needs no reference" if needs.reference == "none" else (
            "needs the reference's full distribution" if needs.reference == "logits" else "moves its reference")
        raise UserError(f"reference.cache=true, but {objective.name} {why}: its reference cannot be precomputed")
    use_cache = cacheable and cache_setting != "false"
    if use_cache:
        key = refcache.cache_key(groups, init_path, ref_dtype, temperature)
        # one process computes and the others read its file (under a sharding engine all take part)
        with (contextlib.nullcontext() if sharded else accelerator.main_process_first()):
            ref_cache = refcache.load_or_compute(
                run, key, groups, make_reference, tokenizer.pad_token_id, device,
                int(cfg.hardware.micro_batch_size) * 4, temperature, chunk, accelerator.is_main_process,
                context=ref_context)
        inputs["reference_logps_cache"] = key
    elif needs.reference != "none":
        reference = make_reference()
    objective.bind(accelerator=accelerator, policy=policy.lm, reference=reference)

    recompute = needs.tokens.needs_reference_logits if cfg.hardware.get("recompute_lm_head", "auto") == "auto" \
        else bool(cfg.hardware.recompute_lm_head)
    if sharded:  # the engine owns the weights between forward and backward: keep chunk logits instead
        recompute = False
    step = AlignStep(objective, groups, tokenizer.pad_token_id, device, chunk, recompute, reference=reference,
                     sharded=sharded, ref_context=ref_context, ref_cache=ref_cache, rewards=rewards,
                     sft_weight=sft_weight)

    def loss_fn(indices: list[int], training: bool):
        return step(trainer.model, "train", indices, training)

    def eval_fn() -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        mb = int(cfg.hardware.micro_batch_size)
        n = len(groups["eval"])
        for start in range(0, n, mb):
            idx = list(range(start, min(n, start + mb)))
            loss, metrics = step(trainer.model, "eval", idx, False)
            for key, val in {"loss": loss, **metrics}.items():
                if key != "num_tokens":
                    sums[key] += float(val) * len(idx) / n
        return {f"eval_{k}": v for k, v in sums.items()}

    def save_fn(path: Path, final: bool, state: dict | None) -> None:
        module = accelerator.unwrap_model(trainer.model)
        save_policy(module.lm, tokenizer, path, final, state)
        if module.reward_head is not None:
            save_reward_head(module, path, state)

    trainer = Trainer(cfg, out, policy, accelerator, len(groups["train"]), loss_fn, eval_fn, save_fn,
                      stateful={"objective": objective})
    final = trainer.fit()
    trainer.finalize(out / "model")
    if accelerator.is_main_process:
        state = objective.state_dict()
        summary = {**final, "objective": objective.name, "train_groups": len(groups["train"]),
                   "eval_groups": len(groups["eval"]),
                   **{f"objective_state/{k}": v for k, v in state.items() if isinstance(v, (int, float))}}
        write_json(out / "summary.json", summary)
        acc = final.get("eval_rewards/accuracies")
        console.print(f"align {objective.name} done: eval loss {final.get('eval_loss', float('nan')):.4f}"
                      + (f", held-out reward accuracy {acc:.3f}" if acc is not None else "") + f" -> {out / 'model'}")
        write_lineage(out, cfg, {**inputs, "dataset": str(cfg.dataset.name)})
    return final.get("eval_loss")


def reward_columns(cfg: DictConfig, run: Path, rows: dict[str, list[dict]], from_data: dict[str, Tensor | None],
                   inputs: dict[str, Any]) -> dict[str, Tensor]:
    """Rewards for every completion: from the data, or scored by a reward model of the run."""
    source = str(cfg.rewards.source)
    if source == "auto":
        source = "data" if all(v is not None for v in from_data.values()) else "model"
    if source == "data":
        if any(v is None for v in from_data.values()):
            raise UserError(f"dataset {cfg.dataset.name} has no rewards; train a reward model "
                            f"(`prefkit reward run.name={cfg.run.name}`) and set rewards.source=model")
        return from_data
    if source != "model":
        raise UserError(f"unknown rewards.source '{source}'; valid: auto, data, model")
    from prefkit.rewardmodel import load_reward_model, score_texts

    job = require_job(run, "reward", cfg.rewards.get("job"), key="rewards.job",
                      how=f"prefkit reward run.name={cfg.run.name}")
    inputs["reward_model"] = job_input(job)
    scorer = load_reward_model(job.path)
    out = {}
    for split, split_rows in rows.items():
        texts = [(r["prompt"], c) for r in split_rows for c in r["completions"]]
        scores = score_texts(scorer, texts, batch_size=64)
        out[split] = torch.tensor(scores, dtype=torch.float32).view(len(split_rows), -1)
    console.print(f"rewards: scored {sum(len(r) for r in rows.values())} groups with {job}")
    return out

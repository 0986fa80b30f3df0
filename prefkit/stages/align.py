"""`prefkit align objective=<name>`: train a policy on preference data with any registered
objective. The policy starts from the run's SFT model (or `policy.init=base|<path>`); the
reference is that model frozen, in whichever form the objective's `Needs` and the hardware call
for (prefkit.reference): cached scalar log-probs, an online model, the LoRA policy with its
adapter off, a sharded copy, or none at all.

Writes <run>/align/<job>/model (plus reward_head.safetensors for DRDO) and summary.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from prefkit import datasource, diagnostics, recipe, reference
from prefkit.console import console
from prefkit.data import IGNORE, Encoded, collate
from prefkit.engine import is_sharded, make_accelerator
from prefkit.errors import UserError
from prefkit.models import load_tokenizer
from prefkit.objectives import Groups, Needs, Objective, build, sft_nll, trl_metrics
from prefkit.rewardmodel import save_reward_head
from prefkit.rundir import job_dir, job_input, require_job, run_dir, start_job, write_json, write_lineage
from prefkit.tokenstats import KEEP_LOGITS_ELEMENTS, Head, chunk_setting


def run(cfg: DictConfig) -> float | None:
    """Returns the summary's `sweep_metric` (default: the held-out loss), the value a Hydra sweeper
    such as `hydra/sweeper=optuna` optimises."""
    # options that do not fit together stop the run here, before anything is written
    objective, sft_weight = build(OmegaConf.to_container(cfg.objective, resolve=True))
    run_path = run_dir(cfg)
    datasource.inherit(cfg, recipe.consumed_sft(cfg, run_path))  # the SFT model's data, unless told otherwise
    out = start_job(cfg)
    if out is None:
        summary = job_dir() / "summary.json"
        return sweep_value(cfg, json.loads(summary.read_text())) if summary.exists() else None
    torch.manual_seed(int(cfg.seed))
    needs = diagnostics.widen(objective.needs, cfg.get("diagnostics"))  # the objective's, and the analyses'

    init_path, inputs = recipe.policy_init(cfg, run_path)
    tokenizer = load_tokenizer(init_path, trust_remote_code=bool(cfg.model.trust_remote_code))

    # the data: groups of completions as token ids, and rewards where the objective uses them
    rows = {split: recipe.to_groups(recipe.load_groups(cfg, needs, split, run_path, tokenizer), needs, objective.name)
            for split in ("train", "eval")}
    groups = {split: recipe.encode_groups(r, tokenizer, cfg.dataset, split) for split, r in rows.items()}
    rewards = {split: row_rewards(r) for split, r in rows.items()}
    labels = {split: row_labels(r) for split, r in rows.items()}
    if needs.rewards or cfg.rewards.source == "model":
        rewards = reward_columns(cfg, run_path, rows, rewards, inputs)
    if needs.group_size is None and len(groups["train"][0]) < 2:
        raise UserError(f"{objective.name} needs at least two completions per prompt")

    # the policy, and the reference in the form this objective and this hardware call for
    accelerator = make_accelerator(cfg.hardware, cfg.model, cfg.train)
    policy = recipe.prepare_model(cfg, init_path, reward_head=needs.reward_head)
    chunk = chunk_setting(cfg.hardware.logprob_chunk)
    ref = reference.choose(reference.Setup(cfg, needs, objective.name, accelerator, policy.lm, init_path, groups,
                                           run_path, tokenizer.pad_token_id, chunk, inputs))
    objective.bind(accelerator=accelerator, policy=policy.lm, reference=ref.module)

    # recompute the LM head in backward when the reference's full distribution is used (memory) and the
    # micro-batch's logits are large, except under a sharding engine, which owns the weights between
    # forward and backward
    auto = cfg.hardware.get("recompute_lm_head", "auto") == "auto"
    recompute = needs.tokens.needs_reference_logits if auto else bool(cfg.hardware.recompute_lm_head)
    keep_below = KEEP_LOGITS_ELEMENTS // Head.of(policy.lm).vocab if auto else 0
    step = AlignStep(objective, groups, tokenizer.pad_token_id, accelerator.device, chunk,
                     recompute and not is_sharded(accelerator), ref, rewards, sft_weight, needs, cfg.get("diagnostics"),
                     labels, keep_below)
    final = recipe.train(
        cfg, out, policy, accelerator, recipe.group_lengths(groups["train"]),
        lambda m, idx, training: step(m, "train", idx, training),
        recipe.evaluator(lambda m, idx: step(m, "eval", idx, False), len(groups["eval"]),
                         int(cfg.hardware.micro_batch_size)),
        recipe.saver(tokenizer, extra=save_reward_head if needs.reward_head else None), {"objective": objective})
    if accelerator.is_main_process:
        _summarise(out, final, objective, groups)
        write_lineage(out, cfg, {**inputs, "dataset": str(cfg.dataset.name)})
    return sweep_value(cfg, final)


@dataclass
class AlignStep:
    """The loss and metrics of one micro-batch of groups: collate, the reference's part, the
    policy's token statistics, the objective. The align stage's forward; scripts/bench_align.py
    times exactly this."""

    objective: Objective
    groups: dict[str, list[list[Encoded]]]  # split -> groups of encoded completions
    pad: int
    device: torch.device
    chunk: int | None  # hardware.logprob_chunk (None: by vocabulary size)
    recompute: bool  # recompute the LM head in backward instead of keeping chunk logits
    reference: reference.ReferenceStrategy = field(default_factory=reference.NoReference)
    rewards: dict[str, Tensor | None] = field(default_factory=dict)
    sft_weight: float = 0.0
    needs: Needs | None = None  # what to compute: the objective's needs, widened by the diagnostics
    diagnostics: DictConfig | None = None
    labels: dict[str, Tensor | None] = field(default_factory=dict)  # split -> [N] bool (unpaired rows)
    keep_below: int = 0  # recompute only micro-batches of at least this many response tokens (auto)

    def __call__(self, model: nn.Module, split: str, indices: list[int], training: bool
                 ) -> tuple[Tensor, dict[str, Any]]:
        needs = self.needs or self.objective.needs
        seqs = [seq for i in indices for seq in self.groups[split][i]]
        batch = {k: v.to(self.device) for k, v in collate(seqs, self.pad).items()}
        b, k = len(indices), len(self.groups[split][indices[0]])
        ref, cached_ref_logps = self.reference.for_batch(batch, split, indices)
        recompute = self.recompute and int((batch["labels"][:, 1:] != IGNORE).sum()) >= self.keep_below
        stats, reward_pred = model(**batch, reference=ref, req=needs.tokens, chunk_size=self.chunk,
                                   recompute=recompute, group_size=k)

        def view(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.view(b, k)

        ref_logps = cached_ref_logps if cached_ref_logps is not None else stats.ref_logps
        rewards, labels = self.rewards.get(split), self.labels.get(split)
        g = Groups(logps=view(stats.logps), lengths=view(stats.lengths), training=training,
                   ref_logps=view(ref_logps) if needs.reference != "none" else None,
                   kl=view(stats.kl), reverse_kl=view(stats.reverse_kl),
                   mixture_logps={lam: view(t) for lam, t in stats.mixture_logps.items()},
                   rewards=None if rewards is None else rewards[indices].to(self.device),
                   reward_pred=view(reward_pred), log_sum_sq_probs=view(stats.log_sum_sq_probs),
                   prefix_logps=view(stats.prefix_logps), ref_prefix_logps=view(stats.ref_prefix_logps),
                   labels=None if labels is None else labels[indices].to(self.device))
        result = self.objective.loss(g)
        loss = result.loss
        metrics: dict[str, Any] = {**trl_metrics(g, result), **result.metrics,
                                   **diagnostics.metrics(g, self.diagnostics, _beta(self.objective))}
        if self.sft_weight:
            nll = sft_nll(g)
            loss = loss + self.sft_weight * nll
            metrics["sft/nll"] = nll.detach()
        metrics["num_tokens"] = int(batch["attention_mask"].sum())
        return loss, metrics


def _beta(objective: Objective) -> float | None:
    """The objective's β (a class attribute, or a function objective's option), if it has one."""
    beta = getattr(objective, "beta", None)
    return beta if beta is not None else getattr(objective, "hparams", {}).get("beta")


def sweep_value(cfg: DictConfig, summary: dict) -> float | None:
    """The job's `sweep_metric` (any number its summary holds), or a UserError naming the ones it has."""
    key = str(cfg.get("sweep_metric") or "eval_loss")
    value = summary.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        have = ", ".join(sorted(k for k, v in summary.items() if isinstance(v, int | float) and k.startswith("eval_")))
        raise UserError(f"sweep_metric={key} is not a number this job reports (its results are kept); "
                        f"held-out metrics it has: {have or 'none'}")
    return float(value)


def _summarise(out: Path, final: dict, objective: Objective, groups: dict) -> None:
    state = objective.state_dict()
    write_json(out / "summary.json", {
        **final, "objective": objective.name, "train_groups": len(groups["train"]), "eval_groups": len(groups["eval"]),
        **{f"objective_state/{k}": v for k, v in state.items() if isinstance(v, (int, float))}})
    acc = final.get("eval_rewards/accuracies")
    console.print(f"align {objective.name} done: eval loss {final.get('eval_loss', float('nan')):.4f}"
                  + (f", held-out reward accuracy {acc:.3f}" if acc is not None else "") + f" -> {out / 'model'}")


# --- rewards ------------------------------------------------------------------------------------

def row_labels(rows: list[dict]) -> Tensor | None:
    """Unpaired rows' labels (True: desirable), or None for preference rows."""
    return torch.tensor([bool(r["label"]) for r in rows]) if rows and "label" in rows[0] else None


def row_rewards(rows: list[dict]) -> Tensor | None:
    if all(r.get("rewards") is not None for r in rows):
        return torch.tensor([r["rewards"] for r in rows], dtype=torch.float32)
    return None


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

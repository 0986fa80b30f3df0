"""`prefkit reward`: a Bradley–Terry reward model on preference pairs.

The model is the run's SFT model (or `policy.init=base|<path>`) with a fresh scalar head on its
last hidden state; its LM head is kept. `reward.kind`:
- bt:          −log σ(r(y_w) − r(y_l))
- drdo_oracle: DRDO's oracle (Eq. 5): (1 − α)·BT − α·log-likelihood of y_w, α = reward.sft_weight;
               the log-likelihood term as printed (`nll`, token mean) or as the GRM code it cites
               (`grm_logsigmoid`: −log σ(β Σ log π(y_w)))
`reward.members: N` trains N independently seeded members (the reward-ensemble baseline of the
DRDO paper); they score with their mean. Writes <run>/reward/<job>/model (or member-<i>/model).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from prefkit.console import console
from prefkit.data import collate, encode_options
from prefkit.datasets import load_rows
from prefkit.errors import UserError
from prefkit.logprobs import PolicyModule, chunk_setting
from prefkit.models import load_model, load_tokenizer
from prefkit.objectives import Needs
from prefkit.rewardmodel import save_reward_model
from prefkit.rundir import run_dir, start_job, write_json, write_lineage
from prefkit.stages.align import encode_groups, policy_init, to_groups
from prefkit.trainer import Trainer, make_accelerator


def reward_loss(r: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor, cfg: DictConfig) -> tuple:
    """r, logps, lengths: [B, 2] with the chosen completion first."""
    bt = -F.logsigmoid(r[:, 0] - r[:, 1]).mean()
    kind = str(cfg.kind)
    if kind == "bt":
        return bt, {}
    if kind != "drdo_oracle":
        raise UserError(f"unknown reward.kind '{kind}'; valid: bt, drdo_oracle")
    alpha = float(cfg.sft_weight)
    if cfg.sft_form == "nll":
        lm = -logps[:, 0].sum() / lengths[:, 0].sum().clamp(min=1)
    elif cfg.sft_form == "grm_logsigmoid":
        lm = -F.logsigmoid(float(cfg.grm_beta) * logps[:, 0]).mean()
    else:
        raise UserError(f"unknown reward.sft_form '{cfg.sft_form}'; valid: nll, grm_logsigmoid")
    return (1 - alpha) * bt + alpha * lm, {"bt_loss": bt.detach(), "lm_loss": lm.detach()}


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    run = run_dir(cfg)
    init_path, inputs = policy_init(cfg, run)
    trust = bool(cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(init_path, trust_remote_code=trust)
    pairs = Needs(reference="none", group_size=2)
    rows = {s: to_groups(load_rows(cfg.dataset, "preference", s, run, tokenizer), pairs, "reward") for s in
            ("train", "eval")}
    groups = {s: encode_groups(r, tokenizer, cfg.dataset, s) for s, r in rows.items()}
    members = int(cfg.reward.members)
    if members < 1:
        raise UserError("reward.members must be at least 1")
    accelerator = make_accelerator(cfg.hardware, cfg.model, cfg.train)
    summaries = [train_member(cfg, member, members, out, init_path, tokenizer, groups, accelerator)
                 for member in range(members)]
    if accelerator.is_main_process:
        accs = [s.get("eval_accuracy", float("nan")) for s in summaries]
        write_json(out / "summary.json", {"kind": str(cfg.reward.kind), "members": members,
                                          "eval_accuracy": sum(accs) / len(accs), "per_member": summaries})
        write_lineage(out, cfg, {**inputs, "dataset": str(cfg.dataset.name)})


def train_member(cfg: DictConfig, member: int, members: int, out: Path, init_path: str, tokenizer,
                 groups: dict, accelerator) -> dict:
    """Train one reward model (one member of an ensemble) and save it."""
    member_out = out if members == 1 else out / f"member-{member}"
    device, pad = accelerator.device, tokenizer.pad_token_id
    chunk = chunk_setting(cfg.hardware.logprob_chunk)
    torch.manual_seed(int(cfg.seed) + member)  # a different head initialisation per member
    module = PolicyModule(load_model(cfg.model, init_path, "policy", cfg.peft), reward_head=True)

    def forward(split: str, indices: list[int]):
        seqs = [s for i in indices for s in groups[split][i]]
        batch = {k: v.to(device) for k, v in collate(seqs, pad).items()}
        stats, r = trainer.model(**batch, chunk_size=chunk, recompute=False)
        b = len(indices)
        r, logps, lengths = r.view(b, 2), stats.logps.view(b, 2), stats.lengths.view(b, 2)
        loss, extra = reward_loss(r, logps, lengths, cfg.reward)
        metrics = {"accuracy": (r[:, 0] > r[:, 1]).float().mean(), "margin": (r[:, 0] - r[:, 1]).mean().detach(),
                   "mean_reward": r.mean().detach(), **extra, "num_tokens": int(batch["attention_mask"].sum())}
        return loss, metrics

    def eval_fn() -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        n, mb = len(groups["eval"]), int(cfg.hardware.micro_batch_size)
        for start in range(0, n, mb):
            idx = list(range(start, min(n, start + mb)))
            loss, metrics = forward("eval", idx)
            for key, val in {"loss": loss, **metrics}.items():
                if key != "num_tokens":
                    sums[f"eval_{key}"] += float(val) * len(idx) / n
        return dict(sums)

    def save_fn(path: Path, final: bool, state: dict | None) -> None:
        save_reward_model(accelerator.unwrap_model(trainer.model), tokenizer, path,
                          {"kind": str(cfg.reward.kind), "encode_options": encode_options(cfg.dataset),
                           "member": member, "members": members}, state)

    trainer = Trainer(cfg, member_out, module, accelerator, len(groups["train"]),
                      lambda idx, training: forward("train", idx), eval_fn, save_fn)
    final = trainer.fit()
    trainer.finalize(member_out / "model")
    console.print(f"reward member {member}: held-out accuracy {final.get('eval_accuracy', float('nan')):.3f}")
    return final

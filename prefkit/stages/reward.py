"""`prefkit reward`: a Bradley–Terry reward model on preference pairs.

The model is the run's SFT model (or `policy.init=base|<path>`) with a fresh scalar head on its
last hidden state; its LM head is kept. `reward.kind`:
- bt:          −log σ(r(y_w) − r(y_l))
- drdo_oracle: DRDO's oracle (Nath et al. 2024, Eq. 5): (1 − α)·BT − α·log-likelihood of y_w,
               α = reward.sft_weight; the log-likelihood term as printed (`nll`, token mean) or as
               the GRM code it cites (`grm_logsigmoid`: −log σ(β Σ log π(y_w)))
`reward.members: N` trains N independently seeded members (the reward-ensemble baseline of the
DRDO paper); they score with their mean. Writes <run>/reward/<job>/model (or member-<i>/model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from prefkit import datasource, recipe
from prefkit.console import console
from prefkit.data import collate, encode_options
from prefkit.datasets import load_rows
from prefkit.engine import make_accelerator
from prefkit.errors import UserError
from prefkit.models import load_tokenizer
from prefkit.objectives import Needs
from prefkit.rewardmodel import save_reward_head, write_reward_meta
from prefkit.rundir import run_dir, start_job, write_json, write_lineage
from prefkit.tokenstats import chunk_setting


def run(cfg: DictConfig) -> None:
    run_path = run_dir(cfg)
    datasource.inherit(cfg, recipe.consumed_sft(cfg, run_path))  # the SFT model's data, unless told otherwise
    out = start_job(cfg)
    if out is None:
        return
    init_path, inputs = recipe.policy_init(cfg, run_path)
    tokenizer = load_tokenizer(init_path, trust_remote_code=bool(cfg.model.trust_remote_code))
    pairs = Needs(reference="none", group_size=2)
    rows = {s: recipe.to_groups(load_rows(cfg.dataset, "preference", s, run_path, tokenizer), pairs, "reward")
            for s in ("train", "eval")}
    groups = {s: recipe.encode_groups(r, tokenizer, cfg.dataset, s) for s, r in rows.items()}
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
    torch.manual_seed(int(cfg.seed) + member)  # a different head initialisation per member
    model = recipe.prepare_model(cfg, init_path, reward_head=True)
    step = PairStep(groups, tokenizer.pad_token_id, accelerator.device, chunk_setting(cfg.hardware.logprob_chunk),
                    cfg.reward)
    meta = {"kind": str(cfg.reward.kind), "encode_options": encode_options(cfg.dataset), "member": member,
            "members": members}

    def save_head_and_meta(module, path: Path, state: dict | None) -> None:
        save_reward_head(module, path, state)
        write_reward_meta(path, meta)

    final = recipe.train(cfg, member_out, model, accelerator, recipe.group_lengths(groups["train"]),
                         lambda m, idx, training: step(m, "train", idx),
                         recipe.evaluator(lambda m, idx: step(m, "eval", idx), len(groups["eval"]),
                                          int(cfg.hardware.micro_batch_size)),
                         recipe.saver(tokenizer, extra=save_head_and_meta))
    console.print(f"reward member {member}: held-out accuracy {final.get('eval_accuracy', float('nan')):.3f}")
    return final


class PairStep:
    """The reward loss and metrics of a micro-batch of pairs (chosen first)."""

    def __init__(self, groups: dict, pad: int, device: torch.device, chunk: int | None, reward_cfg: DictConfig):
        self.groups, self.pad, self.device, self.chunk, self.cfg = groups, pad, device, chunk, reward_cfg

    def __call__(self, model: nn.Module, split: str, indices: list[int]):
        seqs = [s for i in indices for s in self.groups[split][i]]
        batch = {k: v.to(self.device) for k, v in collate(seqs, self.pad).items()}
        stats, r = model(**batch, chunk_size=self.chunk, recompute=False)
        b = len(indices)
        r, logps, lengths = r.view(b, 2), stats.logps.view(b, 2), stats.lengths.view(b, 2)
        loss, extra = reward_loss(r, logps, lengths, self.cfg)
        return loss, {"accuracy": (r[:, 0] > r[:, 1]).float().mean(), "margin": (r[:, 0] - r[:, 1]).mean().detach(),
                      "mean_reward": r.mean().detach(), **extra, "num_tokens": int(batch["attention_mask"].sum())}


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

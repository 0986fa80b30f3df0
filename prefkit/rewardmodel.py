"""Reward models: a scalar head on a causal LM (trained by `prefkit reward`), or any HF
sequence-classification model (e.g. a sentiment classifier), behind one scoring interface.

A prefkit reward model directory is an HF causal-LM directory (the LM head is kept, as the
DRDO oracle recipe wants) plus `reward_head.safetensors` and `reward.json`; an ensemble job
holds one such directory per member and scores with their mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prefkit.data import collate, encode, join_text
from prefkit.errors import UserError
from prefkit.models import freeze, load_causal_lm, load_tokenizer
from prefkit.modules import StatsLM
from prefkit.rundir import write_json

REWARD_META = "reward.json"


def save_reward_head(module: StatsLM, path: Path, state: dict | None = None) -> None:
    """The scalar head as reward_head.safetensors, from the module or from `state`, the full state
    dict gathered from a sharding engine."""
    from prefkit.checkpoint import unique_tensors
    from prefkit.rundir import save_safetensors

    head = ({k[len("reward_head."):]: v for k, v in state.items() if k.startswith("reward_head.")} if state
            else dict(module.reward_head.state_dict()))
    save_safetensors(unique_tensors(head), path / "reward_head.safetensors")


def write_reward_meta(path: Path, meta: dict) -> None:
    """reward.json: how the reward model tokenizes (so scoring matches training), its kind, its member index."""
    write_json(path / REWARD_META, meta)


def load_head_model(path: Path, dtype: str = "float32") -> StatsLM:
    from safetensors.torch import load_file

    module = StatsLM(load_causal_lm(str(path), dtype), reward_head=True)
    module.reward_head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
    return freeze(module)


@dataclass
class Scorer:
    """Scores (prompt, completion) pairs; the mean over members for an ensemble."""

    members: list[nn.Module]
    tokenizer: object
    encode_options: dict
    kind: str  # "head" (prefkit reward model) or "classifier" (HF sequence classification)
    label: int = 1  # classifier: which logit
    output: str = "logit"  # classifier: logit | prob | logodds

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    def to(self, device) -> Scorer:
        self.members = [m.to(device) for m in self.members]
        return self

    @torch.no_grad()
    def score_members(self, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[list[float]]:
        """Per member, the score of every pair."""
        out: list[list[float]] = [[] for _ in self.members]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            for i, member in enumerate(self.members):
                out[i].extend(self._score(member, chunk))
        return out

    def _score(self, member: nn.Module, pairs: list[tuple[str, str]]) -> list[float]:
        if self.kind == "head":  # tokenized exactly as in training: prompt, response, EOS
            seqs = [encode(self.tokenizer, p, c, **self.encode_options) for p, c in pairs]
            batch = {k: v.to(self.device) for k, v in collate(seqs, self.tokenizer.pad_token_id).items()}
            _, rewards = member(**batch)
            return rewards.float().cpu().tolist()
        # a classifier reads the whole text with its own special tokens
        enc = self.tokenizer([join_text(p, c) for p, c in pairs], truncation=True, padding=True,
                             max_length=int(self.encode_options.get("max_length", 512)), return_tensors="pt")
        logits = member(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
        if self.output == "logit":
            values = logits[:, self.label]
        elif self.output == "prob":
            values = logits.softmax(-1)[:, self.label]
        else:  # log-odds of the label against the rest
            logp = logits.log_softmax(-1)
            values = logp[:, self.label] - torch.log1p(-logp[:, self.label].exp().clamp(max=1 - 1e-7))
        return values.cpu().tolist()


def score_texts(scorer: Scorer, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
    per_member = scorer.score_members(pairs, batch_size)
    return [sum(vals) / len(vals) for vals in zip(*per_member, strict=True)]


def member_dirs(job_path: Path) -> list[Path]:
    """The model directories of a reward job: model/, or member-<i>/model for an ensemble."""
    single = job_path / "model"
    if (single / "reward_head.safetensors").exists():
        return [single]
    members = sorted((p / "model" for p in job_path.glob("member-*") if (p / "model").is_dir()),
                     key=lambda p: int(p.parent.name.split("-")[1]))
    if not members:
        raise UserError(f"{job_path} holds no reward model (model/ or member-<i>/model)")
    return members


def load_reward_model(job_path: Path, device: str | torch.device = "cpu") -> Scorer:
    dirs = member_dirs(job_path)
    meta = json.loads((dirs[0] / REWARD_META).read_text())
    tokenizer = load_tokenizer(str(dirs[0]))
    return Scorer([load_head_model(d) for d in dirs], tokenizer, meta["encode_options"], "head").to(device)


def load_classifier(path: str, label: int | str, output: str, encode_options: dict,
                    device: str | torch.device = "cpu", trust_remote_code: bool = False) -> Scorer:
    """An HF sequence-classification model as a scorer (e.g. siebert/sentiment-roberta-large-english
    with label POSITIVE, the DPO paper's IMDB reward)."""
    from transformers import AutoModelForSequenceClassification

    if output not in ("logit", "prob", "logodds"):
        raise UserError(f"classifier output must be logit, prob or logodds, not '{output}'")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load classifier '{path}': {str(err).splitlines()[0]}") from None
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        names = model.config.label2id
        if label not in names:
            raise UserError(f"classifier '{path}' has no label '{label}'; its labels: {', '.join(names)}")
        label = names[label]
    tokenizer = load_tokenizer(path)
    return Scorer([freeze(model)], tokenizer, encode_options, "classifier", int(label), output).to(device)

"""Rows, tokenization and batches.

Every dataset, embedded or real, is turned into plain rows of three kinds:
- SFT rows        {"prompt": str, "completion": str}
- preference rows {"prompt": str, "completions": [str, ...], "rewards": [float, ...] (optional)}
  with the preferred completion first (for pairs: [chosen, rejected]);
- prompt rows     {"prompt": str, ...}
Adapters for real datasets live in `prefkit.datasets`; they produce the same rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefkit.errors import UserError

IGNORE = -100  # the label of prompt and padding positions: no loss, no statistic


@dataclass(frozen=True)
class Encoded:
    """One prompt+response sequence: token ids and how many of them are prompt."""

    ids: tuple[int, ...]
    prompt_len: int


def encode(tokenizer, prompt: str, completion: str, *, max_length: int, max_prompt_length: int,
           prompt_truncation: str = "keep_end", min_response_tokens: int = 1, add_eos: bool = True,
           prompt_special_tokens: bool = True, where: str = "") -> Encoded:
    """Tokenize prompt and response separately (so their boundary is exact) and truncate.

    The rule: the prompt keeps at most `max_prompt_length` tokens, and never so many that fewer
    than `min_response_tokens` response tokens fit in `max_length`; a prompt over its budget
    loses tokens from its start (`keep_end`, the default: the question nearest the answer
    survives) or its end (`keep_start`), keeping a leading BOS. Then the response is cut to fit
    `max_length` (it may lose its EOS). The whole response is never dropped.

    `prompt_special_tokens=False` is for prompts already rendered by a chat template (which
    carries its own BOS); `add_eos=False` for completions that end with their own end-of-turn."""
    prompt_ids = tokenizer(prompt, add_special_tokens=prompt_special_tokens)["input_ids"]
    response_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise UserError(f"empty response{where}: every completion needs at least one token")
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    budget = min(max_prompt_length, max_length - min_response_tokens)
    if budget < 1:
        raise UserError(f"max_length={max_length} leaves no room for a prompt and {min_response_tokens} "
                        "response token(s)")
    if len(prompt_ids) > budget:
        bos = tokenizer.bos_token_id
        head = [bos] if bos is not None and prompt_ids[0] == bos else []
        keep = budget - len(head)
        if prompt_truncation == "keep_end":
            prompt_ids = head + prompt_ids[len(prompt_ids) - keep:]
        elif prompt_truncation == "keep_start":
            prompt_ids = prompt_ids[:budget]
        else:
            raise UserError(f"unknown prompt_truncation '{prompt_truncation}'; valid: keep_end, keep_start")
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return Encoded(tuple(prompt_ids + response_ids), len(prompt_ids))


def check_unknown(seqs: list[Encoded], tokenizer, ds_cfg, where: str) -> None:
    """Warn when more than 1% of the data's tokens are <unk> for this tokenizer, and stop above
    `dataset.max_unk_share`: a model that reads most of the data as <unk> trains on nothing and
    still reports numbers."""
    unk = getattr(tokenizer, "unk_token_id", None)
    total = sum(len(s.ids) for s in seqs)
    if unk is None or total == 0:
        return
    share = sum(s.ids.count(unk) for s in seqs) / total
    limit = float(ds_cfg.get("max_unk_share", 0.05))
    what = (f"{where}: {share:.1%} of the tokens are <unk> for the tokenizer of "
            f"{getattr(tokenizer, 'name_or_path', 'this model')} (its vocabulary does not cover this text)")
    if share > limit:
        raise UserError(f"{what}; use a model whose tokenizer reads this text, or raise dataset.max_unk_share "
                        f"(now {limit})")
    if share > 0.01:
        import logging

        logging.getLogger("prefkit").warning("%s", what)


def encode_options(ds_cfg) -> dict[str, Any]:
    return {"max_length": int(ds_cfg.max_length), "max_prompt_length": int(ds_cfg.max_prompt_length),
            "prompt_truncation": str(ds_cfg.get("prompt_truncation", "keep_end")),
            "min_response_tokens": int(ds_cfg.get("min_response_tokens", 1)),
            "add_eos": bool(ds_cfg.get("add_eos", True)),
            "prompt_special_tokens": bool(ds_cfg.get("prompt_special_tokens", True))}


def encode_prompts(tokenizer, prompts: list[dict], ds) -> list[tuple[int, tuple[int, ...]]]:
    """(prompt index, token ids) of every prompt, exactly as training saw them (same truncation rule)."""
    budget = min(int(ds.max_prompt_length), int(ds.max_length) - 1)
    encoded = []
    for i, row in enumerate(prompts):
        e = encode(tokenizer, row["prompt"], "x", max_length=budget + 1, max_prompt_length=budget,
                   prompt_truncation=str(ds.get("prompt_truncation", "keep_end")),
                   prompt_special_tokens=bool(ds.get("prompt_special_tokens", True)), add_eos=False)
        encoded.append((i, e.ids[:e.prompt_len]))
    return encoded


def join_text(prompt: str, completion: str) -> str:
    """The full text of a prompt and its completion, as a reader (oracle, classifier) sees it."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return prompt + completion
    return f"{prompt} {completion}"


# --- validation ---------------------------------------------------------------------------------

def check_rows(rows: list[dict], kind: str, source: str, on_bad_row: str = "error") -> list[dict]:
    """Keep well-formed rows; a malformed one raises (with its index) or is skipped and counted."""
    good, bad = [], []
    for i, row in enumerate(rows):
        problem = row_problem(row, kind)
        if problem is None:
            good.append(row)
        elif on_bad_row == "skip":
            bad.append(i)
        else:
            raise UserError(f"{source}: row {i} is malformed: {problem} "
                            "(set dataset.on_bad_row=skip to skip such rows)")
    if bad:
        import logging
        logging.getLogger("prefkit").warning("%s: skipped %d malformed row(s), first at index %d",
                                             source, len(bad), bad[0])
    if not good:
        raise UserError(f"{source}: no usable {kind} rows")
    return good


def row_problem(row: Any, kind: str) -> str | None:
    if not isinstance(row, dict):
        return "not an object"
    if not isinstance(row.get("prompt"), str):
        return "'prompt' is missing or not a string"
    if kind == "sft":
        c = row.get("completion")
        if not isinstance(c, str) or not c.strip():
            return "'completion' is missing or empty"
    elif kind == "preference":
        cs = row.get("completions")
        if not isinstance(cs, list) or len(cs) < 2:
            return "'completions' must be a list of at least two responses"
        if any(not isinstance(c, str) or not c.strip() for c in cs):
            return "a completion is missing or empty"
        rs = row.get("rewards")
        if rs is not None and (not isinstance(rs, list) or len(rs) != len(cs)
                               or any(not isinstance(r, (int, float)) for r in rs)):
            return "'rewards' must be one number per completion"
    elif kind == "unpaired":  # {prompt, completion, label}, or a preference row to be split (datasets.unpair)
        if "completions" in row:
            return row_problem(row, "preference")
        c = row.get("completion")
        if not isinstance(c, str) or not c.strip():
            return "'completion' is missing or empty"
        if not isinstance(row.get("label"), bool):
            return "'label' must be true (desirable) or false (undesirable)"
    return None


# --- batches ------------------------------------------------------------------------------------

def collate(seqs: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids, attention_mask, and labels (-100 on prompt and padding)."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        mask[i, :n] = 1
        labels[i, s.prompt_len:n] = ids[i, s.prompt_len:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_left(prompts: list[tuple[int, ...]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded prompts for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class EpochSampler:
    """Deterministic shuffled order, epoch after epoch; its position is part of the checkpoint,
    so a resumed run sees exactly the batches the uninterrupted run would have seen.

    With `lengths` (train.group_by_length), each epoch's batches hold examples of similar length,
    as HF's LengthGroupedSampler makes them: the shuffled order is cut into windows of
    GROUP_WINDOW batches, each window sorted by length (longest first) and cut into batches, and
    the batches shuffled again, so that lengths do not trend through the epoch. A batch's
    micro-batches are then of similar length too. The examples of an epoch (and the ragged tail
    it drops) are those of the ungrouped order."""

    GROUP_WINDOW = 50

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, lengths: list[int] | None = None):
        if n < batch_size:
            raise UserError(f"only {n} training examples for a global batch of {batch_size}; "
                            "lower the batch size or add data")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.batch_size, self.seed, self.shuffle, self.lengths = n, batch_size, seed, shuffle, lengths
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        rng = random.Random(f"{self.seed}/{self.epoch}")
        if self.shuffle:
            rng.shuffle(order)
        if self.lengths is None:
            return order
        used, tail = order[:self.batches_per_epoch * self.batch_size], order[self.batches_per_epoch * self.batch_size:]
        window = self.GROUP_WINDOW * self.batch_size
        batches = []
        for start in range(0, len(used), window):
            part = sorted(used[start:start + window], key=lambda i: -self.lengths[i])  # stable: ties keep their order
            batches += [part[b:b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return [i for batch in batches for i in batch] + tail

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def next(self) -> list[int]:
        if self.cursor + self.batch_size > self.n:  # drop the ragged tail, start the next epoch
            self.epoch += 1
            self.cursor = 0
            self._order = self._make_order()
        batch = self._order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["batch_size"] != self.batch_size:
            raise UserError("the checkpoint was made with a different dataset size or batch size; "
                            "resume with the same data and batch settings, or start over with overwrite=true")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._make_order()

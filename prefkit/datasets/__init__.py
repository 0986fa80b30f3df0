"""Datasets: each config in conf/dataset/ names an adapter (one module each, registered in
prefkit.datasets.base) that turns its data into plain rows (see prefkit.data): SFT rows,
preference rows, or prompt rows, for a split ("train" or "eval"), validated once.

    synthetic   the embedded review grammar            labeled        pairs labelled in the run
    hh          Anthropic/hh-rlhf                      imdb           stanfordnlp/imdb prefixes
    tldr        Reddit TL;DR and its comparisons       ultrafeedback  chat preferences (+ argilla's)
    local       your own files in the row schema       local_chat     your own conversations (messages)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefkit.datasets import hh, imdb, labeled, local, local_chat, synthetic, tldr, ultrafeedback  # noqa: F401  (registration)
from prefkit.datasets.base import ADAPTERS, KINDS
from prefkit.errors import UserError


def load_rows(ds: DictConfig, kind: str, split: str, run: Path | None = None, tokenizer=None) -> list[dict]:
    """Rows of `kind` for `split` from the dataset described by `ds`, validated. Unpaired rows
    come from files that have them (`dataset=local` with a `label` column) or from any
    preference dataset by splitting each pair."""
    if kind not in KINDS:
        raise ValueError(kind)
    name = str(ds.name)
    if name not in ADAPTERS:
        raise UserError(f"unknown dataset '{name}'; valid: {', '.join(sorted(ADAPTERS))}")
    if kind == "unpaired":
        native = getattr(ADAPTERS[name], "reads_unpaired", False)
        return unpair(ADAPTERS[name](ds, "unpaired" if native else "preference", tokenizer, run).rows(split))
    return ADAPTERS[name](ds, kind, tokenizer, run).rows(split)


def unpair(rows: list[dict]) -> list[dict]:
    """Unpaired rows {prompt, completion, label}: each preference row gives its best completion as
    desirable (label true) and its worst as undesirable (false), as TRL's unpair_preference_dataset
    does for pairs (completions between the two of a K-way row are not used); rows that are already
    unpaired are kept. The desirable/undesirable counts are then equal, so KTO's default weights
    (1, 1) need no correction for imbalance."""
    out = []
    for row in rows:
        if "completions" not in row:
            out.append(row)
            continue
        rest = {k: v for k, v in row.items() if k not in ("completions", "rewards")}
        out.append({**rest, "completion": row["completions"][0], "label": True})
        out.append({**rest, "completion": row["completions"][-1], "label": False})
    return out


def with_mismatched(rows: list[dict], seed: int) -> list[dict]:
    """Unpaired rows as groups [y, y']: y the labelled completion, y' the completion of another
    prompt, from which KTO estimates its reference point KL(π_θ ‖ π_ref) ≈ mean h(y') (Ethayarajh et
    al. 2024, Sec. 4.1). TRL's KTOTrainer pairs each row with the previous row's completion in its
    (sequential) batch; here y' is the previous row's in a seeded permutation of the split (the next
    one whose prompt differs), fixed for the whole run, so the reference's log-probs of y' can be
    cached like any other."""
    import random

    if len({r["prompt"] for r in rows}) < 2:
        raise UserError("unpaired rows need at least two distinct prompts (the reference point is estimated from "
                        "completions of other prompts)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out = []
    for pos, i in enumerate(order):
        step = 1
        while rows[order[(pos - step) % len(order)]]["prompt"] == rows[i]["prompt"]:
            step += 1
        other = rows[order[(pos - step) % len(order)]]
        out.append({**{k: v for k, v in rows[i].items() if k != "completion"},
                    "completions": [rows[i]["completion"], other["completion"]]})
    return out


__all__ = ["ADAPTERS", "KINDS", "load_rows", "unpair", "with_mismatched"]

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
    """Rows of `kind` for `split` from the dataset described by `ds`, validated."""
    if kind not in KINDS:
        raise ValueError(kind)
    name = str(ds.name)
    if name not in ADAPTERS:
        raise UserError(f"unknown dataset '{name}'; valid: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](ds, kind, tokenizer, run).rows(split)


__all__ = ["ADAPTERS", "KINDS", "load_rows"]

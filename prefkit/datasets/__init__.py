"""Dataset adapters: each dataset config (conf/dataset/<name>.yaml) becomes plain rows
(see prefkit.data): SFT rows, preference rows, or prompt rows, for a split ("train" or "eval")."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefkit import synthetic
from prefkit.data import check_rows
from prefkit.errors import UserError

KINDS = ("sft", "preference", "prompts")


def load_rows(ds: DictConfig, kind: str, split: str, run: Path | None = None, tokenizer=None) -> list[dict]:
    """Rows of `kind` for `split` from the dataset described by `ds`, validated."""
    if kind not in KINDS:
        raise ValueError(kind)
    name = str(ds.name)
    if name == "synthetic":
        rows = _synthetic(ds, kind, split)
    elif name == "labeled":
        from prefkit.datasets.labeled import load as load_labeled
        rows = load_labeled(ds, kind, split, run)
    else:
        from prefkit.datasets import hub
        rows = hub.load(ds, kind, split, tokenizer)
    return check_rows(rows, kind, f"dataset {name} ({kind}, {split})", str(ds.get("on_bad_row", "error")))


def _synthetic(ds: DictConfig, kind: str, split: str) -> list[dict]:
    sizes = ds.sizes[kind]
    if split not in sizes:
        raise UserError(f"dataset synthetic has no '{split}' split for {kind}; valid: {', '.join(sizes)}")
    n, seed = int(sizes[split]), int(ds.seed)
    grammar = synthetic.ReviewGrammar(**ds.get("grammar", {}))
    if kind == "sft":
        return synthetic.sft_examples(n, seed, split, grammar)
    if kind == "prompts":
        return synthetic.prompts(n, seed, split, grammar)
    return synthetic.preference_examples(n, seed, split, grammar, group_size=int(ds.group_size))

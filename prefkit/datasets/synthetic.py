"""`dataset=synthetic`: the embedded review grammar (prefkit.synthetic), drawn fresh from its seed."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefkit import synthetic
from prefkit.datasets.base import register
from prefkit.errors import UserError


class Synthetic:
    def __init__(self, ds: DictConfig, kind: str, tokenizer=None, run: Path | None = None):
        self.ds, self.kind = ds, kind

    def rows(self, split: str) -> list[dict]:
        """Generated rows are well formed by construction: nothing to validate."""
        sizes = self.ds.sizes[self.kind]
        if split not in sizes:
            raise UserError(f"dataset synthetic has no '{split}' split for {self.kind}; valid: {', '.join(sizes)}")
        n, seed = int(sizes[split]), int(self.ds.seed)
        grammar = synthetic.ReviewGrammar(**self.ds.get("grammar", {}))
        if self.kind == "sft":
            return synthetic.sft_examples(n, seed, split, grammar)
        if self.kind == "prompts":
            return synthetic.prompts(n, seed, split, grammar)
        return synthetic.preference_examples(n, seed, split, grammar, group_size=int(self.ds.group_size))


register("synthetic", Synthetic)

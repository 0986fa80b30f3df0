"""The dataset registry: `dataset=<name>` selects an adapter class, which turns the dataset its
config describes into prefkit rows (see prefkit.data) of one kind for a split."""

from __future__ import annotations

from typing import Protocol

KINDS = ("sft", "preference", "prompts", "unpaired")


class Adapter(Protocol):
    """Constructed as Adapter(ds config, kind, tokenizer, run directory); `rows(split)` returns
    validated rows of that kind ("train" or "eval")."""

    def rows(self, split: str) -> list[dict]: ...


ADAPTERS: dict[str, type] = {}


def register(name: str, cls: type) -> None:
    ADAPTERS[name] = cls

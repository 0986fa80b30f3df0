"""`dataset=imdb`: stanfordnlp/imdb review prefixes (preferences come from the synthetic-pairs loop)."""

from __future__ import annotations

import random
import re
from typing import Any

from prefkit.datasets.base import register
from prefkit.datasets.reader import Malformed, SourceAdapter, as_text, plain
from prefkit.errors import UserError


class IMDB(SourceAdapter):
    """stanfordnlp/imdb: {"text", "label"} reviews. `<br />` becomes a newline; the prompt is the
    review's first `prefix.length` tokens (of the model's tokenizer) or words, the rest its
    continuation. No preference pairs: those come from sampling and judging."""

    keys = frozenset({"prefix", "interleave_labels"})

    def __init__(self, ds, kind, tokenizer=None, run=None):
        super().__init__(ds, kind, tokenizer)
        if kind == "preference":
            raise UserError("dataset imdb has reviews, not preference pairs: IMDB preferences come from the "
                            "synthetic-pairs loop (sample completions for the imdb prompts, label each pair with a "
                            "judge such as the sentiment reward, then align on the labelled pairs, dataset=labeled)")
        prefix = plain(ds.get("prefix")) or {}
        self.unit = str(prefix.get("unit", "tokens"))
        if self.unit not in ("tokens", "words"):
            raise UserError(f"dataset imdb: prefix.unit={self.unit}; valid: tokens, words")
        length = prefix.get("length", 10)
        lo, hi = (length, length) if isinstance(length, int) else tuple(length)
        if not 1 <= int(lo) <= int(hi):
            raise UserError(f"dataset imdb: prefix.length={length}; give a positive int or [min, max]")
        self.lo, self.hi, self.seed = int(lo), int(hi), int(ds.get("seed") or 0)
        if self.unit == "tokens":
            if tokenizer is None:
                raise UserError("dataset imdb: prefix.unit=tokens cuts prefixes with the model's tokenizer, and none "
                                "was given; set dataset.prefix.unit=words to cut by words")
            if not getattr(tokenizer, "is_fast", False):
                raise UserError("dataset imdb: prefix.unit=tokens needs a fast tokenizer (for character offsets); "
                                "set dataset.prefix.unit=words")

    def required_columns(self):
        return ("text", "label") if self.ds.get("interleave_labels") else ("text",)

    def order(self, table):
        """Seeded shuffle within each label, then alternate labels: the first N rows are balanced
        (the stored splits are sorted by label)."""
        if not self.ds.get("interleave_labels"):
            return None
        groups: dict[Any, list[int]] = {}
        for i, label in enumerate(table["label"]):
            groups.setdefault(label, []).append(i)
        rng = random.Random(self.seed)
        queues = []
        for label in sorted(groups, key=str):
            rng.shuffle(groups[label])
            queues.append(groups[label])
        order = []
        for j in range(max(map(len, queues), default=0)):
            order += [q[j] for q in queues if j < len(q)]
        return order

    def carve_key(self, raw, index):
        return str(raw.get("text"))

    def _cut(self, text: str, n: int) -> int | None:
        """Character offset where the first n units end, or None if the text has no more than n."""
        if self.unit == "words":
            ends = [m.end() for m in re.finditer(r"\S+", text)]
        else:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ends = [end for _, end in enc["offset_mapping"]]
        return ends[n - 1] if len(ends) > n else None

    def convert(self, raw, index):
        text = as_text(raw.get("text"), "text").replace("<br />", "\n")
        n = self.lo if self.lo == self.hi else random.Random(f"{self.seed}/{index}").randint(self.lo, self.hi)
        cut = self._cut(text, n)
        if cut is None or not text[cut:].strip():
            raise Malformed(f"the review has nothing after its {n}-{self.unit[:-1]} prefix")
        prompt, rest = text[:cut], text[cut:]
        if self.kind == "sft":
            return {"prompt": prompt, "completion": rest}
        row = {"prompt": prompt, "reference": rest}
        if raw.get("label") is not None:
            row["label"] = raw["label"]
        return row


register("imdb", IMDB)

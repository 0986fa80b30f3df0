"""`dataset=hh`: Anthropic/hh-rlhf, split at the last "\\n\\nAssistant:"."""

from __future__ import annotations

from typing import Any

from prefkit.datasets.base import register
from prefkit.datasets.reader import Malformed, SourceAdapter, as_text, pair_row

ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"


def split_hh(transcript: Any, what: str) -> tuple[str, str]:
    """An HH transcript -> (prompt up to and including its last "\\n\\nAssistant:", response)."""
    text = as_text(transcript, what)
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise Malformed(f"{what} has no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


class HH(SourceAdapter):
    """Anthropic/hh-rlhf: {"chosen", "rejected"} full transcripts that share every turn but the
    last Assistant reply. The same rule holds for every kind, so sft, preference and prompt rows
    come from the same pairs: a pair whose transcripts do not share their prompt, or with an empty
    response, is malformed."""

    keys = frozenset({"single_turn"})

    def required_columns(self):
        return ("chosen", "rejected")

    def carve_key(self, raw, index):
        try:
            return split_hh(raw["chosen"], "chosen")[0]
        except Malformed:
            return str(index)

    def convert(self, raw, index):
        prompt, chosen = split_hh(raw["chosen"], "chosen")
        other, rejected = split_hh(raw["rejected"], "rejected")
        if other != prompt:
            at = next(j for j, (a, b) in enumerate(zip(prompt + "\0", other + "\1", strict=False)) if a != b)
            raise Malformed("chosen and rejected do not share the prompt up to their last '\\n\\nAssistant:' "
                            f"(they differ from character {at})")
        for what, response in (("chosen", chosen), ("rejected", rejected)):
            if not response.strip():
                raise Malformed(f"the {what} response is empty")
        if self.ds.get("single_turn") and prompt.count(HUMAN) != 1:
            return None
        return pair_row(self.kind, prompt, chosen, rejected)


register("hh", HH)

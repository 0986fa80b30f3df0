"""`dataset=local`: your own JSON/JSONL/Parquet files in prefkit's row schema."""

from __future__ import annotations

from prefkit.datasets.base import register
from prefkit.datasets.chat import is_messages
from prefkit.datasets.reader import Malformed, SourceAdapter


class Local(SourceAdapter):
    """Files already in prefkit's row schema: {"prompt", "completion"}, {"prompt", "completions",
    "rewards"?}, {"prompt", "chosen", "rejected"} (-> completions [chosen, rejected]) or unpaired
    {"prompt", "completion", "label"}; other keys are kept. SFT rows from preference files use the
    first (best) completion; prompt rows keep the first completion as "reference"; unpaired rows
    are read as they are, or split from pairs (prefkit.datasets.unpair)."""

    reads_unpaired = True

    def missing_columns(self, found):
        chat_like = "messages" in found or {"chosen", "rejected"} <= set(found)
        missing = [] if "prompt" in found else \
            ["prompt (for conversational files of message lists use dataset=local_chat)" if chat_like else "prompt"]
        pairs = "chosen" in found and "rejected" in found
        if self.kind == "sft" and not ({"completion", "completions"} & set(found) or pairs):
            missing.append("completion (or completions, or chosen and rejected)")
        if self.kind == "preference" and "completions" not in found and not pairs:
            missing.append("completions (this file has unpaired rows, {prompt, completion, label}: they train "
                           "objectives that take unpaired data, such as kto)" if {"completion", "label"} <= set(found)
                           else "completions (or chosen and rejected)")
        if self.kind == "unpaired" and not ({"completion", "label"} <= set(found) or "completions" in found or pairs):
            missing.append("completion and label (or completions, or chosen and rejected, to split)")
        return missing

    def carve_key(self, raw, index):
        return str(raw.get("prompt"))

    def convert(self, raw, index):
        row = {k: v for k, v in raw.items() if v is not None}  # datasets fills absent keys with None
        if "messages" in row or any(is_messages(row.get(k)) for k in ("prompt", "completion", "chosen", "rejected")):
            raise Malformed("a conversation (message lists): read conversational files with dataset=local_chat, "
                            "which renders them with the model's chat template")
        if "chosen" in row or "rejected" in row:
            if "completions" in row:
                raise Malformed("has both 'completions' and 'chosen'/'rejected'")
            row["completions"] = [row.pop("chosen", None), row.pop("rejected", None)]
        completions = row.get("completions")
        first = completions[0] if isinstance(completions, list) and completions else None
        if self.kind == "unpaired":
            if "completions" in row:  # a preference row: split by load_rows
                row.pop("completion", None)
                row.pop("label", None)
            return row
        if self.kind == "sft":
            if row.get("label") is False:  # SFT on an unpaired file learns its desirable completions only
                return None
            if "completion" not in row and first is not None:
                row["completion"] = first
            row.pop("completions", None)
            row.pop("rewards", None)
        elif self.kind == "prompts":
            reference = row.pop("completion", None) or first
            row.pop("completions", None)
            row.pop("rewards", None)
            if reference is not None:
                row.setdefault("reference", reference)
        else:
            row.pop("completion", None)
        return row


register("local", Local)

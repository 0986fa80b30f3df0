"""`dataset=local_chat`: your own conversational files (TRL's and the Hub's message-list forms),
rendered with the model's chat template."""

from __future__ import annotations

import json

from prefkit.datasets.base import register
from prefkit.datasets.chat import ChatTemplate, messages
from prefkit.datasets.reader import Malformed, SourceAdapter

REPLIES = ("completion", "chosen", "rejected")
MESSAGE_KEYS = ("prompt", "messages", *REPLIES)


class LocalChat(SourceAdapter):
    """Rows whose texts are {"role", "content"} message lists, in any of TRL's conversational forms:
      {"messages": [...]}                       sft (the last assistant message is the completion)
                                                or prompts (the conversation is the prompt)
      {"prompt": [...], "completion": [...]}    sft with an explicit prompt
      {"prompt": [...], "chosen": [...], "rejected": [...]}   preference, explicit prompt
      {"chosen": [...], "rejected": [...]}      preference, implicit prompt (all but the last message,
                                                which must be the same in both)
      {"prompt": [...]}                         prompts
    The prompt is the conversation rendered with the generation prompt; a completion is what the
    reply adds after it (with the template's end-of-turn). Other keys are kept."""

    keys = frozenset({"chat_template"})

    def __init__(self, ds, kind, tokenizer=None, run=None):
        super().__init__(ds, kind, tokenizer)
        self.chat = ChatTemplate(tokenizer, ds.get("chat_template"), str(ds.name))

    def missing_columns(self, found):
        has = set(found)
        if self.kind == "preference":
            return [] if {"chosen", "rejected"} <= has else ["chosen and rejected"]
        if self.kind == "sft":
            ok = "messages" in has or ("prompt" in has and ({"completion", "chosen"} & has)) or "chosen" in has
            return [] if ok else ["messages (or prompt and completion, or chosen)"]
        return [] if {"prompt", "messages"} & has or "chosen" in has else ["prompt (or messages)"]

    def carve_key(self, raw, index):
        try:
            return json.dumps(self._split(raw)[0], sort_keys=True)
        except Malformed:
            return str(index)

    def _split(self, raw) -> tuple[list[dict], dict[str, list[dict]]]:
        """(the conversation before the reply, {"completion"/"chosen"/"rejected": reply messages})."""
        for key in MESSAGE_KEYS:
            if isinstance(raw.get(key), str):
                raise Malformed(f"'{key}' is text, not a list of messages: read plain-text rows with dataset=local")
        if raw.get("prompt") is not None:
            conversation = messages(raw["prompt"], "prompt", ends_with=None)
            return conversation, {k: messages(raw[k], k) for k in REPLIES if raw.get(k) is not None}
        if raw.get("messages") is not None:
            whole = messages(raw["messages"], "messages", ends_with=None)
            if whole[-1]["role"] == "assistant":
                return whole[:-1], {"completion": whole[-1:]}
            return whole, {}
        chosen = messages(raw.get("chosen"), "chosen")
        replies = {"chosen": chosen[-1:]}
        if raw.get("rejected") is not None:
            rejected = messages(raw["rejected"], "rejected")
            if rejected[:-1] != chosen[:-1]:
                raise Malformed("chosen and rejected differ before their last assistant message")
            replies["rejected"] = rejected[-1:]
        return chosen[:-1], replies

    def convert(self, raw, index):
        conversation, replies = self._split(raw)
        if not conversation:
            raise Malformed("no conversation before the reply (the prompt is empty)")
        prompt = self.chat.prompt(conversation)
        text = {k: self.chat.completion(conversation, v, prompt, index, k) for k, v in replies.items()}
        row = {k: v for k, v in raw.items() if k not in MESSAGE_KEYS and v is not None}
        first = text.get("completion", text.get("chosen"))
        if self.kind == "sft":
            if first is None:
                raise Malformed("no reply to train on (completion, chosen, or a last assistant message)")
            row.pop("rewards", None)
            return {**row, "prompt": prompt, "completion": first}
        if self.kind == "preference":
            if "chosen" not in text or "rejected" not in text:
                raise Malformed("a preference row needs chosen and rejected")
            return {**row, "prompt": prompt, "completions": [text["chosen"], text["rejected"]]}
        row.pop("rewards", None)
        reply = replies.get("completion", replies.get("chosen"))
        return {**row, "prompt": prompt, "messages": conversation,
                **({"reference": reply[-1]["content"]} if reply else {})}


register("local_chat", LocalChat)

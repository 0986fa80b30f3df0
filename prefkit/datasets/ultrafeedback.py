"""`dataset=ultrafeedback` (and `ultrafeedback_argilla`): chat preferences rendered with the model's chat template."""

from __future__ import annotations

import json
from typing import Any

from prefkit.datasets.base import register
from prefkit.datasets.chat import ChatTemplate, messages
from prefkit.datasets.reader import Malformed, SourceAdapter, as_text, pair_row, plain
from prefkit.errors import UserError


class UltraFeedback(SourceAdapter):
    """Conversations as {"role", "content"} message lists in "chosen" and "rejected" (identical but
    for the last, assistant, message), rendered with the tokenizer's chat template: the prompt is
    the conversation before the last assistant turn with the generation prompt; a completion is
    what rendering the whole conversation adds after it (with the template's end-of-turn).
    HuggingFaceH4/ultrafeedback_binarized, argilla/ultrafeedback-binarized-preferences-cleaned,
    princeton-nlp/*-ultrafeedback."""

    keys = frozenset({"chat_template", "score_columns", "scores_as_rewards"})

    def __init__(self, ds, kind, tokenizer=None, run=None):
        super().__init__(ds, kind, tokenizer)
        name = str(ds.name)
        self.chat = ChatTemplate(tokenizer, ds.get("chat_template"), name)
        scores = plain(ds.get("score_columns"))
        if scores is not None and (not isinstance(scores, list) or len(scores) != 2):
            raise UserError(f"dataset {name}: score_columns must name two columns (chosen, rejected) or be null")
        self.score_columns = scores
        self.scores_as_rewards = bool(ds.get("scores_as_rewards", False))
        if self.scores_as_rewards and scores is None:
            raise UserError(f"dataset {name}: scores_as_rewards needs score_columns")

    def required_columns(self):
        return ("chosen", "rejected", *(self.score_columns or ()))

    def carve_key(self, raw, index):
        chosen = raw.get("chosen")
        if isinstance(chosen, list) and len(chosen) > 1:
            return json.dumps(chosen[:-1], sort_keys=True)
        return str(raw.get("prompt") or index)

    def convert(self, raw, index):
        chosen, rejected = messages(raw.get("chosen"), "chosen"), messages(raw.get("rejected"), "rejected")
        conversation = chosen[:-1]
        if conversation != rejected[:-1]:
            raise Malformed("chosen and rejected differ before their last assistant message")
        if not conversation:  # only the replies are stored: the prompt column is the user turn
            conversation = [{"role": "user", "content": as_text(raw.get("prompt"), "prompt")}]
        prompt = self.chat.prompt(conversation)
        completions = [self.chat.completion(conversation, [reply[-1]], prompt, index, what)
                       for what, reply in (("chosen", chosen), ("rejected", rejected))]
        extra: dict[str, Any] = {}
        if self.kind == "preference" and self.score_columns:
            scores = [raw.get(c) for c in self.score_columns]
            if self.scores_as_rewards:
                if any(not isinstance(s, (int, float)) for s in scores):
                    raise Malformed(f"a score ({', '.join(self.score_columns)}) is missing")
                extra["rewards"] = [float(s) for s in scores]
            else:
                extra["scores"] = scores
        if self.kind == "prompts":
            extra["messages"] = conversation
        return pair_row(self.kind, prompt, *completions, reference=chosen[-1]["content"], **extra)


register("ultrafeedback", UltraFeedback)
register("ultrafeedback_argilla", UltraFeedback)

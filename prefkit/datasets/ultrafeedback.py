"""`dataset=ultrafeedback` (and `ultrafeedback_argilla`): chat preferences rendered with the model's chat template."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from prefkit.datasets.base import register
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
        if tokenizer is None:
            raise UserError(f"dataset {name} renders conversations with the model's chat template; "
                            "load it with the model's tokenizer")
        self.template = ds.get("chat_template") or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise UserError(f"dataset {name}: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                            "template; use a chat (instruct) model or set dataset.chat_template to a Jinja template")
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

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise Malformed(f"the chat template rejects this conversation: {err}") from None

    def convert(self, raw, index):
        chosen, rejected = _messages(raw.get("chosen"), "chosen"), _messages(raw.get("rejected"), "rejected")
        conversation = chosen[:-1]
        if conversation != rejected[:-1]:
            raise Malformed("chosen and rejected differ before their last assistant message")
        if not conversation:  # only the replies are stored: the prompt column is the user turn
            conversation = [{"role": "user", "content": as_text(raw.get("prompt"), "prompt")}]
        for what, message in (("chosen", chosen[-1]), ("rejected", rejected[-1])):
            if not message["content"].strip():
                raise Malformed(f"the {what} response is empty")
        prompt = self._render(conversation, True)
        completions = []
        for message in (chosen[-1], rejected[-1]):
            full = self._render([*conversation, message], False)
            if not full.startswith(prompt):
                raise UserError(f"dataset {self.ds.name}: row {index}: the chat template does not render the prompt "
                                "(with its generation prompt) as a prefix of the whole conversation, so prompt and "
                                "completion cannot be split; use another template (dataset.chat_template)")
            completions.append(full[len(prompt):])
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


def _messages(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Malformed(f"'{what}' is not a list of messages")
    out = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise Malformed(f"'{what}' has a message without a string role and content")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "assistant":
        raise Malformed(f"'{what}' does not end with an assistant message")
    return out


register("ultrafeedback", UltraFeedback)
register("ultrafeedback_argilla", UltraFeedback)

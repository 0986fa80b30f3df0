"""Conversations ({"role", "content"} message lists, as TRL and the Hub store them) rendered with
the model's chat template into prefkit's text rows.

The prompt is the conversation before the reply, rendered with the generation prompt; a
completion is what rendering the whole conversation adds after it (the reply and the template's
end-of-turn). A template whose prompt is not a prefix of the whole conversation cannot be split
this way and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefkit.datasets.reader import Malformed
from prefkit.errors import UserError


class ChatTemplate:
    """The model's chat template (or the dataset's `chat_template` instead)."""

    def __init__(self, tokenizer, template: str | None, dataset: str):
        if tokenizer is None:
            raise UserError(f"dataset {dataset} renders conversations with the model's chat template; "
                            "load it with the model's tokenizer")
        self.tokenizer, self.dataset = tokenizer, dataset
        self.template = template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise UserError(f"dataset {dataset}: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                            "template; use a chat (instruct) model or set dataset.chat_template to a Jinja template")

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise Malformed(f"the chat template rejects this conversation: {err}") from None

    def prompt(self, conversation: list[dict]) -> str:
        return self.render(conversation, True)

    def completion(self, conversation: list[dict], reply: list[dict], prompt: str, index: int,
                   what: str = "reply") -> str:
        """What the reply's messages add to the rendered conversation, after `prompt`."""
        if not any(message["content"].strip() for message in reply):
            raise Malformed(f"the {what} response is empty")
        full = self.render([*conversation, *reply], False)
        if not full.startswith(prompt):
            raise UserError(f"dataset {self.dataset}: row {index}: the chat template does not render the prompt "
                            "(with its generation prompt) as a prefix of the whole conversation, so prompt and "
                            "completion cannot be split; use another template (dataset.chat_template)")
        return full[len(prompt):]


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def messages(value: Any, what: str, ends_with: str | None = "assistant") -> list[dict]:
    """A validated message list (its last message from `ends_with`, unless None)."""
    if not isinstance(value, list) or not value:
        raise Malformed(f"'{what}' is not a list of messages")
    out = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise Malformed(f"'{what}' has a message without a string role and content")
        out.append({"role": message["role"], "content": message["content"]})
    if ends_with and out[-1]["role"] != ends_with:
        raise Malformed(f"'{what}' does not end with an {ends_with} message")
    return out

"""Pairwise LLM-as-judge: a local HF chat model or any OpenAI-compatible endpoint, with the
prompt template and verdict pattern from conf/judge_template/<name>.yaml.

Every comparison is asked twice with the positions swapped (as MT-Bench and Arena-Hard do); verdicts map back
to the candidate's side; a verdict that cannot be parsed counts as invalid and is left out of
the denominator (and reported). The endpoint's key is read from the environment at call time
and never stored in a config, a log or a results file.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from prefkit.errors import UserError

Verdict = float | None  # 1: the candidate wins, 0.5: tie, 0: it loses, None: invalid


@dataclass
class Template:
    system: str
    user: str  # with {prompt}, {a}, {b}
    verdict_pattern: str  # a regex whose group 1 is "A", "B" (or the tie word)
    tie_word: str | None = None

    def render(self, prompt: str, a: str, b: str) -> list[dict]:
        messages = [{"role": "user", "content": self.user.format(prompt=prompt, a=a, b=b)}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def parse(self, text: str) -> str | None:
        m = re.search(self.verdict_pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        return m.group(1).strip().upper() if m else None


def template_from(cfg: DictConfig) -> Template:
    return Template(str(cfg.get("system") or ""), str(cfg.user), str(cfg.verdict_pattern),
                    str(cfg.tie_word).upper() if cfg.get("tie_word") else None)


def to_verdict(label: str | None, candidate_is_a: bool, tie_word: str | None) -> Verdict:
    if label is None:
        return None
    if tie_word and label == tie_word:
        return 0.5
    if label not in ("A", "B"):
        return None
    return 1.0 if (label == "A") == candidate_is_a else 0.0


class JudgeUnavailable(Exception):
    """The endpoint did not answer after every retry (the comparisons judged so far are kept)."""


class OpenAIBackend:
    """Chat completions from any OpenAI-compatible endpoint. A reply that is not a readable chat
    completion (bad bytes, no choices) becomes an empty text, hence an invalid verdict, recorded;
    a transport failure is retried and then raises JudgeUnavailable. The models that answered are
    collected (`models_seen`) for the results file."""

    def __init__(self, model: str, max_tokens: int, temperature: float, timeout_s: float = 120.0, retries: int = 3):
        self.base = os.environ.get("PREFKIT_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or \
            "https://api.openai.com/v1"
        self.model = os.environ.get("PREFKIT_JUDGE_MODEL") or model
        if not self.model:
            raise UserError("the openai judge needs a model: judge.llm.model=... or PREFKIT_JUDGE_MODEL")
        self.max_tokens, self.temperature, self.timeout_s, self.retries = max_tokens, temperature, timeout_s, retries
        self.models_seen: set[str] = set()

    def __call__(self, messages: list[dict]) -> str:
        key = os.environ.get("PREFKIT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        for attempt in range(self.retries):
            try:
                req = urllib.request.Request(self.base.rstrip("/") + "/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                break
            except OSError as err:
                if attempt == self.retries - 1:
                    # never echo the request (it carries the key in its headers)
                    raise JudgeUnavailable(f"judge endpoint {self.base} failed {self.retries} times "
                                           f"({type(err).__name__})") from None
                time.sleep(2 ** attempt)
        try:
            reply = json.loads(raw.decode("utf-8"))
            if reply.get("model"):
                self.models_seen.add(str(reply["model"]))
            return str(reply["choices"][0]["message"]["content"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            return ""


def hf_backend(path: str, max_tokens: int, device: str) -> Callable[[list[dict]], str]:
    import torch

    from prefkit.models import freeze, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"judge model {path} has no chat template")
    model = freeze(load_causal_lm(path)).to(device)

    @torch.no_grad()
    def call(messages: list[dict]) -> str:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = {k: v.to(device) for k, v in ids.items()}
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_tokens, top_k=0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return call


def make_backend(llm: DictConfig, device: str) -> Callable[[list[dict]], str]:
    backend = str(llm.backend)
    if backend == "openai":
        return OpenAIBackend(str(llm.get("model") or ""), int(llm.max_new_tokens), float(llm.temperature),
                             float(llm.get("timeout_s", 120)), int(llm.get("retries", 3)))
    if backend == "hf":
        if not llm.get("model"):
            raise UserError("judge.llm.model must name a local HF chat model for backend=hf")
        return hf_backend(str(llm.model), int(llm.max_new_tokens), device)
    raise UserError(f"unknown judge.llm.backend '{backend}'; valid: hf, openai")


def judge_both_orders(call: Callable[[list[dict]], str], template: Template, prompt: str, candidate: str,
                      baseline: str, done: int = 0) -> tuple[Verdict, Verdict, list[str]]:
    """(verdict with the candidate as A, verdict with it as B, the judge's raw texts). `done`: how
    many comparisons are already saved, for the message when the endpoint gives up."""
    try:
        first = call(template.render(prompt, candidate, baseline))
        second = call(template.render(prompt, baseline, candidate))
    except JudgeUnavailable as err:
        raise UserError(f"{err}; the {done} comparison(s) judged so far are kept: rerun the same command to go on "
                        "(judge.llm.timeout_s and judge.llm.retries set the patience)") from None
    return (to_verdict(template.parse(first), True, template.tie_word),
            to_verdict(template.parse(second), False, template.tie_word), [first, second])

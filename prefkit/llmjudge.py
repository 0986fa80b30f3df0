"""Pairwise LLM-as-judge: a local HF chat model or any OpenAI-compatible endpoint, with the
prompt template and verdict pattern from conf/judge_template/<name>.yaml.

Every comparison is asked twice with the positions swapped (anchors.md §8); verdicts map back
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


def openai_backend(model: str, max_tokens: int, temperature: float, retries: int = 3) -> Callable[[list[dict]], str]:
    base = os.environ.get("PREFKIT_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    model = os.environ.get("PREFKIT_JUDGE_MODEL") or model
    if not model:
        raise UserError("the openai judge needs a model: judge.llm.model=... or PREFKIT_JUDGE_MODEL")

    def call(messages: list[dict]) -> str:
        key = os.environ.get("PREFKIT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature}).encode()
        for attempt in range(retries):
            try:
                req = urllib.request.Request(base.rstrip("/") + "/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=120) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"]
            except (OSError, KeyError, json.JSONDecodeError) as err:
                if attempt == retries - 1:
                    # never echo the request (it carries the key in its headers)
                    raise UserError(f"judge endpoint {base} failed: {type(err).__name__}") from None
                time.sleep(2 ** attempt)
        return ""

    return call


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
        return openai_backend(str(llm.get("model") or ""), int(llm.max_new_tokens), float(llm.temperature))
    if backend == "hf":
        if not llm.get("model"):
            raise UserError("judge.llm.model must name a local HF chat model for backend=hf")
        return hf_backend(str(llm.model), int(llm.max_new_tokens), device)
    raise UserError(f"unknown judge.llm.backend '{backend}'; valid: hf, openai")


def judge_both_orders(call: Callable[[list[dict]], str], template: Template, prompt: str, candidate: str,
                      baseline: str) -> tuple[Verdict, Verdict, list[str]]:
    """(verdict with the candidate as A, verdict with it as B, the judge's raw texts)."""
    first = call(template.render(prompt, candidate, baseline))
    second = call(template.render(prompt, baseline, candidate))
    return (to_verdict(template.parse(first), True, template.tie_word),
            to_verdict(template.parse(second), False, template.tie_word), [first, second])

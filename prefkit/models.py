"""Loading models and tokenizers: the embedded tiny GPT-NeoX and any Hub or local model go
through the same `from_pretrained` path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefkit.errors import UserError

EMBEDDED_PREFIX = "embedded:"
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}


def build_word_tokenizer(words: list[str]):
    """A word-level tokenizer over `words`, in HF format (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Like Llama's tokenizer, a BOS starts every encoded text unless add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos']} $A", special_tokens=[(SPECIAL_TOKENS["bos"], vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"], clean_up_tokenization_spaces=False)


def build_embedded_model(arch: dict[str, Any], tokenizer) -> nn.Module:
    """A freshly initialised tiny GPT-NeoX sized by `arch` (seeded, so reproducible)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    arch = dict(arch)
    seed = arch.pop("seed", 0)
    vocab_size = -(-len(tokenizer) // 8) * 8  # pad to a multiple of 8, as real vocabularies are
    config = GPTNeoXConfig(
        vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **arch)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def embedded_dir(name: str, arch: dict[str, Any], cache_root: Path) -> Path:
    """Create (once) and return the directory of the embedded model `name` with `arch`.

    The directory is keyed by a hash of the architecture and the lexicon, so changing either
    gives a new model instead of silently reusing a stale one."""
    from prefkit import synthetic

    words = synthetic.lexicon()
    key = hashlib.sha256(json.dumps({"arch": dict(arch), "words": words}, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root / "embedded" / f"{name}-{key}"
    if (out / "config.json").exists():
        return out
    tokenizer = build_word_tokenizer(words)
    model = build_embedded_model(arch, tokenizer)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process made it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(model_cfg, cache_root: Path) -> str:
    """Turn a model config's `name_or_path` into something `from_pretrained` accepts."""
    name = str(model_cfg.name_or_path)
    if name.startswith(EMBEDDED_PREFIX):
        arch = model_cfg.get("embedded") or {}
        return str(embedded_dir(name[len(EMBEDDED_PREFIX):], dict(arch), cache_root))
    return name


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; valid: {', '.join(sorted(DTYPES))}") from None


def _hub_error(path: str, err: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = ("HF_HUB_OFFLINE=1 is set and nothing is cached" if offline else
            "the Hub could not be reached and nothing is cached, or the name is wrong")
    return UserError(f"cannot load '{path}': {hint} ({type(err).__name__}: {str(err).splitlines()[0]})")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from err
    if tok.pad_token is None:  # Pythia, GPT-2, Llama: pad with EOS; masks keep it out of every loss
        tok.pad_token = tok.eos_token
    return tok


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: log-ratios against the reference must be deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "classifier_dropout"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err) from err
    disable_dropout(model)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""The embedded model: a tiny GPT-NeoX created from a config, with a byte-level BPE tokenizer
trained on the embedded task's domain and a little ordinary English, both saved with
save_pretrained so that they load through the same `from_pretrained` path as any Hub model.

A byte-level tokenizer reads any text (a byte it has never merged is a token of its own), so a
user's own data never turns into <unk>; the domain's words are single tokens, so the task's
sequences are as short as with a word-level vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


BPE_VOCAB = 1024
TOKENIZER_VERSION = "bpe-1"  # part of the cache key: a change of the recipe below makes a new model


def tokenizer_corpus() -> list[str]:
    """What the BPE merges are learnt from: reviews of the embedded grammar (fixed seed) and a page
    of ordinary English shipped with prefkit."""
    from prefkit import synthetic

    rng = random.Random("prefkit-embedded-tokenizer")
    grammar = synthetic.ReviewGrammar()
    reviews = [" ".join(grammar.review(rng)) for _ in range(4000)]
    # completions start mid-review without a leading space: every word must be one token there too
    completions = [grammar.sample(rng).completion for _ in range(4000)] + synthetic.lexicon()
    english = (Path(__file__).parent / "assets" / "generic_english.txt").read_text().splitlines()
    return reviews + completions + english * 4


def build_bpe_tokenizer(vocab_size: int = BPE_VOCAB):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenization) trained on `tokenizer_corpus`, with the
    special tokens at ids 0–3 and a BOS before every encoded text (as the word-level one had)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos']} $A", special_tokens=[(SPECIAL_TOKENS["bos"], tok.token_to_id("<bos>"))])
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

    The directory is keyed by a hash of the architecture and the tokenizer's recipe (its corpus
    included), so changing either gives a new model instead of silently reusing a stale one."""
    corpus = hashlib.sha256("\n".join(tokenizer_corpus()).encode()).hexdigest()
    spec = {"arch": dict(arch), "tokenizer": [TOKENIZER_VERSION, BPE_VOCAB, corpus]}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root / "embedded" / f"{name}-{key}"
    if (out / "config.json").exists():
        return out
    tokenizer = build_bpe_tokenizer()
    model = build_embedded_model(arch, tokenizer)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    from prefkit.rundir import share_safetensors

    share_safetensors(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process made it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out



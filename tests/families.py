"""Tokenizers of real model families, built offline: byte-level BPE trained on a little text,
with each family's special tokens, BOS/EOS behaviour and (for instruct models) chat template.

The templates are the non-tool parts of the families' published templates (Meta-Llama-3-8B-
Instruct; Qwen2.5-*-Instruct), which is all that preference data uses.
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

TEXT = ["The quick brown fox jumps over the lazy dog.", "Please answer politely and briefly.",
        "Bonjour ! Comment allez-vous ?", "A reward model scores each response; the policy learns.",
        "system user assistant You are a helpful assistant."] * 20


def _bpe(specials: list[str], vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def llama3_tokenizer(path: Path):
    """Llama 3 Instruct's kind: BOS <|begin_of_text|> added to every encoding, end-of-turn <|eot_id|>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bpe(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=specials[1:4])
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(path)
    return fast


def qwen25_tokenizer(path: Path):
    """Qwen 2.5 Instruct's kind: no BOS, end-of-turn <|im_end|>, pad <|endoftext|>."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = QWEN25_TEMPLATE
    fast.save_pretrained(path)
    return fast


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def endoftext_tokenizer(path: Path):
    """GPT-2's and GPT-NeoX's kind: <|endoftext|> is BOS, EOS and UNK, none added; no pad token."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def bos_added_tokenizer(path: Path, eos: str, extra: list[str], template: str):
    """Mistral's and Phi-3's kind: <s> added to every encoding, </s> or <|end|> ending a turn."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", *extra]
    tok = _bpe(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>",
                                   additional_special_tokens=[t for t in extra if t != eos])
    fast.chat_template = template
    fast.save_pretrained(path)
    return fast


def family_model(family: str, path: Path) -> Path:
    """A tiny random-init model of `family`, from that family's own transformers config class, and
    a tokenizer of its kind, saved together in `path` (what `model.name_or_path=` points at)."""
    import torch
    import transformers as tf

    tokenizer = {
        "gpt_neox": endoftext_tokenizer, "gpt2": endoftext_tokenizer, "llama3": llama3_tokenizer,
        "qwen2.5": qwen25_tokenizer,
        "mistral": lambda p: bos_added_tokenizer(p, "</s>", [], MISTRAL_TEMPLATE),
        "phi3": lambda p: bos_added_tokenizer(p, "<|end|>", ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
                                              PHI3_TEMPLATE),
    }[family](path)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    decoder = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
               "max_position_embeddings": 256}
    config = {
        "gpt_neox": lambda: tf.GPTNeoXConfig(**decoder, **ids),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids),
        "llama3": lambda: tf.LlamaConfig(**decoder, num_key_value_heads=2, **ids),
        "mistral": lambda: tf.MistralConfig(**decoder, num_key_value_heads=2, sliding_window=None, **ids),
        "qwen2.5": lambda: tf.Qwen2Config(**decoder, num_key_value_heads=2, **ids),
        "phi3": lambda: tf.Phi3Config(**decoder, num_key_value_heads=2, original_max_position_embeddings=256,
                                      pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), **ids),
    }[family]()
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path

"""Loading models and tokenizers: the embedded tiny GPT-NeoX and any Hub or local model go
through the same `from_pretrained` path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefkit.errors import UserError


def resolve_model_path(model_cfg, cache_root: Path) -> str:
    """Turn a model config's `name_or_path` into something `from_pretrained` accepts."""
    from prefkit.embedded import EMBEDDED_PREFIX, embedded_dir

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


def load_model(model_cfg, path: str, role: str = "policy", peft_cfg=None) -> nn.Module:
    """The policy (trainable) or the frozen reference described by a model config; with a LoRA
    config the policy gets its adapter (and, for QLoRA, a 4-bit base)."""
    dtype = str(model_cfg.dtype if role == "policy" else model_cfg.reference_dtype)
    trust = bool(model_cfg.get("trust_remote_code", False))
    attn = model_cfg.get("attn_implementation")
    if role == "policy" and peft_cfg is not None and peft_cfg.get("load_in_4bit"):
        return _load_4bit(path, dtype, trust, attn, peft_cfg)
    model = load_causal_lm(path, dtype, trust, attn)
    if role == "policy" and peft_cfg is not None and str(peft_cfg.method) != "none":
        model = apply_lora(model, peft_cfg)
    return model


def apply_lora(model: nn.Module, peft_cfg) -> nn.Module:
    if str(peft_cfg.method) != "lora":
        raise UserError(f"unknown peft.method '{peft_cfg.method}'; valid: none, lora")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("peft=lora needs the peft package: pip install 'prefkit[peft]'") from None
    targets = peft_cfg.target_modules
    targets = str(targets) if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=int(peft_cfg.r), lora_alpha=int(peft_cfg.alpha), lora_dropout=float(peft_cfg.dropout),
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _load_4bit(path: str, dtype: str, trust: bool, attn, peft_cfg) -> nn.Module:
    if not torch.cuda.is_available():
        raise UserError("peft=qlora loads the base model in 4 bits, which needs a CUDA GPU and bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch_dtype(dtype),
                                                 trust_remote_code=trust, attn_implementation=attn)
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model)
    disable_dropout(model)
    return apply_lora(model, peft_cfg)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def save_policy(lm: nn.Module, tokenizer, path: Path, final: bool = True, state: dict | None = None,
                prefix: str = "lm.") -> None:
    """An HF model directory that `from_pretrained` loads. A LoRA policy is saved merged (plus
    its adapter in adapter/); mid-training it is merged on a copy so training can go on.
    `state`: the full state dict a sharding engine gathered (keys under `prefix`)."""
    from prefkit.rundir import share_safetensors

    if state is not None:
        if is_peft(lm):
            raise UserError("LoRA under FSDP/DeepSpeed is not supported")
        lm.save_pretrained(path, state_dict={k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    else:
        if is_peft(lm):
            lm.save_pretrained(path / "adapter")
            if not final:
                import copy
                lm = copy.deepcopy(lm)
            lm = lm.merge_and_unload()
        lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    share_safetensors(path)

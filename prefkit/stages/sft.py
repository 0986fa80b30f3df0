"""`prefkit sft`: supervised fine-tuning of the base model on the dataset's SFT rows.

Writes <run>/sft/<job>/model (an HF model directory with its tokenizer) and summary.json with
the held-out loss and perplexity next to a unigram baseline's."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from prefkit import recipe
from prefkit.console import console
from prefkit.data import IGNORE, Encoded, check_unknown, collate, encode, encode_options
from prefkit.datasets import load_rows
from prefkit.engine import make_accelerator
from prefkit.models import load_tokenizer, resolve_model_path
from prefkit.rundir import run_dir, start_job, write_json, write_lineage
from prefkit.tokenstats import chunk_setting


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    torch.manual_seed(int(cfg.seed))
    run_path = run_dir(cfg)
    base = resolve_model_path(cfg.model, Path(cfg.run.root) / ".cache")
    tokenizer = load_tokenizer(base, trust_remote_code=bool(cfg.model.trust_remote_code))
    train = encode_rows(load_rows(cfg.dataset, "sft", "train", run_path, tokenizer), tokenizer, cfg.dataset, "train")
    held_out = encode_rows(load_rows(cfg.dataset, "sft", "eval", run_path, tokenizer), tokenizer, cfg.dataset, "eval")

    accelerator = make_accelerator(cfg.hardware, cfg.model, cfg.train)
    model = recipe.prepare_model(cfg, base)
    nll = TokenNLL(tokenizer.pad_token_id, accelerator.device, chunk_setting(cfg.hardware.logprob_chunk),
                   bool(cfg.objective.get("loss_on_prompt")))

    def loss_fn(module: nn.Module, indices: list[int], training: bool):
        total, n_tokens = nll(module, [train[i] for i in indices])
        return total / max(n_tokens, 1), {"num_tokens": n_tokens}

    def eval_fn(module: nn.Module) -> dict[str, float]:
        """Token-weighted: the held-out NLL per token and its perplexity."""
        total, count, mb = 0.0, 0, int(cfg.hardware.micro_batch_size)
        for start in range(0, len(held_out), mb):
            s, n = nll(module, held_out[start:start + mb])
            total, count = total + float(s), count + n
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}

    final = recipe.train(cfg, out, model, accelerator, [len(s.ids) for s in train], loss_fn, eval_fn,
                         recipe.saver(tokenizer))
    if accelerator.is_main_process:
        summary = {**final, "unigram_perplexity": unigram_perplexity(train, held_out, len(tokenizer)),
                   "train_examples": len(train), "eval_examples": len(held_out)}
        write_json(out / "summary.json", summary)
        console.print(f"sft done: eval loss {summary.get('eval_loss', float('nan')):.4f}, perplexity "
                      f"{summary.get('eval_perplexity', float('nan')):.2f} (unigram baseline "
                      f"{summary['unigram_perplexity']:.2f}) -> {out / 'model'}")
        write_lineage(out, cfg, {"base_model": base, "dataset": str(cfg.dataset.name)})


class TokenNLL:
    """Summed NLL of a batch's response tokens (all tokens with objective.loss_on_prompt) and their count."""

    def __init__(self, pad: int, device: torch.device, chunk: int | None, on_prompt: bool):
        self.pad, self.device, self.chunk, self.on_prompt = pad, device, chunk, on_prompt

    def __call__(self, module: nn.Module, seqs: list[Encoded]) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(self.device) for k, v in collate(seqs, self.pad).items()}
        if self.on_prompt:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        stats, _ = module(**batch, chunk_size=self.chunk, recompute=False)
        return -stats.logps.sum(), int(stats.lengths.sum())


def encode_rows(rows: list[dict], tokenizer, ds: DictConfig, split: str) -> list[Encoded]:
    opts = encode_options(ds)
    seqs = [encode(tokenizer, r["prompt"], r["completion"], where=f" in {split} row {i}", **opts)
            for i, r in enumerate(rows)]
    check_unknown(seqs, tokenizer, ds, f"dataset {ds.name} ({split})")
    return seqs


def unigram_perplexity(train: list[Encoded], held_out: list[Encoded], vocab_size: int) -> float:
    """Perplexity of an add-one unigram model of response tokens: the floor any LM must beat."""
    counts = Counter(t for s in train for t in s.ids[s.prompt_len:])
    total = sum(counts.values()) + vocab_size
    nll = [-math.log((counts[t] + 1) / total) for s in held_out for t in s.ids[s.prompt_len:]]
    return math.exp(sum(nll) / len(nll))

"""`prefkit sft`: supervised fine-tuning of the base model on the dataset's SFT rows.

Writes <run>/sft/<job>/model (an HF model directory with its tokenizer) and summary.json with
the held-out loss and perplexity next to a unigram baseline's."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig

from prefkit.console import console
from prefkit.data import Encoded, collate, encode, encode_options
from prefkit.datasets import load_rows
from prefkit.logprobs import PolicyModule, chunk_setting
from prefkit.models import load_model, load_tokenizer, resolve_model_path, save_policy
from prefkit.rundir import run_dir, start_job, write_json, write_lineage
from prefkit.trainer import Trainer, make_accelerator


def encode_rows(rows: list[dict], tokenizer, ds: DictConfig, split: str) -> list[Encoded]:
    opts = encode_options(ds)
    return [encode(tokenizer, r["prompt"], r["completion"], where=f" in {split} row {i}", **opts)
            for i, r in enumerate(rows)]


def unigram_perplexity(train: list[Encoded], held_out: list[Encoded], vocab_size: int) -> float:
    """Perplexity of an add-one unigram model of response tokens: the floor any LM must beat."""
    counts = Counter(t for s in train for t in s.ids[s.prompt_len:])
    total = sum(counts.values()) + vocab_size
    nll = [-math.log((counts[t] + 1) / total) for s in held_out for t in s.ids[s.prompt_len:]]
    return math.exp(sum(nll) / len(nll))


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    torch.manual_seed(int(cfg.seed))
    run = run_dir(cfg)
    base = resolve_model_path(cfg.model, Path(cfg.run.root) / ".cache")
    tokenizer = load_tokenizer(base, trust_remote_code=bool(cfg.model.trust_remote_code))
    train = encode_rows(load_rows(cfg.dataset, "sft", "train", run, tokenizer), tokenizer, cfg.dataset, "train")
    held_out = encode_rows(load_rows(cfg.dataset, "sft", "eval", run, tokenizer), tokenizer, cfg.dataset, "eval")
    accelerator = make_accelerator(cfg.hardware, cfg.model, cfg.train)
    lm = load_model(cfg.model, base, "policy", cfg.peft)
    if cfg.hardware.get("gradient_checkpointing"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad = tokenizer.pad_token_id
    chunk = chunk_setting(cfg.hardware.logprob_chunk)

    def nll(seqs: list[Encoded]) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(accelerator.device) for k, v in collate(seqs, pad).items()}
        if cfg.objective.get("loss_on_prompt"):
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        stats, _ = trainer.model(**batch, chunk_size=chunk, recompute=False)
        n_tokens = int(stats.lengths.sum())
        return -stats.logps.sum(), n_tokens

    def loss_fn(indices: list[int], train_mode: bool):
        total, n_tokens = nll([train[i] for i in indices])
        return total / max(n_tokens, 1), {"num_tokens": n_tokens}

    def eval_fn() -> dict[str, float]:
        total, count = 0.0, 0
        mb = int(cfg.hardware.micro_batch_size)
        for start in range(0, len(held_out), mb):
            s, n = nll(held_out[start:start + mb])
            total, count = total + float(s), count + n
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}

    def save_fn(path: Path, final: bool, state: dict | None) -> None:
        save_policy(accelerator.unwrap_model(trainer.model).lm, tokenizer, path, final, state)

    trainer = Trainer(cfg, out, PolicyModule(lm), accelerator, len(train), loss_fn, eval_fn, save_fn)
    final = trainer.fit()
    trainer.finalize(out / "model")
    if accelerator.is_main_process:
        summary = {**final, "unigram_perplexity": unigram_perplexity(train, held_out, len(tokenizer)),
                   "train_examples": len(train), "eval_examples": len(held_out)}
        write_json(out / "summary.json", summary)
        console.print(f"sft done: eval loss {summary.get('eval_loss', float('nan')):.4f}, perplexity "
                      f"{summary.get('eval_perplexity', float('nan')):.2f} (unigram baseline "
                      f"{summary['unigram_perplexity']:.2f}) -> {out / 'model'}")
        write_lineage(out, cfg, {"base_model": base, "dataset": str(cfg.dataset.name)})

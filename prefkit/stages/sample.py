"""`prefkit sample`: N completions per prompt from every policy of the run (or the ones named).

Generation is batched over prompts sorted by length, with the KV cache, and every sampling
parameter explicit (temperature, top-p, top-k with 0 = off, max new tokens): no library default
such as an implicit top-k of 50 can leak in. Each row also stores the policy's and the
reference's sequence log-probs, the exact token-level KL Σ_t KL(π ‖ π_ref) along the sample
(and the forward one), and the entropy, all under the sampling temperature, so `judge` needs
no second pass. The output is append-only and resumable: rows go to
<job>/<policy>/samples.partial.jsonl one batch at a time, and a restarted run skips the prompts
already complete, so nothing is lost or duplicated; samples.jsonl appears when a policy is done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from prefkit import datasource
from prefkit.console import console, progress
from prefkit.data import Encoded, check_unknown, collate, collate_left, encode_prompts
from prefkit.datasets import load_rows
from prefkit.errors import UserError
from prefkit.models import freeze, load_causal_lm, load_tokenizer
from prefkit.modules import final_hidden, reference_hidden
from prefkit.policies import Policy, describe, select
from prefkit.rundir import run_dir, start_job, write_json, write_lineage
from prefkit.samplestore import SampleWriter, read_samples
from prefkit.tokenstats import Head, TokenRequest, stats_from_hidden

if TYPE_CHECKING:
    from transformers import GenerationConfig

# Keep the policy's generation logits for the statistics pass (instead of a second forward of the
# policy) when one batch's fit in this many bytes (float32).
KEPT_LOGITS_BYTES = 2**30


def generation_config(s: DictConfig, tokenizer):
    """A GenerationConfig with every sampling choice explicit; top_k=0 and top_p=1 switch those
    filters off (transformers would otherwise fill an unset top_k with 50)."""
    from transformers import GenerationConfig

    temperature = float(s.temperature)
    sampling = temperature > 0
    return GenerationConfig(
        do_sample=sampling, temperature=temperature if sampling else 1.0, top_k=int(s.top_k), top_p=float(s.top_p),
        max_new_tokens=int(s.max_new_tokens), min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
        no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, use_cache=True)


def policy_dir(out: Path, policy: Policy) -> Path:
    if policy.job is not None:
        return out / policy.key
    return out / "external" / policy.key.replace("/", "_").replace(":", "_")


def run(cfg: DictConfig) -> None:
    s = cfg.sample
    run_path = run_dir(cfg)
    policies = select(run_path, OmegaConf.to_container(s.policies) if OmegaConf.is_list(s.policies) else
                      str(s.policies), bool(s.checkpoints), s.get("reference"))
    # the prompts of the data the policies learnt from (the SFT model's), unless told otherwise
    datasource.inherit(cfg, next((p.job for p in policies if p.job is not None and p.job.stage == "sft"),
                                 next((p.job for p in policies if p.job is not None), None)))
    out = start_job(cfg, incremental=True)  # a complete job still takes policies added since
    # prompts are read with the first policy's tokenizer (token-length prefixes, chat templates)
    prompts = load_rows(cfg.dataset, "prompts", str(s.split), run_path, load_tokenizer(policies[0].path))
    if s.get("max_prompts"):
        prompts = prompts[: int(s.max_prompts)]
    device = torch.device("cuda" if str(cfg.hardware.device).startswith("cuda") and torch.cuda.is_available()
                          else "cpu")
    if cfg.hardware.get("num_threads"):
        torch.set_num_threads(int(cfg.hardware.num_threads))
    todo = [p for p in policies if not samples_complete(policy_dir(out, p))]
    if not todo and (out / "lineage.json").exists():
        console.print(f"{out} is already complete; skipping (its {len(policies)} policies are sampled)")
        return
    console.print(f"[bold]sample[/] {out}: {len(prompts)} prompts, {len(todo)} of {len(policies)} policies to do")
    for policy in todo:
        sample_policy(cfg, policy, prompts, policy_dir(out, policy), device)
    index = {p.key: {**describe(p), "samples": str(policy_dir(out, p) / "samples.jsonl")} for p in policies}
    write_json(out / "policies.json", index)
    write_lineage(out, cfg, {"policies": {p.key: p.path for p in policies}, "dataset": str(cfg.dataset.name)},
                  {"sampling": OmegaConf.to_container(s, resolve=True)})


def samples_complete(folder: Path) -> bool:
    """Whether a policy's samples.jsonl holds every row its meta.json promises; a damaged one is
    removed (with a line saying so) so that the policy is sampled again."""
    final, meta = folder / "samples.jsonl", folder / "meta.json"
    if not final.exists():
        return False
    try:
        read_samples(folder)
        return True
    except UserError as err:
        console.print(f"[yellow]{err}; sampling it again[/]")
        final.unlink()
        meta.unlink(missing_ok=True)
        return False


def sample_policy(cfg: DictConfig, policy: Policy, prompts: list[dict], folder: Path, device: torch.device) -> None:
    s = cfg.sample
    n = int(s.n_reference) if policy.is_reference and s.get("n_reference") else int(s.n)
    tokenizer = load_tokenizer(policy.path)
    dtype = str(cfg.model.dtype)
    model = freeze(load_causal_lm(policy.path, dtype)).to(device)
    reference = model if policy.is_reference else freeze(load_causal_lm(policy.reference, dtype)).to(device)
    gen = generation_config(s, tokenizer)
    vocab = model.get_output_embeddings().out_features
    encoded = encode_prompts(tokenizer, prompts, cfg.dataset)
    check_unknown([Encoded(ids, len(ids)) for _, ids in encoded], tokenizer, cfg.dataset, f"prompts for {policy.key}")
    order = sorted(encoded, key=lambda x: -len(x[1]))  # length-sorted batches: little padding
    writer = SampleWriter(folder, n)
    batch_size = int(s.batch_size)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    req = TokenRequest(temperature=float(s.temperature) if float(s.temperature) > 0 else 1.0,
                       kl=bool(s.stats), reverse_kl=bool(s.stats), entropy=bool(s.stats))
    bar = progress(tps="tok/s")
    tokens, t0 = 0, time.perf_counter()
    with bar:
        task = bar.add_task(f"sample {policy.key}", total=len(prompts), tps="-")
        bar.update(task, completed=len(writer.done))
        for b, batch in enumerate(batches):
            if all(pid in writer.done for pid, _ in batch):
                continue
            keep = bool(s.stats) and len(batch) * n * int(s.max_new_tokens) * vocab * 4 <= KEPT_LOGITS_BYTES
            rows, seqs, logits = generate_batch(model, tokenizer, batch, gen, n, int(s.seed) * 1_000_003 + b, device,
                                                keep_logits=keep)
            rows = [{"prompt": prompts[r["prompt_id"]]["prompt"], **r} for r in rows]
            if s.stats:
                _add_stats(rows, seqs, model, reference, tokenizer.pad_token_id, device, req, logits)
            rows = [r for r in rows if r["prompt_id"] not in writer.done]
            writer.write(rows)
            tokens += sum(r["n_tokens"] for r in rows)
            bar.update(task, completed=len(writer.done), tps=f"{tokens / (time.perf_counter() - t0):,.0f}")
    meta = {"policy": describe(policy), "n": n, "prompts": len(prompts), "tokens_per_s": tokens / max(
        time.perf_counter() - t0, 1e-9), "truncated_sampling": int(s.top_k) > 0 or float(s.top_p) < 1.0}
    writer.finish(meta)
    console.print(f"  {policy.key}: {len(prompts)} prompts × {n} samples ({meta['tokens_per_s']:,.0f} tok/s)")


def generate_batch(model, tokenizer, batch: list[tuple[int, tuple[int, ...]]], gen: GenerationConfig, n: int,
                   seed: int, device: torch.device, keep_logits: bool = False
                   ) -> tuple[list[dict], list[Encoded], list[Tensor] | None]:
    """n completions of each prompt of one left-padded batch, cut after the first EOS: the rows
    (prompt_id, sample, completion text and ids), the sequences for the statistics pass, and with
    `keep_logits` each row's raw logits at its completion tokens [len, V] (what the statistics
    pass would otherwise recompute with a second forward of the policy)."""
    torch.manual_seed(seed)  # per-batch seed: a restart regenerates identically
    left = {k: v.to(device) for k, v in collate_left([ids for _, ids in batch], tokenizer.pad_token_id).items()}
    with torch.no_grad():
        out = model.generate(**left, generation_config=gen, num_return_sequences=n, output_logits=keep_logits,
                             return_dict_in_generate=True)
    new = out.sequences[:, left["input_ids"].shape[1]:].cpu()
    steps = torch.stack(out.logits, dim=1) if keep_logits else None  # [B·n, T, V], before any sampling warper
    del out  # its per-step logits now live (once) in `steps`
    rows, seqs = [], []
    logits: list[Tensor] | None = [] if keep_logits else None
    for j in range(new.shape[0]):
        pid, ids_in = batch[j // n]
        ids = new[j].tolist()
        finished = tokenizer.eos_token_id in ids
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1] if finished else ids
        seqs.append(Encoded(tuple(ids_in) + tuple(ids), len(ids_in)))
        if logits is not None:
            logits.append(steps[j, :len(ids)])
        text_ids = ids[:-1] if finished else ids
        rows.append({"prompt_id": pid, "sample": j % n,
                     "completion": tokenizer.decode(text_ids, skip_special_tokens=True), "completion_ids": ids,
                     "n_tokens": len(ids), "finished": finished})
    return rows, seqs, logits


@torch.no_grad()
def _add_stats(rows: list[dict], seqs: list[Encoded], model, reference, pad: int, device, req: TokenRequest,
               policy_logits: list[Tensor] | None = None) -> None:
    """Sequence log-probs under policy and reference, exact token-level KLs and entropy. The
    policy's side comes from its logits kept at generation when given, else from a forward."""
    has_tokens = [i for i, s in enumerate(seqs) if len(s.ids) > s.prompt_len]
    for i in range(len(rows)):
        rows[i].update({"logp_policy": 0.0, "logp_ref": 0.0, "kl_exact": 0.0, "kl_forward": 0.0, "entropy": 0.0})
    if not has_tokens:
        return
    batch = {k: v.to(device) for k, v in collate([seqs[i] for i in has_tokens], pad).items()}
    is_reference = reference is model  # the reference itself: its log-ratio and KLs are exactly zero
    ref = None if is_reference else reference_hidden(reference, **batch)
    if policy_logits is None:
        hidden, head = final_hidden(model, batch["input_ids"], batch["attention_mask"]), Head.of(model)
    else:
        hidden = torch.cat([policy_logits[i] for i in has_tokens]).to(device)
        head = Head.identity(hidden.shape[-1])
    want = TokenRequest(temperature=req.temperature, entropy=req.entropy) if is_reference else req
    stats = stats_from_hidden(hidden, head, batch["attention_mask"], batch["labels"], reference=ref, req=want,
                              recompute=False)
    if is_reference:
        stats.ref_logps, stats.reverse_kl, stats.kl = stats.logps, torch.zeros_like(stats.logps), \
            torch.zeros_like(stats.logps)
    for j, i in enumerate(has_tokens):
        rows[i].update({"logp_policy": float(stats.logps[j]), "logp_ref": float(stats.ref_logps[j]),
                        "kl_exact": float(stats.reverse_kl[j]), "kl_forward": float(stats.kl[j]),
                        "entropy": float(stats.entropy[j])})

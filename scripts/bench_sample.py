"""Tokens per second of prefkit's `sample` generation against one-prompt-at-a-time `generate`,
in one process, interleaved.

    .venv/bin/python scripts/bench_sample.py                       # tiny and ~100M, 32 prompts
    .venv/bin/python scripts/bench_sample.py --sizes tiny --repeats 5

Both sides use the GenerationConfig that prefkit.stages.sample.generation_config builds from
conf/sample.yaml's settings (temperature 1.0, top_p 1.0, top_k 0 = off, max_new_tokens 48,
KV cache), one completion per prompt (--n), the same model weights, and count the generated
tokens the same way: up to and including the first EOS (the sample stage's rule).

  prefkit batched   the sample stage's loop (prefkit/stages/sample.py::sample_policy without the
                    file writing): prompts encoded by the stage's rule (prompt_ids), sorted by
                    length, batches of sample.batch_size (64: all 32 prompts in one batch), and the
                    stage's generate_batch (collate_left, per-batch seed, generate, cut at EOS, decode).
  + stats pass      the same plus the stage's per-sample statistics (prefkit.stages.sample._add_stats:
                    log-probs, exact KLs and entropy from the policy's logits kept at generation
                    and one teacher-forced pass of the reference); the stage runs it by default
                    (sample.stats=true).
  one at a time     the same generate_batch on each prompt alone (batch 1).

Prompts: for tiny, the embedded task's eval prompts (2-4 words after BOS); for 100m, random words
of 8-32 tokens after BOS (seeded). The models are untrained (random init; the tiny vocabulary makes
EOS likelier, so some rows finish early and batched generation carries them as padding, which the
token count does not reward). The ratio is the median tokens/s of each side over the repeats.
With --device cuda and vLLM importable, vLLM's LLM.generate (same sampling settings) is timed too.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc
import torch

TARGET = 4.0
DEFAULTS = {"tiny": {"repeats": 3}, "100m": {"repeats": 2}, "1m": {"repeats": 3}, "410m": {"repeats": 2},
            "1.4b": {"repeats": 2}}


def sample_settings(args):
    from omegaconf import OmegaConf

    return OmegaConf.create({"temperature": args.temperature, "top_p": 1.0, "top_k": 0,
                             "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": 0,
                             "n": args.n})


def prompts_for(size: str, tok, n: int) -> list[tuple[int, tuple[int, ...]]]:
    """(prompt id, prompt token ids), encoded by the sample stage's own rule."""
    from omegaconf import OmegaConf

    from prefkit.data import encode_prompts

    if size == "tiny":  # the embedded task's own prompts
        from prefkit import synthetic

        texts = [r["prompt"] for r in synthetic.prompts(n, 0, "eval")]
    else:
        g = torch.Generator().manual_seed(3)
        texts = []
        for _ in range(n):
            k = int(torch.randint(8, 33, (1,), generator=g))
            ids = torch.randint(4, len(tok), (k,), generator=g).tolist()
            texts.append(" ".join(tok.convert_ids_to_tokens(ids)))
    return encode_prompts(tok, [{"prompt": t} for t in texts], OmegaConf.create({"max_prompt_length": 1024,
                                                                                 "max_length": 1025}))


def prefkit_batched(model, reference, tok, prompts, s, gen, device, stats: bool) -> tuple[int, float, float]:
    """sample_policy's loop without the file writing: (tokens, generate seconds, stats seconds)."""
    from prefkit.stages.sample import _add_stats, generate_batch
    from prefkit.tokenstats import TokenRequest

    order = sorted(prompts, key=lambda x: -len(x[1]))
    batches = [order[i:i + int(s.batch_size)] for i in range(0, len(order), int(s.batch_size))]
    req = TokenRequest(temperature=float(s.temperature) if float(s.temperature) > 0 else 1.0,
                       kl=True, reverse_kl=True, entropy=True)
    tokens, t_gen, t_stats = 0, 0.0, 0.0
    for b, batch in enumerate(batches):
        t0 = time.perf_counter()
        rows, seqs, logits = generate_batch(model, tok, batch, gen, int(s.n), int(s.seed) * 1_000_003 + b, device,
                                            keep_logits=stats)  # the stage keeps them for its statistics pass
        bc.sync(device)
        t1 = time.perf_counter()
        t_gen += t1 - t0
        if stats:
            _add_stats(rows, seqs, model, reference, tok.pad_token_id, device, req, logits)
            bc.sync(device)
            t_stats += time.perf_counter() - t1
        tokens += sum(r["n_tokens"] for r in rows)
    return tokens, t_gen, t_stats


def one_at_a_time(model, tok, prompts, s, gen, device) -> tuple[int, float]:
    """The same generate call, cut and decode, on each prompt alone."""
    from prefkit.stages.sample import generate_batch

    tokens = 0
    t0 = time.perf_counter()
    for pid, ids in prompts:
        rows, _, _ = generate_batch(model, tok, [(pid, ids)], gen, int(s.n), int(s.seed) * 1_000_003 + pid, device)
        tokens += sum(r["n_tokens"] for r in rows)
    bc.sync(device)
    return tokens, time.perf_counter() - t0


def vllm_tps(path, prompts, s) -> float | None:
    try:
        from vllm import LLM, SamplingParams
    except Exception:
        return None
    llm = LLM(model=str(path), dtype="float32", seed=0)
    params = SamplingParams(n=int(s.n), temperature=float(s.temperature), top_p=1.0, top_k=-1,
                            max_tokens=int(s.max_new_tokens))
    inputs = [{"prompt_token_ids": list(ids)} for _, ids in prompts]
    llm.generate(inputs, params)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params)
    secs = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm
    return tokens / secs


def bench_size(size: str, args) -> dict:
    from prefkit.models import freeze, load_tokenizer
    from prefkit.stages.sample import generation_config

    repeats = args.repeats if args.repeats is not None else DEFAULTS[size]["repeats"]
    device = torch.device(args.device)
    path = bc.model_dir(size, args.cache)
    tok = load_tokenizer(str(path))
    model = freeze(bc.load(path)).to(device)
    reference = freeze(bc.load(path)).to(device)  # the policy's reference: a second model, as for any policy
    s = sample_settings(args)
    gen = generation_config(s, tok)
    prompts = prompts_for(size, tok, args.prompts)
    lens = [len(p) for _, p in prompts]
    print(f"{size}: {bc.fmt_params(bc.n_params(model))} parameters; {len(prompts)} prompts of {min(lens)}-{max(lens)} "
          f"tokens; n={s.n}; max_new_tokens {s.max_new_tokens}; batch_size {s.batch_size}; repeats {repeats}",
          flush=True)
    # warm-up (allocator, first-call paths), not timed
    prefkit_batched(model, reference, tok, prompts[:4], s, gen, device, stats=True)
    one_at_a_time(model, tok, prompts[:1], s, gen, device)
    res = {"batched": [], "batched+stats": [], "one-at-a-time": [], "tokens": {}, "secs": {}}

    def run(name: str, r: int) -> None:
        gc.collect()
        if name == "batched":
            tokens, t_gen, t_stats = prefkit_batched(model, reference, tok, prompts, s, gen, device, stats=True)
            res["batched"].append(tokens / t_gen)
            res["batched+stats"].append(tokens / (t_gen + t_stats))
            res["tokens"].setdefault("batched", []).append(tokens)
            res["secs"].setdefault("batched", []).append(t_gen)
            res["secs"].setdefault("batched+stats", []).append(t_gen + t_stats)
            print(f"  [{size}] repeat {r + 1}/{repeats} batched: {tokens} tokens, generate {t_gen:.2f} s, "
                  f"stats {t_stats:.2f} s", flush=True)
        else:
            tokens, secs = one_at_a_time(model, tok, prompts, s, gen, device)
            res["one-at-a-time"].append(tokens / secs)
            res["tokens"].setdefault("one-at-a-time", []).append(tokens)
            res["secs"].setdefault("one-at-a-time", []).append(secs)
            print(f"  [{size}] repeat {r + 1}/{repeats} one at a time: {tokens} tokens, {secs:.2f} s", flush=True)

    bc.interleave(["batched", "one-at-a-time"], repeats, run)
    res["vllm"] = vllm_tps(path, prompts, s) if device.type == "cuda" and not args.no_vllm else None
    res["size"], res["params"] = size, bc.n_params(model)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.common_args(parser)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: tiny 3, 100m 2)")
    parser.add_argument("--steps", type=int, default=None, help="alias of --max-new-tokens (tokens per completion)")
    parser.add_argument("--warmup", type=int, default=1, help="(a short untimed warm-up always runs first)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=1, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="the sample stage's prompts per generate call")
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    if args.steps:
        args.max_new_tokens = args.steps
    if args.dtype != "fp32":
        print("note: generation runs in the models' float32 weights; --dtype is ignored here")
    wall = bc.Stopwatch()
    bc.set_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prefkit.console import quiet_libraries

    quiet_libraries()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tempfile.tempdir = tempfile.gettempdir()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}", flush=True)
    results = [bench_size(size, args) for size in args.sizes.split(",") if size]
    rows, parts = [], []
    for res in results:
        label = f"{res['size']} ({bc.fmt_params(res['params'])})"
        base = bc.median(res["one-at-a-time"])
        for name in ("batched", "batched+stats", "one-at-a-time"):
            tps = bc.median(res[name])
            key = "batched" if name == "batched+stats" else name
            rows.append([label, {"batched": "prefkit batched (generate only)",
                                 "batched+stats": "prefkit batched + stats pass",
                                 "one-at-a-time": "generate, one prompt at a time"}[name],
                         f"{tps:,.0f}", f"{min(res[name]):,.0f}", f"{max(res[name]):,.0f}",
                         f"{bc.median(res['tokens'][key]):.0f}", f"{bc.median(res['secs'][name]):.2f}",
                         f"{tps / base:.2f}"])
        if res["vllm"] is not None:
            rows.append([label, "vLLM LLM.generate", f"{res['vllm']:,.0f}", "", "", "", "",
                         f"{res['vllm'] / base:.2f}"])
        r1 = bc.median(res["batched"]) / base
        r2 = bc.median(res["batched+stats"]) / base
        parts.append(f"{res['size']} generate-only={r1:.2f} (target >={TARGET:g} {bc.verdict(r1 >= TARGET)}) "
                     f"with-stats={r2:.2f} (target >={TARGET:g} {bc.verdict(r2 >= TARGET)})"
                     + (f" vLLM/prefkit={res['vllm'] / bc.median(res['batched']):.2f}" if res["vllm"] else ""))
    bc.print_table("Sampling throughput, generated tokens/s (median over interleaved repeats)",
                   ["size", "implementation", "tokens/s", "min", "max", "tokens", "seconds", "× one-at-a-time"],
                   rows)
    if args.device != "cuda":
        print("vLLM: not run (no GPU in this run; it needs --device cuda and an importable vllm)")
    print(f"wall time {wall():.0f} s")
    print("RATIOS: prefkit-batched/one-at-a-time " + "; ".join(parts))


if __name__ == "__main__":
    main()

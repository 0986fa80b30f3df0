"""Seconds per DPO optimizer step: prefkit's align step against TRL 1.16's DPOTrainer and against
the bare compute, in one process, interleaved.

    .venv/bin/python scripts/bench_align.py                       # tiny and ~100M, defaults below
    .venv/bin/python scripts/bench_align.py --sizes tiny --steps 20 --repeats 5

Every implementation trains the same model (same initial weights, policy = reference at the
start as after SFT), on the same 16 pairs (32 sequences of 64 tokens: BOS + 31 prompt words,
31 response words + EOS, no padding), with torch.optim.AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8,
no weight decay), a constant schedule, gradient clipping at 1.0, and the same precision:

  bare            no framework: policy backbone forward, LM head and a token-level NLL (sum) over
                  the response positions only (the 32 × 32 positions whose next token is a response
                  token; the tight limit, which is all DPO needs), backward, clip, AdamW step; plus
                  the reference's no-grad backbone forward and LM head at the same positions.
  prefkit         prefkit.trainer.Trainer.fit with the align stage's own step
                  (prefkit.stages.align.AlignStep: collate → reference_hidden → StatsLM →
                  Groups → dpo objective), online reference.
  prefkit-cache   the same with scalar reference log-probs precomputed by prefkit/refcache.py
                  (align's reference.cache=auto path); the one-off precompute is timed apart.
  trl             trl.DPOTrainer.train, loss_type sigmoid, batch 16 pairs, grad accumulation 1,
                  report_to none, no eval, no checkpoints, no gradient checkpointing (TRL's default
                  is on), fp32 (TRL's default is bf16), optim adamw_torch (TRL's default is the
                  fused AdamW; --trl-optim keeps it), everything else TRL's defaults.
  trl-precompute  the same with precompute_ref_log_probs=True; the precompute is timed apart.
  bare-full       (--bare-full) like bare but through the HF models' own forward: full logits at
                  every position and HF's shifted cross-entropy; for information.

Reported beside the times: tokens/s (every token is real), the peak memory of each run over what
was resident before it, and on a GPU the model FLOPs utilisation (MFU) against its dense bf16 peak
(PaLM's accounting: 6N + 12LdS FLOPs per trained token, a third of that per reference token).

A step's time is the wall-clock interval between the ends of two consecutive optimizer steps of
each implementation's own loop (so its per-step bookkeeping counts); the first `warmup` steps of
every run are dropped. Each repeat runs every implementation once, in rotated order; a time is
the median over all measured steps of all repeats. Ratios are taken within this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc
import torch
import torch.nn.functional as F

BETA = 0.1
LR = 1e-6
DEFAULTS = {"tiny": {"warmup": 2, "steps": 5, "repeats": 4}, "100m": {"warmup": 1, "steps": 1, "repeats": 2},
            "1m": {"warmup": 2, "steps": 5, "repeats": 4}, "410m": {"warmup": 2, "steps": 5, "repeats": 2},
            "1.4b": {"warmup": 2, "steps": 3, "repeats": 2}}
IMPLS = ["bare", "prefkit", "trl", "prefkit-cache", "trl-precompute"]


# --- data -----------------------------------------------------------------------------------------

def make_pairs(tok, n_pairs: int, prompt_words: int, response_words: int, seed: int) -> list[dict]:
    """Random word ids (specials excluded; with a byte-level BPE, the whole-word tokens), deterministic;
    text for TRL, Encoded for prefkit."""
    from prefkit.data import Encoded

    g = torch.Generator().manual_seed(seed)
    specials = {tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}
    word_level = type(tok.backend_tokenizer.model).__name__ == "WordLevel"

    def whole_word(i: int) -> bool:  # a byte-level BPE token " word" that encodes back to itself alone
        text = tok.decode([i])
        return text.startswith(" ") and text[1:].isalpha() and tok(text, add_special_tokens=False).input_ids == [i]

    words = torch.tensor([i for i in range(len(tok)) if i not in specials and (word_level or whole_word(i))])
    pairs = []
    for _ in range(n_pairs):
        ids = [words[torch.randint(len(words), (n,), generator=g)].tolist()
               for n in (prompt_words, response_words, response_words)]
        prompt, chosen, rejected = ids
        # word-level: "w1 w2" and " w3 w4"; byte-level BPE: every token carries its own leading space
        text = [" " * (word_level and k > 0) + (" ".join(tok.convert_ids_to_tokens(x)) if word_level else tok.decode(x))
                for k, x in enumerate(ids)]
        enc = [Encoded(tuple([tok.bos_token_id, *prompt, *resp, tok.eos_token_id]), 1 + len(prompt))
               for resp in (chosen, rejected)]
        pairs.append({"prompt": text[0], "chosen": text[1], "rejected": text[2], "encoded": enc,
                      "ids": ids})
    return pairs


# --- bare -----------------------------------------------------------------------------------------

class Bare:
    """The compute limit: what a DPO step must do, written directly against the HF modules."""

    def __init__(self, policy, reference, batch, device, autocast, full: bool = False):
        self.policy, self.reference, self.device, self.autocast, self.full = policy, reference, device, autocast, full
        self.batch = {k: v.to(device) for k, v in batch.items()}
        shifted = self.batch["labels"][:, 1:]
        self.rows, self.cols = (shifted != -100).nonzero(as_tuple=True)
        self.targets = shifted[self.rows, self.cols]

    def run(self, n_steps: int) -> list[float]:
        opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)
        self.policy.train()
        b = self.batch
        stamps = []
        for _ in range(n_steps):
            with self.autocast():
                if self.full:
                    with torch.no_grad():
                        self.reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                       use_cache=False).logits.float().log_softmax(-1)
                    loss = self.policy(**b, use_cache=False).loss
                else:
                    with torch.no_grad():
                        h = self.reference.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                      use_cache=False).last_hidden_state[self.rows, self.cols]
                        F.cross_entropy(self.reference.get_output_embeddings()(h).float(), self.targets)
                    h = self.policy.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                               use_cache=False).last_hidden_state[self.rows, self.cols]
                    logits = self.policy.get_output_embeddings()(h).float()
                    loss = F.cross_entropy(logits, self.targets, reduction="sum")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bc.sync(self.device)
            stamps.append(time.perf_counter())
        return stamps


# --- prefkit --------------------------------------------------------------------------------------

def prefkit_cfg(n_steps: int, args, threads: int):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "stage": "align", "seed": 0, "run": {"name": "bench", "root": "/tmp"},
        "logger": {"every": 10, "wandb": False, "project": "prefkit"},
        "train": {"optimizer": "adamw", "lr": LR, "weight_decay": 0.0, "betas": [0.9, 0.999], "scheduler": "constant",
                  "warmup_steps": 0, "epochs": 1, "max_steps": n_steps, "batch_size": args.pairs,
                  "max_grad_norm": 1.0, "eval_every": 0, "eval_at_start": False, "save_every": 0,
                  "keep_checkpoints": 1, "max_bad_steps": 5},
        "hardware": {"device": args.device, "precision": args.dtype, "micro_batch_size": args.pairs,
                     "gradient_checkpointing": False, "num_threads": threads, "logprob_chunk": "auto",
                     "recompute_lm_head": "auto"},
    })


class Prefkit:
    """prefkit's align step: Trainer + the align stage's AlignStep."""

    def __init__(self, policy, reference, groups, pad, device, args, accelerator, out: Path, cache=None):
        from prefkit.modules import StatsLM
        from prefkit.objectives import build

        self.module = StatsLM(policy)
        self.reference, self.groups, self.pad, self.device = reference, groups, pad, device
        self.args, self.accelerator, self.out, self.cache = args, accelerator, out, cache
        self.objective, _ = build({"name": "dpo", "beta": BETA})

    def run(self, n_steps: int) -> list[float]:
        from prefkit.reference import CachedLogps, Online
        from prefkit.stages.align import AlignStep
        from prefkit.trainer import Trainer

        cfg = prefkit_cfg(n_steps, self.args, self.args.threads)
        # align's online or cached reference, recompute_lm_head=auto
        reference = Online(self.reference) if self.cache is None else CachedLogps({"train": self.cache})
        step = AlignStep(self.objective, {"train": self.groups}, self.pad, self.device, None,
                         self.objective.needs.tokens.needs_reference_logits, reference)
        stamps: list[float] = []

        def stamp(_step: int) -> None:  # the trainer's step callback: the end of each optimizer step
            bc.sync(self.device)
            stamps.append(time.perf_counter())

        trainer = Trainer(cfg, self.out, self.module, self.accelerator, len(self.groups),
                          lambda model, indices, training: step(model, "train", indices, training),
                          stateful={"objective": self.objective}, on_step=stamp)
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the "align <dir>: N steps" line
            trainer.fit()
        self.accelerator.free_memory()  # drop accelerate's references to this run's optimizer
        return stamps


def prefkit_cache(reference, groups, pad, device) -> tuple[torch.Tensor, float]:
    """align's one-off reference pass (refcache.compute, batch = micro_batch_size × 4 sequences)."""
    from prefkit import refcache

    t0 = time.perf_counter()
    cache = refcache.compute(reference, groups, pad, device, 16 * 4, 1.0, None)
    bc.sync(device)
    return cache, time.perf_counter() - t0


# --- TRL ------------------------------------------------------------------------------------------

class TRL:
    def __init__(self, policy, reference, tok, pairs, args, out: Path, precompute: bool, max_length: int | None = None):
        import datasets
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        self.stamps: list[float] = []
        device = args.device
        stamps = self.stamps

        class Stamp(TrainerCallback):
            def on_step_end(self, *a, **k):
                bc.sync(device)
                stamps.append(time.perf_counter())

        config = dict(output_dir=str(out), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
                      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=1,
                      beta=BETA, loss_type=["sigmoid"], report_to="none", use_cpu=args.device == "cpu",
                      save_strategy="no", eval_strategy="no", bf16=args.dtype == "bf16", fp16=False,
                      gradient_checkpointing=False, precompute_ref_log_probs=precompute, seed=0,
                      dataloader_num_workers=0)
        if args.trl_optim != "default":
            config["optim"] = args.trl_optim
        if max_length is not None:
            config["max_length"] = max_length
        data = datasets.Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
        self.precompute_s = 0.0
        original = DPOTrainer._precompute_ref_logps

        def timed_precompute(trainer_self, *a, **k):
            t0 = time.perf_counter()
            out_ = original(trainer_self, *a, **k)
            self.precompute_s += time.perf_counter() - t0
            return out_

        DPOTrainer._precompute_ref_logps = timed_precompute
        try:
            self.trainer = DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(**config),
                                      train_dataset=data, processing_class=tok, callbacks=[Stamp()])
        finally:
            DPOTrainer._precompute_ref_logps = original
        # TRL must see exactly the token ids prefkit sees.
        for i, p in enumerate(pairs):
            row = self.trainer.train_dataset[i]
            enc_c, enc_r = p["encoded"]
            assert list(row["prompt_ids"]) + list(row["chosen_ids"]) == list(enc_c.ids), (
                "TRL tokenized differently", row["prompt_ids"], row["chosen_ids"], enc_c.ids)
            assert list(row["prompt_ids"]) + list(row["rejected_ids"]) == list(enc_r.ids), "TRL tokenized differently"
            assert len(row["prompt_ids"]) == enc_c.prompt_len

    def run(self, n_steps: int) -> list[float]:
        t = self.trainer
        t.args.max_steps = n_steps
        t.optimizer, t.lr_scheduler, t._created_lr_scheduler = None, None, False  # a fresh run, like the others
        self.stamps.clear()
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
            t.train()  # (tqdm and the final metrics line)
        t.accelerator.free_memory()
        stamps = list(self.stamps)
        return stamps


# --- driver ---------------------------------------------------------------------------------------

def bench_size(size: str, args, accelerator) -> dict:
    from prefkit.models import load_tokenizer

    d = DEFAULTS[size]
    warmup = args.warmup if args.warmup is not None else d["warmup"]
    steps = args.steps if args.steps is not None else d["steps"]
    repeats = args.repeats if args.repeats is not None else d["repeats"]
    warmup = max(1, warmup)
    device = torch.device(args.device)
    path = bc.model_dir(size, args.cache)
    tok = load_tokenizer(str(path))
    prompt_words = args.prompt_len - 1
    response_words = args.seq_len - args.prompt_len - 1
    pairs = make_pairs(tok, args.pairs, prompt_words, response_words, seed=1)
    groups = [p["encoded"] for p in pairs]

    reference = bc.load(path)
    from prefkit.models import freeze

    freeze(reference).to(device)
    init_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    n = bc.n_params(reference)
    impls = [i for i in args.impls.split(",") if i]
    if args.bare_full and "bare-full" not in impls:
        impls.append("bare-full")

    def policy():
        return bc.load(path).to(device)

    tmp = Path(tempfile.mkdtemp(prefix=f"bench_align_{size}_"))
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    from prefkit.data import collate

    flat = [seq for g in groups for seq in g]
    runners, extra = {}, {}
    policies = {}
    for name in impls:
        p = policy()
        policies[name] = p
        if name in ("bare", "bare-full"):
            runners[name] = Bare(p, reference, collate(flat, tok.pad_token_id), device, autocast,
                                 full=name == "bare-full")
        elif name == "prefkit":
            runners[name] = Prefkit(p, reference, groups, tok.pad_token_id, device, args, accelerator, tmp / name)
        elif name == "prefkit-cache":
            cache, secs = prefkit_cache(reference, groups, tok.pad_token_id, device)
            extra["prefkit-cache precompute (s)"] = secs
            runners[name] = Prefkit(p, reference, groups, tok.pad_token_id, device, args, accelerator, tmp / name,
                                    cache=cache)
        elif name in ("trl", "trl-precompute"):
            runners[name] = TRL(p, reference, tok, pairs, args, tmp / name, precompute=name == "trl-precompute")
            if name == "trl-precompute":
                extra["trl-precompute precompute (s)"] = runners[name].precompute_s
        else:
            raise SystemExit(f"unknown implementation {name}; valid: {', '.join([*IMPLS, 'bare-full'])}")

    times: dict[str, list[float]] = {name: [] for name in impls}
    peak_mib: dict[str, float] = dict.fromkeys(impls, 0.0)

    def run(name: str, r: int) -> None:
        with torch.no_grad():
            for k, v in policies[name].state_dict().items():
                v.copy_(init_state[k])
        policies[name].zero_grad(set_to_none=True)
        gc.collect()
        with bc.PeakMemory(device) as mem:
            stamps = runners[name].run(warmup + steps)
        peak_mib[name] = max(peak_mib[name], mem.mib)
        assert len(stamps) == warmup + steps, (name, len(stamps))
        times[name].extend(bc.intervals(stamps, warmup))
        print(f"  [{size}] repeat {r + 1}/{repeats} {name:15s} "
              f"{' '.join(f'{t:.3f}' for t in bc.intervals(stamps, warmup))} s", flush=True)

    print(f"{size}: {bc.fmt_params(n)} parameters; {args.pairs} pairs × {args.seq_len} tokens "
          f"(prompt {args.prompt_len} incl. BOS, response {args.seq_len - args.prompt_len} incl. EOS); "
          f"warmup {warmup}, steps {steps}, repeats {repeats}", flush=True)
    bc.interleave(impls, repeats, run)
    med = {name: bc.median(ts) for name, ts in times.items()}
    # every token is real (no padding); model FLOPs per step: the policy's forward and backward, plus
    # the reference's forward where the step runs it (not with precomputed reference log-probs)
    tokens = 2 * args.pairs * args.seq_len
    train = bc.model_flops_per_token(reference.config, n, args.seq_len) * tokens
    flops = {name: train * (1 if name in ("prefkit-cache", "trl-precompute") else 4 / 3) for name in impls}
    return {"size": size, "params": n, "times": times, "median": med, "extra": extra, "tokens": tokens,
            "flops": flops, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.common_args(parser)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default: tiny 5, 100m 1)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps per run, >= 1 (default: tiny 2, "
                                                                  "100m 1)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: tiny 4, 100m 2)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence, prompt + response")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (BOS included)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--bare-full", action="store_true", help="also time the bare step with full HF logits")
    parser.add_argument("--trl-optim", default="adamw_torch",
                        help="TRL's optim (adamw_torch = torch.optim.AdamW like prefkit; 'default' = TRL's own)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: looked up from the GPU's name)")
    args = parser.parse_args()
    wall = bc.Stopwatch()
    accelerator = bc.start(args)
    import trl

    print(f"torch {torch.__version__}, trl {trl.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, {args.dtype}", flush=True)
    results = [bench_size(size, args, accelerator) for size in args.sizes.split(",") if size]

    peak = bc.bf16_peak(args.device, args.peak_tflops)
    rows = []
    for res in results:
        med = res["median"]
        base = med.get("bare", float("nan"))
        for name, t in med.items():
            ts = res["times"][name]
            mfu = f"{res['flops'][name] / t / peak:.1%}" if peak else "n/a"
            rows.append([f"{res['size']} ({bc.fmt_params(res['params'])})", name, f"{t:.4f}",
                         f"{min(ts):.4f}", f"{max(ts):.4f}", len(ts), f"{t / base:.2f}", f"{res['tokens'] / t:.0f}",
                         f"{res['peak_mib'][name]:.0f}", mfu])
        for k, v in res["extra"].items():
            rows.append([f"{res['size']} ({bc.fmt_params(res['params'])})", k, f"{v:.3f}", "", "", 1, "", "", "", ""])
    bc.print_table("DPO seconds per optimizer step (median over interleaved repeats)",
                   ["size", "implementation", "median s", "min s", "max s", "n", "/ bare", "tok/s", "peak MiB",
                    "MFU"], rows)
    print(f"MFU: model FLOPs (6N + 12LdS per trained token, a third of it per reference token) per second over "
          f"{'the bf16 peak, ' + format(peak / 1e12, '.0f') + ' TFLOP/s' if peak else 'no known peak (CPU)'}; "
          "peak MiB: the largest rise over what was resident before a run")

    def ratio(res, a, b):
        m = res["median"]
        return m[a] / m[b] if a in m and b in m else float("nan")

    parts = {"prefkit/bare": [], "TRL/prefkit": [], "TRL-precompute/prefkit-cache": [], "TRL/bare": []}
    for res in results:
        s = res["size"]
        r = ratio(res, "prefkit", "bare")
        parts["prefkit/bare"].append(f"{s}={r:.2f} (target <=1.10 {bc.verdict(r <= 1.10)})")
        r = ratio(res, "trl", "prefkit")
        small = s != "100m"
        ok = r >= 1.5 if small else r > 1.0
        parts["TRL/prefkit"].append(f"{s}={r:.2f} (target {'>=1.5' if small else '>1'} {bc.verdict(ok)})")
        r = ratio(res, "trl-precompute", "prefkit-cache")
        parts["TRL-precompute/prefkit-cache"].append(f"{s}={r:.2f} (target >1 {bc.verdict(r > 1.0)})")
        r = ratio(res, "trl", "bare")
        parts["TRL/bare"].append(f"{s}={r:.2f} (info)")
        if "prefkit" in res["peak_mib"] and "trl" in res["peak_mib"]:
            r = res["peak_mib"]["prefkit"] / res["peak_mib"]["trl"]
            parts.setdefault("peak prefkit/TRL", []).append(f"{s}={r:.2f} (target <=1 {bc.verdict(r <= 1.0)})")
        if peak and "prefkit" in res["median"]:
            mfu = res["flops"]["prefkit"] / res["median"]["prefkit"] / peak
            parts.setdefault("MFU prefkit", []).append(f"{s}={mfu:.1%} (info)")
    print(f"wall time {wall():.0f} s")
    print("RATIOS: " + "; ".join(f"{k} " + " ".join(v) for k, v in parts.items()))


if __name__ == "__main__":
    main()

"""Seconds per align step on real-shaped data: padded, packed and length-grouped prefkit, TRL 1.16's
DPOTrainer, and the real-token limit, in one process, interleaved.

    .venv/bin/python scripts/bench_packing.py                         # 25m and 100m, defaults below
    .venv/bin/python scripts/bench_packing.py --sizes 25m --steps 6 --repeats 3

Data: the 2,312 Anthropic HH harmless-base test pairs of tests/fixtures/hh-rlhf (prompt up to the last
"\\n\\nAssistant:", dataset=hh's rule), those that fit dataset=hh's limits (512 tokens, prompt ≤ 256)
without truncation, so that TRL sees exactly prefkit's token ids (checked). A byte-level BPE tokenizer
(vocabulary 32,000 asked; GPT-NeoX's <|endoftext|> as BOS/EOS/pad) is trained on those texts, and
random-init GPT-NeoX models are built from it: 25m (hidden 320, 8 layers) and 100m (hidden 640,
14 layers), untied embeddings. (The 2,303 pairs hold too little text for 32,000 merges: the
vocabulary comes out near 24,000.) Batches are 16 pairs drawn at random (seeded), as training draws them.

Implementations (the same initial weights, policy = reference, AdamW lr 1e-6, clip 1.0, constant
schedule, fp32, online reference: nothing precomputed):

  limit-seq       the real-token limit, one way: each sequence alone, unpadded (policy forward with
                  gradient, the reference without; LM head at response positions only), the DPO loss
                  over the batch, one backward, clip, AdamW step: the real tokens and nothing else.
  limit-packed    the other way: the same, with the batch packed into rows no longer than its longest
                  sequence (first-fit decreasing, positions restarting), written directly against the
                  HF modules, no bookkeeping. The limit is the faster of the two.
  <obj>-padded    prefkit.trainer.Trainer + the align stage's AlignStep, hardware.packing=false.
  <obj>-packed    the same, hardware.packing=true (the default).
  dpo-grouped     padded, train.group_by_length=true: its batches come from one 50-batch window
                  grouped as the trainer groups them (so they hold different pairs: compare tokens/s).
  trl             trl.DPOTrainer (loss sigmoid, max_length 512, fp32, adamw_torch, no gradient
                  checkpointing, no eval or saving, everything else TRL's defaults) on the same
                  batches in the same order (a sequential sampler).

<obj> is each of --objectives (dpo, tdpo2, edpo). Every run is one pass over its own batches; the
first step is dropped; s/step is the mean of the other steps, tokens/s their real tokens (prompt and
response, no padding) over their time. Each repeat runs every implementation once, in rotated
order; figures are medians over repeats. Peak memory: the process's resident-set high-water mark
during the run minus its resident set before (Linux /proc, after trimming the allocator), or the
CUDA allocator's peak on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_align as ba
import bench_common as bc
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "tests" / "fixtures" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
VOCAB = 32000
MAX_LENGTH, MAX_PROMPT = 512, 256
SIZES = {"25m": {"hidden_size": 320, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 1280},
         "100m": {"hidden_size": 640, "num_hidden_layers": 14, "num_attention_heads": 10,
                  "intermediate_size": 2560}}
DEFAULTS = {"25m": {"steps": 4, "repeats": 2}, "100m": {"steps": 2, "repeats": 1}}
OBJECTIVES = {"dpo": {"name": "dpo", "beta": 0.1}, "tdpo2": {"name": "tdpo2", "beta": 0.1, "alpha": 0.5},
              "edpo": {"name": "edpo", "beta": 0.01, "epsilon": 0.01}}


# --- data, tokenizer, models ----------------------------------------------------------------------

def hh_rows() -> list[dict]:
    from prefkit.datasets.hh import split_hh
    from prefkit.datasets.reader import Malformed

    rows = []
    with gzip.open(HH, "rt") as lines:
        raws = [json.loads(line) for line in lines]
    for raw in raws:
        try:
            (prompt, chosen), (prompt_r, rejected) = split_hh(raw["chosen"], "c"), split_hh(raw["rejected"], "r")
        except Malformed:
            continue
        if prompt == prompt_r and chosen.strip() and rejected.strip():
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def tokenizer(rows: list[dict], cache: Path):
    from transformers import PreTrainedTokenizerFast

    out = cache / "bench" / f"hh-bpe-{VOCAB}"
    if not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
        fast.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)


def model_dir(size: str, tok, cache: Path) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    arch = SIZES[size]
    out = cache / "bench" / f"hh-{len(tok)}-{arch['hidden_size']}x{arch['num_hidden_layers']}"
    if not (out / "config.json").exists():
        config = GPTNeoXConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                               max_position_embeddings=MAX_LENGTH, **arch)
        torch.manual_seed(0)
        GPTNeoXForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def encoded_pairs(rows: list[dict], tok) -> list[dict]:
    """prefkit's encoding of each pair (dataset=hh's rules); pairs it would truncate are left out."""
    from prefkit.data import encode

    pairs = []
    for r in rows:
        enc = [encode(tok, r["prompt"], c, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
               for c in (r["chosen"], r["rejected"])]
        whole = [len(tok(r["prompt"])["input_ids"]) + len(tok(c, add_special_tokens=False)["input_ids"]) + 1
                 for c in (r["chosen"], r["rejected"])]
        if all(len(e.ids) == w for e, w in zip(enc, whole, strict=True)):
            pairs.append({**r, "encoded": enc})
    return pairs


def real_tokens(groups) -> int:
    return sum(len(s.ids) for g in groups for s in g)


def padding_fraction(batches, layout: str) -> float:
    """Share of the tokens a layout runs that are not real: padded to the batch's longest sequence,
    packed into rows of that length (the filler at each row's end), or none (one at a time)."""
    from prefkit.packing import bins

    if layout == "seq":
        return 0.0
    real = sum(real_tokens(b) for b in batches)
    total = 0
    for b in batches:
        lengths = [len(s.ids) for g in b for s in g]
        rows = len(lengths) if layout != "packed" else len(bins(lengths, max(lengths)))
        total += rows * max(lengths)
    return 1 - real / total


# --- implementations -------------------------------------------------------------------------------

class Limit:
    """The real tokens' compute and nothing else: each sequence alone, or packed without bookkeeping."""

    def __init__(self, policy, reference, batches, device, packed: bool):
        self.policy, self.reference, self.device, self.packed = policy, reference, device, packed
        self.batches = batches

    def _alone(self, model, seqs) -> torch.Tensor:
        out = []
        for seq in seqs:
            ids = torch.tensor([seq.ids], device=self.device)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, seq.prompt_len - 1:-1]
            logits = model.get_output_embeddings()(hidden).float()
            out.append(-F.cross_entropy(logits, ids[0, seq.prompt_len:], reduction="sum"))
        return torch.stack(out)

    def _packed(self, model, seqs) -> torch.Tensor:
        from prefkit.packing import bins

        width = max(len(s.ids) for s in seqs)
        rows = bins([len(s.ids) for s in seqs], width)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        pos = torch.zeros(len(rows), width, dtype=torch.long)
        where = []  # (row, first predicting column, last, targets) per sequence
        for r, members in enumerate(rows):
            col = 0
            for i in members:
                s = seqs[i]
                ids[r, col:col + len(s.ids)] = torch.tensor(s.ids)
                pos[r, col:col + len(s.ids)] = torch.arange(len(s.ids))
                where.append((i, r, col + s.prompt_len - 1, col + len(s.ids) - 1))
                col += len(s.ids)
            pos[r, col:] = torch.arange(width - col)
        hidden = model.base_model(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                                  use_cache=False).last_hidden_state
        where.sort()
        h = torch.cat([hidden[r, a:b] for _, r, a, b in where])
        targets = torch.cat([ids[r, a + 1:b + 1] for _, r, a, b in where]).to(self.device)
        token = -F.cross_entropy(model.get_output_embeddings()(h).float(), targets, reduction="none")
        owner = torch.cat([torch.full((b - a,), i) for i, _, a, b in where]).to(self.device)
        return torch.zeros(len(seqs), device=self.device).index_add(0, owner, token)

    def run(self) -> list[float]:
        logps = self._packed if self.packed else self._alone
        opt = torch.optim.AdamW(self.policy.parameters(), lr=ba.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        stamps = []
        for batch in self.batches:
            seqs = [s for g in batch for s in g]
            with torch.no_grad():
                ref = logps(self.reference, seqs).view(-1, 2)
            pol = logps(self.policy, seqs).view(-1, 2)
            margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
            (-F.logsigmoid(0.1 * margin)).mean().backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bc.sync(self.device)
            stamps.append(time.perf_counter())
        return stamps


class Prefkit:
    """The align stage's step under prefkit's Trainer, padded, packed or length-grouped."""

    def __init__(self, objective: str, layout: str, policy, reference, groups, pad, device, args, accelerator,
                 out: Path, steps: int):
        from prefkit.modules import StatsLM

        self.module, self.reference, self.groups, self.pad = StatsLM(policy), reference, groups, pad
        self.objective_cfg, self.layout, self.steps = OBJECTIVES[objective], layout, steps
        self.device, self.args, self.accelerator, self.out = device, args, accelerator, out

    def run(self) -> list[float]:
        from prefkit import packing
        from prefkit.data import EpochSampler
        from prefkit.modules import backbone
        from prefkit.objectives import build
        from prefkit.reference import Online
        from prefkit.stages.align import AlignStep
        from prefkit.tokenstats import KEEP_LOGITS_ELEMENTS, Head
        from prefkit.trainer import Trainer

        for model in (self.module.lm, self.reference):
            packing.enable(backbone(model), self.layout == "packed")
        objective, _ = build(dict(self.objective_cfg))
        cfg = ba.prefkit_cfg(self.steps, self.args, self.args.threads)
        cfg.train.group_by_length = self.layout == "grouped"
        # as the align stage resolves hardware.recompute_lm_head
        setting = self.args.recompute_lm_head
        recompute = objective.needs.tokens.needs_reference_logits if setting == "auto" else setting == "true"
        keep_below = KEEP_LOGITS_ELEMENTS // Head.of(self.module.lm).vocab if setting == "auto" else 0
        step = AlignStep(objective, {"train": self.groups}, self.pad, self.device, None, recompute,
                         Online(self.reference), keep_below=keep_below)
        stamps: list[float] = []

        def stamp(_step: int) -> None:
            bc.sync(self.device)
            stamps.append(time.perf_counter())

        lengths = [max(len(s.ids) for s in g) for g in self.groups]
        trainer = Trainer(cfg, self.out, self.module, self.accelerator, len(self.groups),
                          lambda model, indices, training: step(model, "train", indices, training),
                          stateful={"objective": objective}, on_step=stamp, lengths=lengths)
        if self.layout != "grouped":  # the given batches, in order
            trainer.sampler = EpochSampler(len(self.groups), self.args.pairs, 0, shuffle=False)
        self.seen = [[self.groups[i] for i in trainer.sampler.next()] for _ in range(self.steps)]
        trainer.sampler.load_state_dict({"epoch": 0, "cursor": 0, "n": len(self.groups),
                                         "batch_size": self.args.pairs})
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            trainer.fit()
        self.accelerator.free_memory()
        return stamps


class TRL(ba.TRL):
    """bench_align's TRL runner on these rows, max_length 512, batches in the given order."""

    def __init__(self, policy, reference, tok, pairs, args, out: Path, steps: int):
        from torch.utils.data import SequentialSampler

        super().__init__(policy, reference, tok, pairs, args, out, precompute=False, max_length=MAX_LENGTH)
        self.trainer._get_train_sampler = lambda *a, **k: SequentialSampler(self.trainer.train_dataset)
        self.steps = steps

    def run(self) -> list[float]:
        return super().run(self.steps)


# --- driver ----------------------------------------------------------------------------------------

def bench_size(size: str, args, accelerator, tok, pairs) -> dict:
    from prefkit.data import EpochSampler
    from prefkit.models import freeze

    d = DEFAULTS[size]
    steps = (args.steps or d["steps"]) + 1  # the first step is dropped
    repeats = args.repeats or d["repeats"]
    device = torch.device(args.device)
    path = model_dir(size, tok, args.cache)
    rng = random.Random(f"bench_packing/{size}")
    drawn = rng.sample(range(len(pairs)), steps * args.pairs)
    chosen = [pairs[i] for i in drawn]
    groups = [p["encoded"] for p in chosen]
    window = [pairs[i]["encoded"] for i in rng.sample(range(len(pairs)), min(len(pairs), 50 * args.pairs))]
    reference = freeze(bc.load(path)).to(device)
    init = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    impls = [i for i in args.impls.split(",") if i]
    runners, policies = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_packing_{size}_"))
    for name in impls:
        policies[name] = policy = bc.load(path).to(device)
        if name.startswith("limit-"):
            runners[name] = Limit(policy, reference, [groups[s * args.pairs:(s + 1) * args.pairs]
                                                      for s in range(steps)], device, packed=name == "limit-packed")
        elif name == "trl":
            runners[name] = TRL(policy, reference, tok, chosen, args, tmp / name, steps)
        else:
            objective, layout = name.split("-")
            runners[name] = Prefkit(objective, layout, policy, reference, window if layout == "grouped" else groups,
                                    tok.pad_token_id, device, args, accelerator, tmp / name, steps)
    batches = {name: [groups[s * args.pairs:(s + 1) * args.pairs] for s in range(steps)] for name in impls}
    grouped = EpochSampler(len(window), args.pairs, 0, lengths=[max(len(s.ids) for s in g) for g in window])
    for name in impls:
        if name.endswith("-grouped"):
            batches[name] = [[window[i] for i in grouped.next()] for _ in range(steps)]
    results: dict[str, dict[str, list[float]]] = {n: {"s": [], "tok/s": [], "mem": []} for n in impls}

    def run(name: str, r: int) -> None:
        with torch.no_grad():
            for k, v in policies[name].state_dict().items():
                v.copy_(init[k])
        policies[name].zero_grad(set_to_none=True)
        with bc.PeakMemory(device) as mem:
            stamps = runners[name].run()
        assert len(stamps) == steps, (name, len(stamps))
        if isinstance(runners[name], Prefkit):
            assert runners[name].seen == batches[name], name  # it trained on the batches counted
        secs = stamps[-1] - stamps[0]
        tokens = sum(real_tokens(b) for b in batches[name][1:])
        res = results[name]
        res["s"].append(secs / (steps - 1))
        res["tok/s"].append(tokens / secs)
        res["mem"].append(mem.mib)
        print(f"  [{size}] repeat {r + 1}/{repeats} {name:13s} {secs / (steps - 1):7.3f} s/step "
              f"{tokens / secs:8.0f} tok/s  peak +{mem.mib:6.0f} MiB", flush=True)

    pad = {name: padding_fraction(batches[name][1:], name.split("-")[-1]) for name in impls}
    print(f"{size}: {bc.fmt_params(bc.n_params(reference))} parameters, vocabulary {len(tok)}; {args.pairs} pairs per "
          f"step, {steps - 1} measured steps (+1 dropped), repeats {repeats}; padding when padded "
          f"{padding_fraction(batches[impls[0]][1:], 'padded'):.0%}, packed "
          f"{padding_fraction(batches[impls[0]][1:], 'packed'):.0%}", flush=True)
    bc.interleave(impls, repeats, run)
    return {"size": size, "params": bc.n_params(reference), "pad": pad,
            "median": {n: {k: bc.median(v) for k, v in res.items()} for n, res in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.common_args(parser, sizes="25m,100m")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default: 25m 5, 100m 3)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 25m 2, 100m 1)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--objectives", default="dpo,tdpo2,edpo")
    parser.add_argument("--impls", default=None, help="default: limit-seq, limit-packed, <obj>-padded, <obj>-packed, "
                                                      "dpo-grouped, trl")
    parser.add_argument("--trl-optim", default="adamw_torch")
    parser.add_argument("--recompute-lm-head", default="auto", choices=["auto", "true", "false"],
                        help="prefkit's hardware.recompute_lm_head (auto: for TDPO and ε-DPO, when the "
                             "micro-batch's logits are large)")
    args = parser.parse_args()
    objectives = args.objectives.split(",")
    layouts = [f"{o}-{lay}" for o in objectives for lay in ("padded", "packed")]
    args.impls = args.impls or ",".join(["limit-seq", "limit-packed", *layouts, "dpo-grouped", "trl"])
    wall = bc.Stopwatch()
    accelerator = bc.start(args)
    rows = hh_rows()
    tok = tokenizer(rows, args.cache)
    pairs = encoded_pairs(rows, tok)
    import trl

    print(f"torch {torch.__version__}, trl {trl.__version__}, threads {torch.get_num_threads()}, device "
          f"{args.device}, {args.dtype}; {len(pairs)} of {len(rows)} HH pairs fit {MAX_LENGTH} tokens untruncated",
          flush=True)
    results = [bench_size(size, args, accelerator, tok, pairs) for size in args.sizes.split(",") if size]

    for res in results:  # the limit: the faster way of computing exactly the real tokens
        med = res["median"]
        ways = [med[k] for k in ("limit-seq", "limit-packed") if k in med]
        if ways:
            med["limit"] = min(ways, key=lambda m: m["s"])
            res["pad"]["limit"] = res["pad"][min((k for k in med if k.startswith("limit-")), key=lambda k: med[k]["s"])]
    rows_out = []
    for res in results:
        med = res["median"]
        limit = med.get("limit", {}).get("s", float("nan"))
        for name, m in med.items():
            rows_out.append([f"{res['size']} ({bc.fmt_params(res['params'])})", name, f"{res['pad'][name]:.0%}",
                             f"{m['s']:.3f}", f"{m['tok/s']:.0f}", f"{m['mem']:.0f}", f"{m['s'] / limit:.2f}"])
    bc.print_table("Align step on HH-shaped batches (medians over interleaved repeats)",
                   ["size", "implementation", "padding", "s/step", "real tok/s", "peak MiB", "/ limit"], rows_out)

    def get(res, name, key="s"):
        return res["median"].get(name, {}).get(key, float("nan"))

    keys = ("packed/limit", "TRL/packed", "packed/padded", "tok/s grouped/padded", "TDPO2 packed/DPO packed",
            "eDPO packed/DPO packed", "peak packed/padded")
    parts: dict[str, list[str]] = {k: [] for k in keys}
    for res in results:
        s = res["size"]
        r = get(res, "dpo-packed") / get(res, "limit")
        parts["packed/limit"].append(f"{s}={r:.2f} (target <=1.15 {bc.verdict(r <= 1.15)})")
        r = get(res, "trl") / get(res, "dpo-packed")
        parts["TRL/packed"].append(f"{s}={r:.2f} (target >=1.5 {bc.verdict(r >= 1.5)})")
        for o in objectives:
            r = get(res, f"{o}-packed") / get(res, f"{o}-padded")
            parts["packed/padded"].append(f"{s}:{o}={r:.2f} (target <=1 {bc.verdict(r <= 1.0)})")
            r = get(res, f"{o}-packed", "mem") / get(res, f"{o}-padded", "mem")
            parts["peak packed/padded"].append(f"{s}:{o}={r:.2f} (target <=1 {bc.verdict(r <= 1.0)})")
        r = get(res, "dpo-grouped", "tok/s") / get(res, "dpo-padded", "tok/s")
        parts["tok/s grouped/padded"].append(f"{s}={r:.2f} (info)")
        for o, key in (("tdpo2", "TDPO2 packed/DPO packed"), ("edpo", "eDPO packed/DPO packed")):
            r = get(res, f"{o}-packed") / get(res, "dpo-packed")
            parts[key].append(f"{s}={r:.2f} (target <=1.25 {bc.verdict(r <= 1.25)})")
    print(f"wall time {wall():.0f} s")
    parts = {k: [x for x in v if "nan" not in x] for k, v in parts.items()}  # implementations not run
    print("RATIOS: " + "; ".join(f"{k} " + " ".join(v) for k, v in parts.items() if v))


if __name__ == "__main__":
    main()

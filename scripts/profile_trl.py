"""Where TRL 1.16's DPO step spends its time, measured (the README's performance section quotes this).

    .venv/bin/python scripts/profile_trl.py                   # bench_align's 1m shape and bench_packing's HH 25m shape
    .venv/bin/python scripts/profile_trl.py --shapes 1m --steps 5

Three measurements per shape, on bench_align's and bench_packing's data and models:

1. The step, whole: TRL's DPOTrainer as it runs (its fused LM head, `add_fused_lm_head`, scores every
   position, prompt and padding included, on a device without Triton, e.g. any CPU), TRL with that head
   scoring only the response positions (as it does on a Triton GPU: `trl.trainer.utils._use_triton`
   patched for that one decision), and prefkit's align step (padded, as TRL pads). Interleaved, medians.
2. The LM head alone, forward and backward on the step's own final hidden states: TRL's
   ChunkedLogProbFunction over all positions or over response positions only, with the four outputs
   DPOTrainer asks for (log-probs, entropy, mean logit, is-top-1) or log-probs alone; and prefkit's
   chunked head (prefkit.tokenstats.token_stats) over response positions.
3. torch.profiler over TRL's steps: the ten operators with the most self CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_align as ba
import bench_common as bc
import bench_packing as bp
import torch


def shape_data(shape: str, args):
    """(model dir, tokenizer, pairs with text and encoded ids)."""
    from prefkit.models import load_tokenizer

    if shape == "1m":
        path = bc.model_dir("1m", args.cache)
        tok = load_tokenizer(str(path))
        return path, tok, ba.make_pairs(tok, args.pairs, 31, 31, seed=1)
    rows = bp.hh_rows()
    tok = bp.tokenizer(rows, args.cache)
    pairs = bp.encoded_pairs(rows, tok)
    import random

    chosen = random.Random("profile_trl").sample(pairs, args.pairs)
    return bp.model_dir("25m", tok, args.cache), tok, chosen


@contextlib.contextmanager
def compact_head(on: bool):
    import trl.trainer.utils as tu

    original = tu._use_triton
    if on:
        tu._use_triton = lambda device: True  # only the compact-or-not decision reads this name
    try:
        yield
    finally:
        tu._use_triton = original


def time_steps(shape: str, args, accelerator) -> dict[str, float]:
    from prefkit.models import freeze

    path, tok, pairs = shape_data(shape, args)
    device = torch.device("cpu")
    reference = freeze(bc.load(path))
    init = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix="profile_trl_"))
    runners = {"trl": ba.TRL(bc.load(path), reference, tok, pairs, args, tmp / "a", False, bp.MAX_LENGTH),
               "trl-compact": ba.TRL(bc.load(path), reference, tok, pairs, args, tmp / "b", False, bp.MAX_LENGTH),
               "prefkit": ba.Prefkit(bc.load(path), reference, [p["encoded"] for p in pairs], tok.pad_token_id,
                                     device, args, accelerator, tmp / "c")}
    times: dict[str, list[float]] = {k: [] for k in runners}

    def run(name: str, r: int) -> None:
        runner = runners[name]
        model = runner.module.lm if name == "prefkit" else runner.trainer.model
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(init[k])
        with compact_head(name == "trl-compact"):
            stamps = runner.run(args.steps + 1)
        times[name].extend(bc.intervals(stamps, 1))

    bc.interleave(list(runners), args.repeats, run)
    return {k: bc.median(v) for k, v in times.items()}, (path, tok, pairs, runners["trl"])


def time_head(path, tok, pairs, args) -> dict[str, float]:
    """The LM head alone, forward + backward, on the final hidden states of the step's sequences."""
    import torch.nn.functional as F
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from prefkit.data import collate
    from prefkit.tokenstats import Head, token_stats

    model = bc.load(path)
    batch = collate([s for p in pairs for s in p["encoded"]], tok.pad_token_id)
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    weight = model.get_output_embeddings().weight
    four = ("log_probs", "entropy", "mean_logits", "is_top1")

    def trl_head(h, y, outputs):
        out = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
        out[0].sum().backward()

    def prefkit_head(h, y):
        token_stats(h, y, Head(weight), recompute=False)["logps"].sum().backward()

    def fused_ce(h, y):  # a floor: one fused log-softmax + gather
        (-F.cross_entropy(h @ weight.T, y, reduction="sum")).backward()

    all_h, all_y = hidden.reshape(-1, hidden.shape[-1]), labels.clamp(min=0).reshape(-1)
    resp_h, resp_y = hidden[mask], labels[mask]
    cases = {
        f"TRL head, all {all_h.shape[0]} positions, 4 outputs": lambda h: trl_head(h, all_y, four),
        f"TRL head, all {all_h.shape[0]} positions, log-probs only": lambda h: trl_head(h, all_y, ("log_probs",)),
        f"TRL head, {resp_h.shape[0]} response positions, 4 outputs": lambda h: trl_head(h, resp_y, four),
        f"TRL head, {resp_h.shape[0]} response positions, log-probs only": lambda h: trl_head(h, resp_y,
                                                                                          ("log_probs",)),
        f"prefkit head, {resp_h.shape[0]} response positions": lambda h: prefkit_head(h, resp_y),
        f"cross_entropy, {resp_h.shape[0]} response positions": lambda h: fused_ce(h, resp_y),
    }
    inputs = {k: (all_h if "all" in k else resp_h) for k in cases}
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats * 3):
        for name, fn in cases.items():
            h = inputs[name].detach().clone().requires_grad_(True)
            weight.grad = None
            t0 = time.perf_counter()
            fn(h)
            out[name].append(time.perf_counter() - t0)
    return {k: bc.median(v) for k, v in out.items()}


def profile_trl(runner, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        runner.run(args.steps)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=10,
                                                               max_name_column_width=40, max_shapes_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1m,hh", help="1m (bench_align's 1.4M, 10k vocabulary, 16 pairs x 64 "
                                                          "tokens) and/or hh (bench_packing's 25m on HH batches)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=bc.DEFAULT_CACHE)
    args = parser.parse_args()
    args.device, args.dtype, args.trl_optim = "cpu", "fp32", "adamw_torch"
    accelerator = bc.start(args)
    wall = bc.Stopwatch()
    ratios = []
    for shape in args.shapes.split(","):
        steps, (path, tok, pairs, trl_runner) = time_steps(shape, args, accelerator)
        bc.print_table(f"{shape}: seconds per DPO step (median of {args.steps} steps x {args.repeats} repeats)",
                       ["implementation", "s/step", "/ prefkit"],
                       [[k, f"{v:.4f}", f"{v / steps['prefkit']:.2f}"] for k, v in steps.items()])
        head = time_head(path, tok, pairs, args)
        bc.print_table(f"{shape}: the LM head alone, forward + backward (median s)", ["head", "s", "/ cross_entropy"],
                       [[k, f"{v:.4f}", f"{v / list(head.values())[-1]:.2f}"] for k, v in head.items()])
        print(f"{shape}: TRL's steps under torch.profiler (self CPU time):")
        print(profile_trl(trl_runner, args), flush=True)
        ratios.append(f"{shape}: TRL/prefkit={steps['trl'] / steps['prefkit']:.2f} "
                      f"TRL-compact/prefkit={steps['trl-compact'] / steps['prefkit']:.2f}")
    print(f"wall time {wall():.0f} s")
    print("RATIOS: " + "; ".join(ratios))


if __name__ == "__main__":
    main()

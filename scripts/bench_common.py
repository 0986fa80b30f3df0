"""Shared pieces of the benchmark scripts (bench_align.py, bench_tdpo_memory.py, bench_sample.py).

Models are created locally (nothing from the Hub): "tiny" is the embedded tiny GPT-NeoX of
conf/model/tiny.yaml with its byte-level BPE tokenizer (vocabulary 1,024); "100m" is a
GPT-NeoX with Pythia's padded vocabulary (50,304) and a word-level tokenizer whose words are
"w0", "w1", ... so any token id has an exact text form (TRL tokenizes text). Both are saved with
save_pretrained under a cache directory outside the repository and loaded through prefkit's own
loader, so every implementation starts from the same weights.

Timing is interleaved: each repeat runs every implementation once, in a rotated order, and a
ratio is a ratio of medians taken in the same process, so machine noise hits all alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Before torch loads its OpenMP runtime: threads that sleep at a barrier instead of spinning. With
# the default (active) policy, 2 threads on 2 cores that another process also uses stall at every
# parallel region (measured here: a tiny-model step 0.34 s -> 4.7 s); passive costs nothing measurable
# on an idle machine. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
try:  # the installed (editable) prefkit, or one put first on PYTHONPATH (e.g. a patched scratch copy)
    import prefkit  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(os.environ.get("PREFKIT_BENCH_CACHE", "/tmp/prefkit_bench_cache"))

# The embedded tiny model, exactly as conf/model/tiny.yaml declares it (about 1.1M parameters).
TINY_ARCH = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
             "max_position_embeddings": 64, "seed": 0}
# About 100M parameters: Pythia's vocabulary (50,304, untied input/output embeddings as in Pythia),
# hidden 640, 8 layers, 10 heads of 64, MLP 2560: 2 × 32.2M embeddings + 8 × 4.9M blocks ≈ 104M.
# (hidden 768 × 12 layers would be ≈ 162M with untied embeddings.)
M100_ARCH = {"vocab_size": 50304, "hidden_size": 640, "num_hidden_layers": 8, "num_attention_heads": 10,
             "intermediate_size": 2560, "max_position_embeddings": 2048, "seed": 0}
# Optional (not in the default runs): about 1.3M parameters with a 10k vocabulary, the scale of the
# issue's TRL reference point, where the LM head (not the backbone) dominates a step.
M1_ARCH = {"vocab_size": 10000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 256, "max_position_embeddings": 2048, "seed": 0}
# Pythia-410m and Pythia-1.4b shapes (random init), for a GPU (scripts/gpu_check.sh).
M410_ARCH = {"vocab_size": 50304, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
             "intermediate_size": 4096, "max_position_embeddings": 2048, "seed": 0}
B14_ARCH = {"vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
            "intermediate_size": 8192, "max_position_embeddings": 2048, "seed": 0}
SIZES = {"tiny": TINY_ARCH, "100m": M100_ARCH, "1m": M1_ARCH, "410m": M410_ARCH, "1.4b": B14_ARCH}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def word_tokenizer(n_words: int):
    """A word-level tokenizer of 4 specials (<pad>=0, <unk>=1, <bos>=2, <eos>=3) and words w0..w{n-1}."""
    from prefkit.embedded import build_word_tokenizer

    return build_word_tokenizer([f"w{i}" for i in range(n_words)])


def model_dir(size: str, cache: Path = DEFAULT_CACHE, arch: dict | None = None) -> Path:
    """The saved model (and tokenizer) of a size, created once."""
    arch = dict(arch or SIZES[size])
    if size == "tiny" and arch == TINY_ARCH:
        from prefkit.embedded import embedded_dir

        return embedded_dir("tiny", {k: v for k, v in arch.items()}, cache)
    key = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
    out = cache / "bench" / f"{size}-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    seed = arch.pop("seed", 0)
    vocab = arch.pop("vocab_size")
    tok = word_tokenizer(vocab - 4)
    assert len(tok) == vocab, (len(tok), vocab)
    config = GPTNeoXConfig(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **arch)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def load(path: Path | str, dtype: str = "float32"):
    """prefkit's own loader (dropout off), like the align and sample stages."""
    from prefkit.models import load_causal_lm

    return load_causal_lm(str(path), dtype)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleave(names: Sequence[str], repeats: int, run: Callable[[str, int], Any]) -> None:
    """Run every implementation once per repeat, rotating the order so none is always first."""
    names = list(names)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            run(name, r)


def intervals(stamps: Sequence[float], warmup: int) -> list[float]:
    """Step times from the wall-clock stamps taken at the end of each step: the interval before
    step i (i > warmup) is its full time in its own loop, bookkeeping included."""
    return [stamps[i] - stamps[i - 1] for i in range(max(1, warmup), len(stamps))]


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table when rich is there, a plain one otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(c) for c in row))
        return
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=200).print(table)


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def common_args(parser, *, sizes: str = "tiny,100m") -> None:
    parser.add_argument("--sizes", default=sizes,
                        help="comma-separated: tiny, 100m (and optionally 1m: 1.4M parameters, vocab 10k; "
                             "410m and 1.4b: Pythia's shapes, for a GPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="fp32, or bf16 mixed precision (fp32 master weights)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the benchmark models are saved")


def start(args):
    """What every benchmark does first: torch threads, quiet libraries, and prefkit's accelerator
    for --device/--dtype."""
    import logging
    import warnings

    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from omegaconf import OmegaConf

    from prefkit.console import quiet_libraries
    from prefkit.engine import make_accelerator

    quiet_libraries()
    logging.getLogger("trl").setLevel(logging.ERROR)
    return make_accelerator(OmegaConf.create({"device": args.device, "precision": args.dtype,
                                              "num_threads": args.threads}))


# --- memory and FLOPs -------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block over what was resident before it, in MiB: the CUDA allocator's peak
    on a GPU; on a CPU the process's resident-set high-water mark (after malloc_trim)."""

    def __init__(self, device: torch.device | str):
        self.device, self.mib = torch.device(device), float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated() - self.before) / 2**20
        else:
            self.mib = (_status("VmHWM") - self.before) / 2**20


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def model_flops_per_token(config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token of one forward and backward (PaLM's MFU accounting, Chowdhery et
    al. 2022, App. B): 6 N + 12 L d S, N the parameters without the input embedding, L layers, d the
    hidden size, S the sequence length. A frozen reference's forward is a third of it."""
    n = n_params - config.vocab_size * config.hidden_size
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


# Dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets; the first name the device's
# name contains wins. Anything else: pass --peak-tflops.
BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "L40": 181e12, "L4": 121e12}


def bf16_peak(device: torch.device | str, override_tflops: float | None = None) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s (`--peak-tflops` wins); None on a CPU or an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


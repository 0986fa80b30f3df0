"""Precomputed reference log-probs, cached in the run directory.

Objectives that need only the reference's scalar sequence log-probs (DPO, IPO, EXO, ...) get
them from one no-grad pass of the reference over the data, stored at
<run>/cache/ref_logps/<key>.safetensors. The key hashes the tokenized data (so the dataset,
tokenizer and truncation), the reference's weights fingerprint and dtype, and the logit
temperature: every job of a `-m` sweep that shares these reuses one file, and anything that
changes them gets a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from prefkit.console import console
from prefkit.data import Encoded, collate
from prefkit.modules import ShardableReference, sequence_stats
from prefkit.tokenstats import TokenRequest, response_positions, sum_by_sequence


def model_fingerprint(path: str) -> str:
    """Cheap identity of a model directory's weights: file names, sizes, and their first and
    last MiB. A Hub id (not a local directory) is its own fingerprint."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def cache_key(groups: dict[str, list[list[Encoded]]], reference_path: str, dtype: str, temperature: float) -> str:
    h = hashlib.sha256()
    h.update(f"v2|{model_fingerprint(reference_path)}|{dtype}|{temperature}".encode())  # v2: float64 sums
    for split in sorted(groups):
        h.update(split.encode())
        for group in groups[split]:
            for seq in group:
                h.update(f"{seq.prompt_len}:".encode())
                h.update(torch.tensor(seq.ids, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute(reference: nn.Module, groups: list[list[Encoded]], pad_id: int, device: torch.device,
            batch_size: int, temperature: float, chunk_size: int | None, context=None) -> Tensor:
    """[n_groups, K] summed reference log-probs of every completion (`context`: e.g. a LoRA
    model's disable_adapter, to make the policy its own reference)."""
    k = len(groups[0])
    flat = [seq for group in groups for seq in group]
    out = torch.empty(len(flat), dtype=torch.float64)  # sums: see tokenstats.sum_by_sequence
    req = TokenRequest(temperature=temperature)
    for start in range(0, len(flat), batch_size):
        batch = {key: v.to(device) for key, v in collate(flat[start:start + batch_size], pad_id).items()}
        with context() if context else contextlib.nullcontext():
            logps = _sequence_logps(reference, batch, req, chunk_size)
        out[start:start + len(logps)] = logps.double().cpu()
    return out.view(len(groups), k)


def _sequence_logps(reference: nn.Module, batch: dict, req: TokenRequest, chunk_size: int | None) -> Tensor:
    if isinstance(getattr(reference, "module", reference), ShardableReference):  # sharded: rows from its forward
        ref = reference(**batch, temperature=req.temperature, chunk_size=chunk_size)
        rows, _, targets = response_positions(batch["labels"])
        token = ref.logprobs.gather(-1, targets[:, None]).squeeze(-1)
        return sum_by_sequence(token, rows, batch["labels"].shape[0])
    return sequence_stats(reference, **batch, req=req, chunk_size=chunk_size, recompute=False).logps


def load_or_compute(run: Path, key: str, groups: dict[str, list[list[Encoded]]], make_reference,
                    pad_id: int, device: torch.device, batch_size: int, temperature: float,
                    chunk_size: int | None, is_main: bool = True, context=None) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    from prefkit.rundir import save_safetensors

    path = run / "cache" / "ref_logps" / f"{key}.safetensors"
    if path.exists():
        console.print(f"reference log-probs: cached ({path})")
        return load_file(str(path))
    reference = make_reference()
    console.print(f"reference log-probs: computing once for {sum(len(g) for g in groups.values())} groups -> {path}")
    result = {split: compute(reference, g, pad_id, device, batch_size, temperature, chunk_size, context)
              for split, g in groups.items()}
    if is_main:
        save_safetensors(result, path)
    return result

"""Padding-free forward passes (`hardware.packing`).

A right-padded micro-batch [N, T] spends the backbone's compute on padding: on real preference
data (Anthropic HH: prompts of ~80 tokens, responses of ~30, a long tail) most of a batch padded
to its longest sequence is padding. Packed, the sequences are laid end to end in rows no longer
than the longest sequence (first-fit decreasing), `position_ids` restarting at 0 at each one;
transformers then builds an attention mask that never crosses a sequence boundary (a
block-causal mask for eager and sdpa attention, cu_seqlens for flash attention). The final
hidden states are put back in the padded layout, so every statistic downstream (response
positions, last tokens, the reward head) is computed exactly as from a padded pass.

Whether a model honours packed position ids is measured, not assumed: `enable` runs a probe
(a short sequence packed after another, against the same sequence alone) and falls back to the
padded pass with a warning when the two differ.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

_FLAG = "_prefkit_packed"  # set on the backbone: run it padding-free


def enable(backbone: nn.Module, wanted: bool) -> bool:
    """Mark `backbone` to run packed when `wanted` and its attention honours packed position ids."""
    ok = bool(wanted) and honours_packed_positions(backbone)
    if wanted and not ok:
        logging.getLogger("prefkit").warning(
            "hardware.packing: %s does not keep packed sequences apart (its attention ignores restarting "
            "position_ids); running padded", type(backbone).__name__)
    setattr(backbone, _FLAG, ok)
    return ok


def is_enabled(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, _FLAG, False))


@torch.no_grad()
def honours_packed_positions(backbone: nn.Module) -> bool:
    """Whether a sequence packed after another gets the hidden states it gets alone."""
    device = next(backbone.parameters()).device
    vocab = int(getattr(backbone.config, "vocab_size", 2))
    first = torch.arange(9, device=device) % vocab
    second = (torch.arange(3, device=device) * 7 + 1) % vocab
    alone = backbone(input_ids=second[None], use_cache=False).last_hidden_state[0].float()
    packed = backbone(input_ids=torch.cat([first, second])[None], attention_mask=None, use_cache=False,
                      position_ids=torch.cat([torch.arange(9), torch.arange(3)]).to(device)[None])
    tail = packed.last_hidden_state[0, 9:].float()
    # A mask that crosses the boundary, or positions that do not restart, change these states by
    # O(1) relative; rounding of a reduced-precision model by far less.
    tol = 1e-4 if next(backbone.parameters()).dtype == torch.float32 else 3e-2
    return bool(((tail - alone).norm() / alone.norm().clamp_min(1e-12)) < tol)


def bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, no row longer than `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def packed_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The backbone's final hidden states [N, T, H] of a right-padded batch, computed packed
    (padding positions hold zeros)."""
    n, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    lens = lengths.tolist()
    rows = bins(lens, width)
    device = input_ids.device
    # where each sequence goes: its row and its offset in that row
    row_of = torch.empty(n, dtype=torch.long)
    offset = torch.empty(n, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            row_of[i], offset[i] = r, start
            start += lens[i]
    row_of, offset = row_of.to(device), offset.to(device)
    src_row = torch.repeat_interleave(torch.arange(n, device=device), lengths)
    within = torch.arange(src_row.shape[0], device=device) - (torch.cumsum(lengths, 0) - lengths)[src_row]
    dst_row, dst_col = row_of[src_row], offset[src_row] + within
    ids = torch.zeros(len(rows), width, dtype=input_ids.dtype, device=device)
    ids[dst_row, dst_col] = input_ids[src_row, within]
    # positions restart at every sequence; the filler at a row's end counts from 0 as a sequence of its own
    used = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    used[dst_row, dst_col] = True
    cols = torch.arange(width, device=device).expand(len(rows), width)
    fill_start = used.sum(-1, keepdim=True)
    positions = torch.where(used, torch.zeros_like(cols), cols - fill_start)
    positions[dst_row, dst_col] = within
    out = backbone(input_ids=ids, attention_mask=None, position_ids=positions, use_cache=False).last_hidden_state
    hidden = out.new_zeros(n, width, out.shape[-1])
    hidden[src_row, within] = out[dst_row, dst_col]
    return hidden


def is_right_padded(attention_mask: Tensor) -> bool:
    lengths = attention_mask.sum(-1, keepdim=True)
    prefix = torch.arange(attention_mask.shape[1], device=lengths.device) < lengths
    return bool((attention_mask.bool() == prefix).all())

"""The models as prefkit runs them: a causal LM whose forward returns the response statistics
(the policy, the SFT model, a reward model), the frozen reference's pass, and the reference as
one module for sharding engines. The maths they call is in prefkit.tokenstats.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from prefkit import packing
from prefkit.tokenstats import (
    LOGPS_ONLY,
    Head,
    Reference,
    SequenceStats,
    TokenRequest,
    chunk_tokens,
    response_positions,
    stats_from_hidden,
    tempered_logits,
)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under the LM head (PEFT wrappers unwrapped, adapters kept)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model.base_model


def final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[N, T, H] final hidden states of a right-padded batch; padding-free when the backbone was
    packed (prefkit.packing.enable), padded otherwise."""
    body = backbone(model)
    if packing.is_enabled(body) and packing.is_right_padded(attention_mask):
        return packing.packed_hidden(body, input_ids, attention_mask)
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@torch.no_grad()
def reference_hidden(reference: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     context: Callable | None = None) -> Reference:
    """Run the frozen reference once: its hidden states at the response positions and its head.
    `context` (e.g. peft's disable_adapter) makes the policy itself the reference."""
    rows, cols, _ = response_positions(labels)
    with context() if context else contextlib.nullcontext():
        hidden = final_hidden(reference, input_ids, attention_mask)[rows, cols]
        head = Head.of(reference)
    return Reference(hidden, head.detached())


class ShardableReference(nn.Module):
    """The frozen reference as one module, for sharding engines (FSDP, DeepSpeed ZeRO-3): its
    forward gathers the weights, so everything that needs them happens inside it, and it returns
    log-softmax rows at the response positions (at the loss's temperature), chunk by chunk."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, temperature: float = 1.0,
                chunk_size: int | None = None) -> Reference:
        rows, cols, _ = response_positions(labels)
        hidden = final_hidden(self.lm, input_ids, attention_mask)[rows, cols]
        head = Head.of(self.lm)
        chunk = chunk_tokens(chunk_size, head.vocab)
        out = torch.cat([torch.log_softmax(tempered_logits(head, hidden[s:s + chunk], temperature), dim=-1)
                         for s in range(0, hidden.shape[0], chunk)])
        return Reference(logprobs=out)


class StatsLM(nn.Module):
    """What the trainer optimises: a causal LM, optionally with a scalar reward head on its last
    hidden state (DRDO's student, reward models), whose forward returns SequenceStats, so the
    whole computation runs inside one module call (as DDP and FSDP require)."""

    def __init__(self, lm: nn.Module, reward_head: bool = False):
        super().__init__()
        self.lm = lm
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.reward_head = nn.Linear(config.hidden_size, 1) if reward_head else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                reference: Reference | None = None, req: TokenRequest = LOGPS_ONLY, chunk_size: int | None = None,
                recompute: bool = True, group_size: int | None = None) -> tuple[SequenceStats, Tensor | None]:
        hidden = final_hidden(self.lm, input_ids, attention_mask)
        stats = stats_from_hidden(hidden, Head.of(self.lm), attention_mask, labels, reference=reference, req=req,
                                  chunk_size=chunk_size, recompute=recompute, group_size=group_size)
        rewards = None
        if self.reward_head is not None:
            rewards = self.reward_head(stats.last_hidden.to(self.reward_head.weight.dtype)).squeeze(-1)
        return stats, rewards


def sequence_stats(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                   reference: nn.Module | None = None, req: TokenRequest = LOGPS_ONLY,
                   want_ref_logps: bool = False, chunk_size: int | None = None, recompute: bool = True,
                   reference_context: Callable | None = None, group_size: int | None = None) -> SequenceStats:
    """Statistics of every sequence's response tokens (labels != -100) under `model` (and, for
    reference log-probs or any reference-logit statistic, under `reference`); `group_size`
    consecutive sequences form a prompt's group (for shared-prefix sums)."""
    ref = None
    if want_ref_logps or req.needs_reference_logits:
        if reference is None:
            raise ValueError("reference statistics requested without a reference model")
        ref = reference_hidden(reference, input_ids, attention_mask, labels, reference_context)
    hidden = final_hidden(model, input_ids, attention_mask)
    return stats_from_hidden(hidden, Head.of(model), attention_mask, labels, reference=ref, req=req,
                             chunk_size=chunk_size, recompute=recompute, group_size=group_size)

"""Per-sequence statistics of responses under a policy (and its reference), computed only at
response positions and in chunks of tokens.

The backbone runs once over the whole padded batch; the LM head runs only on the hidden states
of response positions, `chunk_size` tokens at a time. Everything that needs the full vocabulary
(log-softmax, the token-level KL of TDPO, the logit mixtures of ε-DPO) lives inside one chunk, so
no [batch, length, vocab] tensor of either model ever exists. With `recompute=True` the backward
pass recomputes each chunk's logits from the saved hidden states instead of keeping them
(the memory-lean path of specs/tdpo.md §1.8); with `recompute=False` it keeps them (faster when
memory is not the constraint). Softmax maths is always float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def _f32(x: Tensor) -> Tensor:
    """At least float32: bf16/fp16 logits are upcast, float64 (tests) kept."""
    return x if x.dtype == torch.float64 else x.float()


# Logits per chunk when the chunk size is automatic: each [tokens, vocab] float32 tensor of a chunk
# stays near 256 MB whatever the vocabulary (1,334 tokens at 50k, 523 at 128k, everything at 128).
CHUNK_ELEMENTS = 2**26


def chunk_tokens(chunk_size: int | None, vocab: int) -> int:
    """Response tokens per LM-head chunk: `chunk_size`, or (None) CHUNK_ELEMENTS // vocab."""
    return int(chunk_size) if chunk_size else max(1, CHUNK_ELEMENTS // max(1, vocab))


def chunk_setting(value: int | str) -> int | None:
    """hardware.logprob_chunk: a positive number of tokens, or auto (None)."""
    if str(value).lower() == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        from prefkit.errors import UserError

        raise UserError(f"hardware.logprob_chunk must be auto or a positive number of tokens, not {value!r}")
    return value


def _logits(head: Head, hidden: Tensor, temperature: float) -> Tensor:
    """Float32 logits / τ (no division at τ = 1: a full pass over [M, V] saved)."""
    z = _f32(head(hidden))
    return z if temperature == 1.0 else z / temperature


@dataclass(frozen=True)
class TokenRequest:
    """What an objective needs computed at each response token, beyond the policy's log-prob."""

    temperature: float = 1.0  # logits / τ for both models (EXO's τ = 0.8)
    kl: bool = False  # KL(π_ref ‖ π_θ) over the vocabulary, differentiable (TDPO's sequential KL)
    reverse_kl: bool = False  # KL(π_θ ‖ π_ref), no gradient (logging, sample-stage KL)
    entropy: bool = False  # H(π_θ), no gradient
    mixtures: tuple[float, ...] = ()  # λ: log softmax(λ f_θ + (1-λ) f_ref)[y], no gradient (ε-DPO)
    mixture_dtype: torch.dtype = torch.float32  # dtype of the mixture arithmetic (ε-DPO's perturb_dtype)

    @property
    def needs_reference_logits(self) -> bool:
        return self.kl or self.reverse_kl or bool(self.mixtures)


@dataclass
class SequenceStats:
    """Per-sequence sums over response tokens; all tensors are [N]."""

    logps: Tensor  # Σ_t log π_θ(y_t | s_t), differentiable
    lengths: Tensor  # response tokens per sequence
    ref_logps: Tensor | None = None  # Σ_t log π_ref(y_t | s_t)
    kl: Tensor | None = None  # Σ_t KL(π_ref ‖ π_θ)(s_t), differentiable
    reverse_kl: Tensor | None = None  # Σ_t KL(π_θ ‖ π_ref)(s_t)
    entropy: Tensor | None = None  # Σ_t H(π_θ(· | s_t))
    mixture_logps: dict[float, Tensor] = field(default_factory=dict)
    last_hidden: Tensor | None = None  # [N, H] final hidden state at each sequence's last token


@dataclass
class Head:
    """An LM head as a function of hidden states: linear layer plus the model's own logit
    post-processing (scale, soft-capping), so numbers match the model's forward exactly."""

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    module: nn.Module | None = None  # when set, called instead of F.linear (sharding engines hook the call)

    def __call__(self, hidden: Tensor) -> Tensor:
        logits = self.module(hidden) if self.module is not None else F.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def vocab(self) -> int:
        return int(getattr(self.module, "out_features", 0) or self.weight.shape[0])

    @classmethod
    def identity(cls, vocab: int) -> Head:
        """For rows that already are logits (e.g. kept from generation)."""
        return cls(torch.empty(vocab, 0), module=nn.Identity())

    @classmethod
    def of(cls, model: nn.Module) -> Head:
        linear = model.get_output_embeddings()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        scale = getattr(config, "logit_scale", None) or 1.0
        return cls(linear.weight, getattr(linear, "bias", None), float(scale),
                   getattr(config, "final_logit_softcapping", None), linear)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under the LM head (PEFT wrappers unwrapped, adapters kept)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model.base_model


# --- per-chunk maths ---------------------------------------------------------------------------

def _ref_chunk(sl: slice, temperature: float, ref_hidden: Tensor | None, ref_head: Head | None,
               ref_logprobs: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(reference logits, reference log-softmax) of one chunk, from the reference's hidden states
    and head, or from log-softmax rows computed beforehand (sharded engines). Log-softmax rows
    serve as logits too: a per-position constant cancels wherever logits are used (mixtures)."""
    if ref_logprobs is not None:
        rows = _f32(ref_logprobs[sl])
        return rows, rows
    if ref_head is None:
        return None, None
    zr = _logits(ref_head, ref_hidden[sl], temperature)
    return zr, torch.log_softmax(zr, dim=-1)


def _chunk_differentiable(z: Tensor, targets: Tensor, ref_logp_full: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """log π(y) and (if a reference is given) KL(π_ref ‖ π), from float32 logits z of one chunk."""
    if ref_logp_full is None:  # fused log-softmax + gather, forward and backward
        return -F.cross_entropy(z, targets, reduction="none"), None
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    # Σ_v p_ref (log p_ref − log p_θ), with log p_θ = z − lse; never softmax().log() (0·log 0 = NaN).
    p_ref = ref_logp_full.exp()
    kl = (p_ref * ref_logp_full).sum(-1) - (p_ref * z).sum(-1) + lse
    return logp, kl


def _chunk_extras(z: Tensor, targets: Tensor, zr: Tensor | None, ref_logp_full: Tensor | None,
                  req: TokenRequest) -> dict[str, Tensor]:
    """No-gradient statistics of one chunk: reference log-prob, reverse KL, entropy, mixtures."""
    out: dict[str, Tensor] = {}
    if req.reverse_kl or req.entropy:
        logp_full = torch.log_softmax(z, dim=-1)
        p = logp_full.exp()
        if req.entropy:
            out["entropy"] = -(p * logp_full).sum(-1)
        if req.reverse_kl and ref_logp_full is not None:
            out["reverse_kl"] = (p * (logp_full - ref_logp_full)).sum(-1)
    if ref_logp_full is not None:
        out["ref_logps"] = ref_logp_full.gather(-1, targets[:, None]).squeeze(-1)
    for lam in req.mixtures:
        # λ z + (1−λ) z_ref, written so that it is exactly z when the policy equals the reference
        # (ε-DPO's strict comparisons must then all tie: every pair keeps β at step 0)
        zm = z.to(req.mixture_dtype)
        mix = zm + (lam - 1.0) * (zm - zr.to(req.mixture_dtype))
        out[f"mix{lam}"] = -F.cross_entropy(mix, targets, reduction="none")  # the policy's own formula
    return out


class _RecomputedTokenStats(torch.autograd.Function):
    """Token log-probs (and forward KL) whose backward recomputes each chunk's logits from the
    saved hidden states: the memory held between forward and backward is O(tokens × hidden)."""

    @staticmethod
    def forward(ctx, hidden, targets, ref_hidden, head, ref_head, temperature, want_kl, chunk, req, extras_out,
                ref_logprobs, *head_params):
        ctx.head, ctx.ref_head, ctx.temperature, ctx.want_kl, ctx.chunk = head, ref_head, temperature, want_kl, chunk
        ctx.ref_logprobs = ref_logprobs
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type), hidden.device.type)
        ctx.save_for_backward(hidden, targets, ref_hidden if ref_hidden is not None else hidden.new_empty(0))
        logps, kls = [], []
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            z = _logits(head, hidden[sl], temperature)
            zr, ref_logp_full = _ref_chunk(sl, temperature, ref_hidden, ref_head, ref_logprobs)
            lp, kl = _chunk_differentiable(z, targets[sl], ref_logp_full if want_kl else None)
            logps.append(lp)
            if want_kl:
                kls.append(kl)
            for key, val in _chunk_extras(z, targets[sl], zr, ref_logp_full, req).items():
                extras_out.setdefault(key, []).append(val)
        logp = torch.cat(logps)
        kl = torch.cat(kls) if want_kl else torch.zeros_like(logp)
        return logp, kl

    @staticmethod
    def backward(ctx, grad_logp, grad_kl):
        hidden, targets, ref_hidden = ctx.saved_tensors
        head, ref_head = ctx.head, ctx.ref_head
        params = [p for p in (head.weight, head.bias) if p is not None]
        trainable = [p for p in params if p.requires_grad]
        grad_hidden = torch.zeros_like(hidden)
        grad_params = {id(p): torch.zeros_like(p) for p in trainable}
        enabled, dtype, device_type = ctx.autocast
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h = hidden[sl].detach().requires_grad_(True)
                ref_logp_full = None
                if ctx.want_kl:
                    with torch.no_grad():
                        ref_logp_full = _ref_chunk(sl, ctx.temperature, ref_hidden, ref_head, ctx.ref_logprobs)[1]
                z = _logits(head, h, ctx.temperature)
                lp, kl = _chunk_differentiable(z, targets[sl], ref_logp_full)
                total = (grad_logp[sl] * lp).sum()
                if kl is not None:
                    total = total + (grad_kl[sl] * kl).sum()
            grads = torch.autograd.grad(total, [h, *trainable], allow_unused=True)
            grad_hidden[sl] = grads[0]
            for p, g in zip(trainable, grads[1:], strict=True):
                if g is not None:
                    grad_params[id(p)] += g
        # One gradient slot per forward input: hidden, targets, ref_hidden, head, ref_head, temperature,
        # want_kl, chunk, req, extras_out, ref_logprobs, *head_params.
        param_grads = [grad_params.get(id(p)) for p in params]
        return (grad_hidden, None, None, None, None, None, None, None, None, None, None, *param_grads)


def token_stats(hidden: Tensor, targets: Tensor, head: Head, *, ref_hidden: Tensor | None = None,
                ref_head: Head | None = None, ref_logprobs: Tensor | None = None,
                req: TokenRequest = TokenRequest(), chunk_size: int | None = None,
                recompute: bool = True) -> dict[str, Tensor]:
    """Per-token statistics for response hidden states [M, H] and their next tokens [M]. The
    reference comes as its hidden states and head, or as log-softmax rows [M, V]."""
    want_kl = req.kl
    if (want_kl or req.needs_reference_logits) and ref_head is None and ref_logprobs is None:
        raise ValueError("this request needs the reference model's logits")
    extras: dict[str, list[Tensor]] = {}
    chunk_size = chunk_tokens(chunk_size, head.vocab)
    if recompute:
        params = [p for p in (head.weight, head.bias) if p is not None]
        logp, kl = _RecomputedTokenStats.apply(hidden, targets, ref_hidden, head, ref_head, req.temperature,
                                               want_kl, chunk_size, req, extras, ref_logprobs, *params)
    else:
        logps, kls = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            z = _logits(head, hidden[sl], req.temperature)
            with torch.no_grad():
                zr, ref_logp_full = _ref_chunk(sl, req.temperature, ref_hidden, ref_head, ref_logprobs)
            lp, k = _chunk_differentiable(z, targets[sl], ref_logp_full if want_kl else None)
            logps.append(lp)
            kls.append(k)
            with torch.no_grad():
                for key, val in _chunk_extras(z.detach(), targets[sl], zr, ref_logp_full, req).items():
                    extras.setdefault(key, []).append(val)
        logp = torch.cat(logps)
        kl = torch.cat(kls) if want_kl else None
    out = {"logps": logp}
    if want_kl:
        out["kl"] = kl
    out.update({k: torch.cat(v) for k, v in extras.items()})
    return out


# --- batches of sequences ----------------------------------------------------------------------

def response_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, next token) of every position whose next token is a response token."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


@dataclass
class Reference:
    """What the policy's statistics need from the reference at the response positions: its final
    hidden states and LM head (recomputed chunk by chunk), or, under a sharding engine whose
    weights exist only inside a forward, its log-softmax rows computed there."""

    hidden: Tensor | None = None  # [M, H]
    head: Head | None = None
    logprobs: Tensor | None = None  # [M, V] log-softmax (at the loss temperature)


@torch.no_grad()
def reference_hidden(reference: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     context: Callable | None = None) -> Reference:
    """Run the frozen reference once; `context` (e.g. peft's disable_adapter) makes the policy
    itself the reference."""
    rows, cols, _ = response_positions(labels)
    with context() if context else _null():
        hidden = final_hidden(reference, input_ids, attention_mask)[rows, cols]
        head = Head.of(reference)
    detached = Head(head.weight.detach(), None if head.bias is None else head.bias.detach(), head.scale, head.softcap)
    return Reference(hidden, detached)


class ReferenceModule(nn.Module):
    """The frozen reference as a module, for sharding engines (FSDP, DeepSpeed ZeRO-3): its
    forward gathers the weights, so everything that needs them happens inside it and it returns
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
        chunk_size = chunk_tokens(chunk_size, head.vocab)
        out = torch.cat([torch.log_softmax(_logits(head, hidden[s:s + chunk_size], temperature), dim=-1)
                         for s in range(0, hidden.shape[0], chunk_size)])
        return Reference(logprobs=out)


def sum_by_sequence(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """[n] sums of per-token `values` by their sequence `rows`. Sums of hundreds of log-probs of
    ~-10 lose ~1e-4 in float32, and the objectives subtract two such sums (policy − reference):
    accumulated in float64 (MPS has none)."""
    acc = torch.float32 if values.device.type == "mps" else torch.float64
    return torch.zeros(n, dtype=acc, device=values.device).index_add(0, rows, values.to(acc))


def stats_from_hidden(hidden: Tensor, model: nn.Module, attention_mask: Tensor, labels: Tensor, *,
                      reference: Reference | None = None, req: TokenRequest = TokenRequest(),
                      chunk_size: int | None = None, recompute: bool = True,
                      head: Head | None = None) -> SequenceStats:
    """Per-sequence sums from the policy's final hidden states [N, T, H], or from rows [M, ·]
    already at the response positions in row-major order (with `head`, e.g. Head.identity for
    logits; no last_hidden then)."""
    n = labels.shape[0]
    rows, cols, targets = response_positions(labels)
    at_positions = hidden.dim() == 2
    per_token = token_stats(hidden if at_positions else hidden[rows, cols], targets, head or Head.of(model),
                            ref_hidden=reference.hidden if reference else None,
                            ref_head=reference.head if reference else None,
                            ref_logprobs=reference.logprobs if reference else None, req=req,
                            chunk_size=chunk_size, recompute=recompute)

    def seq_sum(values: Tensor) -> Tensor:
        return sum_by_sequence(values, rows, n)

    stats = SequenceStats(logps=seq_sum(per_token["logps"]),
                          lengths=torch.zeros(n, dtype=torch.long, device=labels.device).index_add(
                              0, rows, torch.ones_like(rows)))
    for key in ("ref_logps", "kl", "reverse_kl", "entropy"):
        if key in per_token:
            setattr(stats, key, seq_sum(per_token[key]))
    stats.mixture_logps = {lam: seq_sum(per_token[f"mix{lam}"]) for lam in req.mixtures}
    if not at_positions:
        last = attention_mask.sum(-1) - 1  # right padding
        stats.last_hidden = hidden[torch.arange(n, device=hidden.device), last]
    return stats


def sequence_stats(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                   reference: nn.Module | None = None, req: TokenRequest = TokenRequest(),
                   want_ref_logps: bool = False, chunk_size: int | None = None, recompute: bool = True,
                   reference_context: Callable | None = None) -> SequenceStats:
    """Statistics of every sequence's response tokens (labels != -100) under `model` (and, for
    reference log-probs or any reference-logit statistic, under `reference`)."""
    ref = None
    if want_ref_logps or req.needs_reference_logits:
        if reference is None:
            raise ValueError("reference statistics requested without a reference model")
        ref = reference_hidden(reference, input_ids, attention_mask, labels, reference_context)
    hidden = final_hidden(model, input_ids, attention_mask)
    return stats_from_hidden(hidden, model, attention_mask, labels, reference=ref, req=req,
                             chunk_size=chunk_size, recompute=recompute)


class PolicyModule(nn.Module):
    """What the trainer optimises: a causal LM, optionally with a scalar reward head on its last
    hidden state (DRDO's student, reward models). Its forward returns SequenceStats, so the
    whole computation runs inside one module call (as DDP and FSDP require)."""

    def __init__(self, lm: nn.Module, reward_head: bool = False):
        super().__init__()
        self.lm = lm
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.reward_head = nn.Linear(config.hidden_size, 1) if reward_head else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                reference: Reference | None = None, req: TokenRequest = TokenRequest(), chunk_size: int | None = None,
                recompute: bool = True) -> tuple[SequenceStats, Tensor | None]:
        hidden = final_hidden(self.lm, input_ids, attention_mask)
        stats = stats_from_hidden(hidden, self.lm, attention_mask, labels, reference=reference, req=req,
                                  chunk_size=chunk_size, recompute=recompute)
        rewards = None
        if self.reward_head is not None:
            rewards = self.reward_head(stats.last_hidden.to(self.reward_head.weight.dtype)).squeeze(-1)
        return stats, rewards


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

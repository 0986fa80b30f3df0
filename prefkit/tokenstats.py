"""Per-token and per-sequence statistics of responses, from hidden states: the chunked maths.

The LM head runs only on the hidden states of response positions, `chunk` tokens at a time.
Everything that needs the full vocabulary (log-softmax, the token-level KL of TDPO, the logit
mixtures of ε-DPO, WPO's log Σ p²) lives inside one chunk, so no [batch, length, vocab] tensor of
either model ever exists. With `recompute=True` the backward pass recomputes each chunk's logits from the
saved hidden states instead of keeping them (memory O(tokens × hidden) between forward and
backward; TDPO's closed-form gradient, Zeng et al. 2024, Appendix A); with `recompute=False` it
keeps them (faster when memory is not the constraint). Softmax maths is at least float32;
sequence sums are float64.

Pure tensor code: the models that produce hidden states live in prefkit.modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefkit.data import IGNORE

# Logits per chunk when the chunk size is automatic: each [tokens, vocab] float32 tensor of a chunk
# stays near 256 MB whatever the vocabulary (1,334 tokens at 50k, 523 at 128k, everything at 128).
CHUNK_ELEMENTS = 2**26
# hardware.recompute_lm_head=auto keeps a micro-batch's chunk logits for backward (faster) when its
# response tokens × vocabulary stay below this: about 1 GiB kept in float32 for TDPO's KL
KEEP_LOGITS_ELEMENTS = 2**27


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


@dataclass(frozen=True)
class TokenRequest:
    """What an objective needs computed at each response token, beyond the policy's log-prob."""

    temperature: float = 1.0  # logits / τ for both models (EXO's τ = 0.8)
    kl: bool = False  # KL(π_ref ‖ π_θ) over the vocabulary, differentiable (TDPO's sequential KL)
    reverse_kl: bool = False  # KL(π_θ ‖ π_ref), no gradient (logging, sample-stage KL)
    entropy: bool = False  # H(π_θ), no gradient
    mixtures: tuple[float, ...] = ()  # λ: log softmax(λ f_θ + (1-λ) f_ref)[y], no gradient (ε-DPO)
    # float32: exact maths; bfloat16: the official ε-DPO code's arithmetic (every step in bf16)
    mixture_dtype: torch.dtype = torch.float32
    # log Σ_v π_θ(v|s_t)², no gradient: the chance that two of the policy's samples agree (WPO's weights)
    log_sum_sq_probs: bool = False
    # the log-prob sums (policy, differentiable, and reference) over each group's shared prefix: the
    # first min_k |y_k| response tokens of the K completions of a prompt (LD-DPO's public length)
    shared_prefix: bool = False

    @property
    def needs_reference_logits(self) -> bool:
        return self.kl or self.reverse_kl or bool(self.mixtures)


LOGPS_ONLY = TokenRequest()  # the policy's log-probs and nothing more


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

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def detached(self) -> Head:
        return Head(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.scale, self.softcap)

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


@dataclass
class Reference:
    """What the statistics need from the reference at the response positions: its final hidden
    states and LM head (its logits are recomputed chunk by chunk), or, under a sharding engine whose
    weights exist only inside a forward, its log-softmax rows computed there."""

    hidden: Tensor | None = None  # [M, H]
    head: Head | None = None
    logprobs: Tensor | None = None  # [M, V] log-softmax (at the loss temperature)

    def chunk(self, sl: slice, temperature: float) -> tuple[Tensor, Tensor]:
        """(logits, log-softmax) of one chunk. Log-softmax rows serve as logits too: a per-position
        constant cancels wherever logits are used (mixtures)."""
        if self.logprobs is not None:
            rows = _f32(self.logprobs[sl])
            return rows, rows
        zr = tempered_logits(self.head, self.hidden[sl], temperature)
        return zr, torch.log_softmax(zr, dim=-1)


def _f32(x: Tensor) -> Tensor:
    """At least float32: bf16/fp16 logits are upcast, float64 (tests) kept."""
    return x if x.dtype == torch.float64 else x.float()


def tempered_logits(head: Head, hidden: Tensor, temperature: float) -> Tensor:
    """Float32 logits / τ (no division at τ = 1: a full pass over [M, V] saved)."""
    z = _f32(head(hidden))
    return z if temperature == 1.0 else z / temperature


# --- one chunk ---------------------------------------------------------------------------------

def _differentiable(z: Tensor, targets: Tensor, ref_logp_full: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """log π(y) and (if a reference is given) KL(π_ref ‖ π), from float32 logits z of one chunk."""
    if ref_logp_full is None:  # fused log-softmax + gather, forward and backward
        return -F.cross_entropy(z, targets, reduction="none"), None
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    # Σ_v p_ref (log p_ref − log p_θ), with log p_θ = z − lse; never softmax().log() (0·log 0 = NaN).
    p_ref = ref_logp_full.exp()
    kl = (p_ref * ref_logp_full).sum(-1) - (p_ref * z).sum(-1) + lse
    return logp, kl


def mixture_logps(z: Tensor, zr: Tensor, targets: Tensor, lam: float, dtype: torch.dtype) -> Tensor:
    """log softmax(λ f_θ + (1 − λ) f_ref)[y] per token (ε-DPO's estimate of the policy at β/λ).

    float32 (or float64): written so that it is exactly the policy's own log-prob when the policy
    equals the reference (ε-DPO's strict comparisons must then all tie). bfloat16/float16: the
    official code's arithmetic, op by op in that dtype: (1 ± ε)·logits ∓ ε·ref_logits, then
    log_softmax and gather, each result rounded to the dtype."""
    if dtype in (torch.float32, torch.float64):
        zm = z.to(dtype)
        mix = zm + (lam - 1.0) * (zm - zr.to(dtype))
        return -F.cross_entropy(mix, targets, reduction="none")  # the policy's own formula
    zb = z.to(dtype)
    mix = zb if lam == 1.0 else lam * zb + (1.0 - lam) * zr.to(dtype)
    return torch.log_softmax(mix, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _extras(z: Tensor, targets: Tensor, zr: Tensor | None, ref_logp_full: Tensor | None,
            req: TokenRequest) -> dict[str, Tensor]:
    """No-gradient statistics of one chunk: reference log-prob, reverse KL, entropy, log Σ p²,
    mixtures."""
    out: dict[str, Tensor] = {}
    if req.reverse_kl or req.entropy or req.log_sum_sq_probs:
        logp_full = torch.log_softmax(z, dim=-1)
        if req.log_sum_sq_probs:  # log Σ_v p_v² = logsumexp(2 log p): no p² underflow
            out["log_sum_sq_probs"] = torch.logsumexp(2 * logp_full, dim=-1)
        p = logp_full.exp() if req.reverse_kl or req.entropy else None
        if req.entropy:
            out["entropy"] = -(p * logp_full).sum(-1)
        if req.reverse_kl and ref_logp_full is not None:
            out["reverse_kl"] = (p * (logp_full - ref_logp_full)).sum(-1)
    if ref_logp_full is not None:
        out["ref_logps"] = ref_logp_full.gather(-1, targets[:, None]).squeeze(-1)
    for lam in req.mixtures:
        out[f"mix{lam}"] = mixture_logps(z, zr, targets, lam, req.mixture_dtype)
    return out


# --- every chunk -------------------------------------------------------------------------------

@dataclass
class Pass:
    """One pass over the response tokens: the head, the reference, what to compute, the chunk
    size, and where the no-gradient statistics land (filled by the forward)."""

    head: Head
    reference: Reference | None
    req: TokenRequest
    chunk: int
    extras: dict[str, list[Tensor]] = field(default_factory=dict)

    def slices(self, n: int) -> list[slice]:
        return [slice(start, start + self.chunk) for start in range(0, n, self.chunk)]

    def ref_chunk(self, sl: slice) -> tuple[Tensor | None, Tensor | None]:
        if self.reference is None:
            return None, None
        with torch.no_grad():
            return self.reference.chunk(sl, self.req.temperature)


def _forward(hidden: Tensor, targets: Tensor, p: Pass) -> tuple[Tensor, Tensor | None]:
    """The chunk loop: log-probs (and forward KLs), with gradient wherever autograd records."""
    logps, kls = [], []
    for sl in p.slices(hidden.shape[0]):
        z = tempered_logits(p.head, hidden[sl], p.req.temperature)
        zr, ref_full = p.ref_chunk(sl)
        lp, kl = _differentiable(z, targets[sl], ref_full if p.req.kl else None)
        logps.append(lp)
        kls.append(kl)
        with torch.no_grad():
            for key, val in _extras(z.detach(), targets[sl], zr, ref_full, p.req).items():
                p.extras.setdefault(key, []).append(val)
    return torch.cat(logps), torch.cat(kls) if p.req.kl else None


class _Recomputed(torch.autograd.Function):
    """The chunk loop without keeping any chunk's logits: backward recomputes them from the saved
    hidden states, one chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, targets, p: Pass, *head_params):
        ctx.p = p
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type), hidden.device.type)
        ctx.save_for_backward(hidden, targets)
        logp, kl = _forward(hidden, targets, p)
        return logp, kl if kl is not None else torch.zeros_like(logp)

    @staticmethod
    def backward(ctx, grad_logp, grad_kl):
        hidden, targets = ctx.saved_tensors
        p: Pass = ctx.p
        params = p.head.params
        trainable = [q for q in params if q.requires_grad]
        grad_hidden = torch.zeros_like(hidden)
        grad_params = {id(q): torch.zeros_like(q) for q in trainable}
        enabled, dtype, device_type = ctx.autocast
        for sl in p.slices(hidden.shape[0]):
            ref_full = p.ref_chunk(sl)[1] if p.req.kl else None
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h = hidden[sl].detach().requires_grad_(True)
                lp, kl = _differentiable(tempered_logits(p.head, h, p.req.temperature), targets[sl], ref_full)
                total = (grad_logp[sl] * lp).sum() + ((grad_kl[sl] * kl).sum() if kl is not None else 0.0)
            grads = torch.autograd.grad(total, [h, *trainable], allow_unused=True)
            grad_hidden[sl] = grads[0]
            for q, g in zip(trainable, grads[1:], strict=True):
                if g is not None:
                    grad_params[id(q)] += g
        # one gradient slot per forward input: hidden, targets, p, *head_params
        return (grad_hidden, None, None, *[grad_params.get(id(q)) for q in params])


def token_stats(hidden: Tensor, targets: Tensor, head: Head, *, reference: Reference | None = None,
                req: TokenRequest = LOGPS_ONLY, chunk_size: int | None = None,
                recompute: bool = True) -> dict[str, Tensor]:
    """Per-token statistics for response hidden states [M, H] and their next tokens [M]:
    "logps" (and "kl") with gradient; "ref_logps", "reverse_kl", "entropy", "log_sum_sq_probs",
    "mix<λ>" without."""
    if req.needs_reference_logits and reference is None:
        raise ValueError("this request needs the reference model's logits")
    p = Pass(head, reference, req, chunk_tokens(chunk_size, head.vocab))
    if recompute:
        logp, kl = _Recomputed.apply(hidden, targets, p, *head.params)
    else:
        logp, kl = _forward(hidden, targets, p)
    out = {"logps": logp, **({"kl": kl} if req.kl else {})}
    out.update({k: torch.cat(v) for k, v in p.extras.items()})
    return out


# --- sequences ---------------------------------------------------------------------------------

@dataclass
class SequenceStats:
    """Per-sequence sums over response tokens; all tensors are [N]."""

    logps: Tensor  # Σ_t log π_θ(y_t | s_t), differentiable
    lengths: Tensor  # response tokens per sequence
    ref_logps: Tensor | None = None  # Σ_t log π_ref(y_t | s_t)
    kl: Tensor | None = None  # Σ_t KL(π_ref ‖ π_θ)(s_t), differentiable
    reverse_kl: Tensor | None = None  # Σ_t KL(π_θ ‖ π_ref)(s_t)
    entropy: Tensor | None = None  # Σ_t H(π_θ(· | s_t))
    log_sum_sq_probs: Tensor | None = None  # Σ_t log Σ_v π_θ(v | s_t)²
    prefix_logps: Tensor | None = None  # Σ_{t ≤ m} log π_θ(y_t | s_t), m its group's shared length, differentiable
    ref_prefix_logps: Tensor | None = None  # the same sum under π_ref
    mixture_logps: dict[float, Tensor] = field(default_factory=dict)
    last_hidden: Tensor | None = None  # [N, H] final hidden state at each sequence's last token


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, next token) of every position whose next token is a response token."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def sum_by_sequence(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """[n] sums of per-token `values` by their sequence `rows`. Sums of hundreds of log-probs of
    ~-10 lose ~1e-4 in float32, and the objectives subtract two such sums (policy − reference):
    accumulated in float64 (MPS has none). Values in a reduced dtype (the official ε-DPO
    arithmetic) are summed in float32 and the sum rounded back to that dtype, as torch sums them."""
    if values.dtype in (torch.bfloat16, torch.float16):
        return torch.zeros(n, dtype=torch.float32, device=values.device).index_add(
            0, rows, values.float()).to(values.dtype)
    acc = torch.float32 if values.device.type == "mps" else torch.float64
    return torch.zeros(n, dtype=acc, device=values.device).index_add(0, rows, values.to(acc))


def shared_prefix(rows: Tensor, lengths: Tensor, group_size: int) -> Tensor:
    """[M] bool: whether each response token (row-major order, `rows` its sequence) lies in its
    group's shared prefix, the first min_k |y_k| response tokens, the K = `group_size`
    consecutive sequences of a prompt taken together (LD-DPO's public length)."""
    if lengths.shape[0] % group_size:
        raise ValueError(f"{lengths.shape[0]} sequences do not form groups of {group_size}")
    shared = lengths.view(-1, group_size).min(dim=1).values.repeat_interleave(group_size)
    start = torch.cumsum(lengths, 0) - lengths  # each sequence's first response token, in row-major order
    rank = torch.arange(rows.shape[0], device=rows.device) - start[rows]  # 0, 1, ... within its sequence
    return rank < shared[rows]


def stats_from_hidden(hidden: Tensor, head: Head, attention_mask: Tensor, labels: Tensor, *,
                      reference: Reference | None = None, req: TokenRequest = LOGPS_ONLY,
                      chunk_size: int | None = None, recompute: bool = True,
                      group_size: int | None = None) -> SequenceStats:
    """Per-sequence sums from the final hidden states [N, T, H], or from rows [M, ·] already at the
    response positions in row-major order (e.g. logits kept from generation, with
    Head.identity; no last_hidden then). `group_size`: consecutive sequences that are one
    prompt's completions (needed for `req.shared_prefix`)."""
    n = labels.shape[0]
    rows, cols, targets = response_positions(labels)
    at_positions = hidden.dim() == 2
    per_token = token_stats(hidden if at_positions else hidden[rows, cols], targets, head, reference=reference,
                            req=req, chunk_size=chunk_size, recompute=recompute)
    stats = SequenceStats(logps=sum_by_sequence(per_token["logps"], rows, n),
                          lengths=torch.zeros(n, dtype=torch.long, device=labels.device).index_add(
                              0, rows, torch.ones_like(rows)))
    for key in ("ref_logps", "kl", "reverse_kl", "entropy", "log_sum_sq_probs"):
        if key in per_token:
            setattr(stats, key, sum_by_sequence(per_token[key], rows, n))
    if req.shared_prefix:
        if not group_size:
            raise ValueError("shared-prefix sums need the group size")
        keep = shared_prefix(rows, stats.lengths, group_size)
        stats.prefix_logps = sum_by_sequence(per_token["logps"][keep], rows[keep], n)
        if "ref_logps" in per_token:
            stats.ref_prefix_logps = sum_by_sequence(per_token["ref_logps"][keep], rows[keep], n)
    stats.mixture_logps = {lam: sum_by_sequence(per_token[f"mix{lam}"], rows, n) for lam in req.mixtures}
    if not at_positions:
        last = attention_mask.sum(-1) - 1  # right padding
        stats.last_hidden = hidden[torch.arange(n, device=hidden.device), last]
    return stats

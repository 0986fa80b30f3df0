"""The optimal KL-regularised policy π*_β ∝ π_ref·exp(r/β) (the policy every objective of the
DPO family aims at; Rafailov et al. 2023, Eq. 4), estimated from samples of any proposal π by
self-normalised importance sampling (SNIS), as Ji et al. 2024 estimate density ratios (§4.1).

Per prompt, with samples y_i ~ π, their rewards r_i and log-ratios d_i = log π(y_i) − log π_ref(y_i)
(0 when π is the reference), the weights are w = softmax(r/β − d) and
    reward* = Σ_i w_i r_i,   KL(π*‖π_ref) = Σ_i w_i r_i/β − log Ẑ,   log Ẑ = logsumexp(r/β − d) − log m,
which is Σ_i w_i (log(m w_i) + d_i); ESS = 1/Σ_i w_i². From reference samples the KL cannot pass
log m; from the samples of a policy that is itself far from the reference it can, so the frontier
uses, at each β, the proposal (the reference or any sampled policy) whose estimate has the largest
effective sample size among those whose ESS clears their own threshold (see `summarise`): a
proposal with few samples close to π*_β is preferred to one with many samples far from it.
(Combining proposals, e.g. with the balance heuristic, would need every
policy's log-probability of every other policy's samples: one more forward pass per pair of
policies, which this does not pay for.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prefkit.estimators import ragged


@dataclass(frozen=True)
class OptimalPoint:
    """SNIS estimate of π*_β: its reward and KL(π*‖π_ref) (means over prompts), the effective
    sample size (mean and min over prompts), whether the mean ESS fell below the threshold (then
    the point is unreliable: hollow in the plot, and no gap is measured against it), and which
    proposal's samples it comes from."""

    beta: float
    reward: float
    kl: float
    ess: float
    ess_min: float
    low_ess: bool
    ess_threshold: float
    n_prompts: int
    m: float  # mean number of samples per prompt
    proposal: str = "reference"


@dataclass
class PerPrompt:
    """One proposal's estimates at one β, prompt by prompt (for CIs that resample prompts)."""

    reward: np.ndarray
    kl: np.ndarray
    ess: np.ndarray
    m: np.ndarray


def per_prompt(rewards_by_prompt: Sequence[Sequence[float]], beta: float,
               log_ratios_by_prompt: Sequence[Sequence[float]] | None = None) -> PerPrompt:
    """The SNIS estimates of π*_β for every prompt (see the module docstring). `beta` > 0, +inf
    allowed (π* = π_ref). Stable for any β: weights from a log-sum-exp, 0·log 0 taken as 0."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (inf allowed), got {beta}")
    padded, mask, counts = ragged(rewards_by_prompt)
    d = np.zeros_like(padded) if log_ratios_by_prompt is None else ragged(log_ratios_by_prompt, "log_ratios")[0]
    if d.shape != padded.shape:
        raise ValueError("log_ratios_by_prompt must have one value per reward")
    m = counts.astype(np.float64)
    rmax = np.max(np.where(mask, padded, -np.inf), axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # r/β − d shifted by r_max/β: finite for any β (−inf where a tiny β overflows)
        z = np.where(mask, (padded - rmax) / beta - d, -np.inf)
    z = z - np.max(z, axis=1, keepdims=True)  # max 0: the sum below is ≥ 1
    logw = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    w = np.exp(logw)
    with np.errstate(invalid="ignore"):
        kl_terms = np.where(w > 0, w * (logw + np.log(m)[:, None] + d), 0.0)
    reward = np.sum(np.where(mask, w * padded, 0.0), axis=1)
    kl = np.maximum(np.sum(kl_terms, axis=1), 0.0)  # a KL; small negative values are estimation noise
    if log_ratios_by_prompt is None:
        kl = np.minimum(kl, np.log(m))  # from the reference's own samples: exactly ≤ log m
    return PerPrompt(reward, kl, 1.0 / np.sum(w**2, axis=1), m)


def summarise(est: PerPrompt, beta: float, ess_threshold: float | None = None,
              proposal: str = "reference") -> OptimalPoint:
    """Means over prompts. `ess_threshold` defaults to max(0.1·m̄, 2) (m̄ = mean samples per prompt):
    below it the estimate leans on fewer than a tenth of the samples (the second-order Rényi
    divergence between π*_β and the proposal exceeds ≈ log 10), or on fewer than two, where a
    self-normalised estimate is little more than the best sample drawn."""
    threshold = max(0.1 * float(est.m.mean()), 2.0) if ess_threshold is None else float(ess_threshold)
    return OptimalPoint(beta=float(beta), reward=float(est.reward.mean()), kl=float(est.kl.mean()),
                        ess=float(est.ess.mean()), ess_min=float(est.ess.min()),
                        low_ess=bool(est.ess.mean() < threshold), ess_threshold=threshold,
                        n_prompts=len(est.m), m=float(est.m.mean()), proposal=proposal)


def optimal_point(rewards_by_prompt: Sequence[Sequence[float]], beta: float, ess_threshold: float | None = None,
                  log_ratios_by_prompt: Sequence[Sequence[float]] | None = None,
                  proposal: str = "reference") -> OptimalPoint:
    """π*_β estimated from one proposal's samples (the reference's when `log_ratios_by_prompt` is None)."""
    return summarise(per_prompt(rewards_by_prompt, beta, log_ratios_by_prompt), beta, ess_threshold, proposal)


def optimal_frontier(rewards_by_prompt: Sequence[Sequence[float]], betas: Sequence[float],
                     ess_threshold: float | None = None) -> list[OptimalPoint]:
    """`optimal_point` for each β from the reference's samples, sorted by KL (then reward).
    Include β = inf for the KL = 0 end and a small β for the far end."""
    points = [optimal_point(rewards_by_prompt, b, ess_threshold) for b in betas]
    return sorted(points, key=lambda p: (p.kl, p.reward))


@dataclass
class Proposal:
    """A sampled policy's samples, by prompt (the same prompts, in the same order, for every proposal)."""

    name: str
    rewards: list[list[float]]
    log_ratios: list[list[float]] | None  # None: the reference itself


def best_proposal_frontier(proposals: Sequence[Proposal], betas: Sequence[float], ess_threshold: float | None = None
                           ) -> tuple[list[OptimalPoint], list[PerPrompt]]:
    """For each β, the estimate of the proposal with the largest mean ESS among those that are not
    low-ESS by their own threshold (all of them when none is); sorted by KL. Returns the points
    and, in the same order, their per-prompt estimates."""
    chosen = []
    for beta in betas:
        candidates = []
        for p in proposals:
            est = per_prompt(p.rewards, beta, p.log_ratios)
            candidates.append((summarise(est, beta, ess_threshold, p.name), est))
        trusted = [c for c in candidates if not c[0].low_ess] or candidates
        chosen.append(max(trusted, key=lambda c: c[0].ess))
    chosen.sort(key=lambda c: (c[0].kl, c[0].reward))
    return [c[0] for c in chosen], [c[1] for c in chosen]

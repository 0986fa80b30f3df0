"""The numbers behind `judge` and `frontier`: bootstrap CIs, sampled KL, win rates, preference
labelling, best-of-n and the optimal KL-regularised policy, and the frontier's geometry.

Plain functions over numpy arrays (or lists); no I/O, and every random draw comes from an explicit
`numpy.random.Generator` or seed. Conventions:
- "per-sample" values belong to samples y ~ π (the sampled policy), one sequence each, with log-probs
  summed over the completion tokens;
- `groups` / `prompt_ids` are cluster labels (usually prompt ids): CIs then resample whole prompts
  (cluster bootstrap), because samples of one prompt are not independent;
- `rewards_by_prompt` is a list (one entry per prompt) of the rewards of M_x ≥ 1 i.i.d. samples from the
  reference policy for that prompt; the lists may have different lengths.
Protocols: the reward-vs-KL frontier of the DPO paper (Rafailov et al. 2023, Fig. 2) with KL per
prompt first, then over prompts (Ji et al. 2024, §4.1); density ratios by self-normalised
importance sampling (Ji et al. 2024, §4.1, Fig. 3); the two-order LLM judge of MT-Bench and
Arena-Hard (Zheng et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

SeedLike = int | np.random.Generator

__all__ = [
    "Estimate",
    "WinRate",
    "all_pairs_outcomes",
    "best_of_n_curve",
    "best_of_n_kl",
    "best_of_n_reward",
    "bootstrap_ci",
    "combine_two_orders",
    "envelope_at",
    "estimate",
    "frontier_gap",
    "kl_estimates",
    "kl_k1",
    "kl_k3",
    "label_pairs",
    "position_consistency",
    "reward_judge_outcomes",
    "upper_envelope",
    "win_rate",
]


# --- helpers ------------------------------------------------------------------------------------


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    """A finite, non-empty 1-D float64 array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values (NaN or ±inf)")
    return arr


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} differ in length: {a.size} vs {b.size}")


def _group_index(groups: ArrayLike, n: int) -> tuple[np.ndarray, int]:
    """Group labels (any hashable ids) -> dense codes 0..G-1 in order of first appearance, and G."""
    labels = np.asarray(groups)
    if labels.ndim != 1 or labels.size != n:
        raise ValueError(f"groups must be 1-D with one id per value ({n}), got shape {labels.shape}")
    _, first, codes = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # rank of each unique label by first appearance
    return order[codes.reshape(-1)], len(first)


def _group_stats(values: np.ndarray, groups: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums and counts."""
    codes, n_groups = _group_index(groups, values.size)
    sums = np.bincount(codes, weights=values, minlength=n_groups)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    return sums, counts


def _point_mean(values: np.ndarray, groups: ArrayLike | None, equal_groups: bool) -> float:
    if groups is None:
        return float(values.mean())
    sums, counts = _group_stats(values, groups)
    return float(np.mean(sums / counts)) if equal_groups else float(sums.sum() / counts.sum())


def ragged(rewards_by_prompt: Sequence[Sequence[float]] | np.ndarray, name: str = "rewards_by_prompt"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of different lengths -> (padded [P, M_max] array, mask of real entries, per-row counts)."""
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in rewards_by_prompt]
    if not rows:
        raise ValueError(f"{name} is empty (no prompts)")
    counts = np.array([r.size for r in rows])
    if counts.min() == 0:
        raise ValueError(f"{name}: prompt {int(np.argmin(counts))} has no samples")
    padded = np.zeros((len(rows), counts.max()))
    mask = np.arange(counts.max())[None, :] < counts[:, None]
    for i, r in enumerate(rows):
        if not np.all(np.isfinite(r)):
            raise ValueError(f"{name}: prompt {i} holds non-finite rewards")
        padded[i, : r.size] = r
    return padded, mask, counts


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    """σ(x) = 1/(1+e^{-x}), without overflow for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


# --- bootstrap ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap CI [low, high]; n items (and n_groups clusters, if clustered)."""

    mean: float
    low: float
    high: float
    n: int
    n_groups: int | None = None


_BOOT_CHUNK = 1 << 22  # resampled entries held at once (memory bound for large inputs)


def bootstrap_ci(values: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: SeedLike = 0,
                 groups: ArrayLike | None = None, *, equal_groups: bool = True) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: the (1−level)/2 and (1+level)/2 quantiles of the mean
    over `n_boot` resamples.

    Without `groups`: resample the n items with replacement; statistic = (1/n) Σ_i v_i*.
    With `groups` (one id per value, e.g. prompt ids): cluster bootstrap, resample the G groups with
    replacement and keep all items of each drawn group. The statistic is then
    - `equal_groups=True` (default): the mean of group means, (1/G) Σ_g v̄_g*, each group weighted equally
      (EXO's eval_kl protocol: per prompt first, then over prompts);
    - `equal_groups=False`: the pooled item mean Σ_g S_g* / Σ_g n_g* (S = group sum, n = group size).
    `seed` is an int or a `numpy.random.Generator`; the same seed gives the same interval.
    """
    v = _vector(values, "values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if groups is None:
        units, denom = v, None
    else:
        sums, counts = _group_stats(v, groups)
        units, denom = (sums / counts, None) if equal_groups else (sums, counts)
    k = units.size
    stats = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK // k)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, k, size=(stop - start, k))
        if denom is None:
            stats[start:stop] = units[idx].mean(axis=1)
        else:
            stats[start:stop] = units[idx].sum(axis=1) / denom[idx].sum(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def estimate(values: ArrayLike, **kw) -> Estimate:
    """Mean of `values` and its `bootstrap_ci` (keywords as there). With `groups`, the mean is the
    mean of group means (or the pooled mean with `equal_groups=False`), matching the CI's statistic."""
    v = _vector(values, "values")
    groups = kw.get("groups")
    equal_groups = kw.get("equal_groups", True)
    low, high = bootstrap_ci(v, **kw)
    n_groups = None if groups is None else len(np.unique(np.asarray(groups)))
    return Estimate(mean=_point_mean(v, groups, equal_groups), low=low, high=high, n=int(v.size),
                    n_groups=n_groups)


# --- KL between the sampled policy and the reference ---------------------------------------------


def kl_k1(logp_policy: ArrayLike, logp_ref: ArrayLike) -> np.ndarray:
    """Per-sample log-ratio d = log π(y) − log π_ref(y), y ~ π: unbiased for KL(π‖π_ref), E_π[d] = KL,
    but a single value can be negative and its variance is large (Schulman's k1)."""
    lp, lr = _vector(logp_policy, "logp_policy"), _vector(logp_ref, "logp_ref")
    _same_length("logp_policy", lp, "logp_ref", lr)
    return lp - lr


def kl_k3(logp_policy: ArrayLike, logp_ref: ArrayLike) -> np.ndarray:
    """Per-sample (r − 1) − log r with r = π_ref(y)/π(y) = exp(−d), y ~ π: unbiased for KL(π‖π_ref)
    (E_π[r] = 1 when supp π_ref ⊆ supp π) and ≥ 0 per sample (Schulman's k3). Computed as
    expm1(−d) + d, clipped at 0 against rounding; overflows to +inf when d < −709."""
    d = kl_k1(logp_policy, logp_ref)
    with np.errstate(over="ignore"):
        return np.maximum(np.expm1(-d) + d, 0.0)


def kl_estimates(logp_policy: ArrayLike, logp_ref: ArrayLike, kl_exact: ArrayLike | None = None,
                 prompt_ids: ArrayLike | None = None, seed: SeedLike = 0, *, n_boot: int = 1000,
                 level: float = 0.95) -> dict[str, Estimate]:
    """Sequence-level KL(π‖π_ref) from samples y ~ π, as {"k1", "k3", "exact" (if kl_exact)}.

    k1: mean of log π(y) − log π_ref(y); k3: mean of (r − 1) − log r, r = π_ref(y)/π(y);
    exact: mean of the given per-sample Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)) along each sample, used as is.
    All three target the same number only under untruncated sampling (T = 1, no top-k/top-p) with
    log-probs of the sampling distribution; the exact sum has the lowest variance.
    With `prompt_ids`: mean per prompt first, then over prompts (each prompt weighted equally, EXO's
    eval_kl), with a cluster-bootstrap CI over prompts; without, the plain mean and item bootstrap.
    """
    per_sample = {"k1": kl_k1(logp_policy, logp_ref), "k3": kl_k3(logp_policy, logp_ref)}
    if not np.all(np.isfinite(per_sample["k3"])):
        raise ValueError("k3 overflowed: some sample has log π_ref − log π > 709")
    if kl_exact is not None:
        exact = _vector(kl_exact, "kl_exact")
        _same_length("kl_exact", exact, "logp_policy", per_sample["k1"])
        per_sample["exact"] = exact
    return {name: estimate(v, n_boot=n_boot, level=level, seed=seed, groups=prompt_ids)
            for name, v in per_sample.items()}


# --- win rates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRate:
    """Win rate with ties counted ½ (= mean outcome) and its bootstrap CI [low, high].

    wins/ties/losses count outcomes > ½, = ½ and < ½ (for outcomes in {0, ½, 1}: exactly win, tie,
    loss; an averaged outcome such as ¾ counts as a win in these counts and as ¾ in the rate)."""

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    n_groups: int | None = None

    @property
    def ci(self) -> tuple[float, float]:
        return self.low, self.high


def _outcomes(values: ArrayLike, name: str, discrete: bool) -> np.ndarray:
    o = _vector(values, name)
    if discrete and not np.all(np.isin(o, (0.0, 0.5, 1.0))):
        raise ValueError(f"{name} must hold only 1 (win), 0.5 (tie) or 0 (loss)")
    if np.any((o < 0) | (o > 1)):
        raise ValueError(f"{name} must lie in [0, 1]")
    return o


def win_rate(outcomes: ArrayLike, seed: SeedLike = 0, prompt_ids: ArrayLike | None = None, *,
             n_boot: int = 1000, level: float = 0.95) -> WinRate:
    """rate = (1/n) Σ_i o_i with o ∈ {1 win, ½ tie, 0 loss} (= (wins + ½·ties)/n; fractional outcomes
    in [0, 1], e.g. from `combine_two_orders(rule="average")`, enter as they are).
    CI: percentile bootstrap over comparisons, or, with `prompt_ids`, a cluster bootstrap over prompts
    of the same pooled rate (comparisons of one prompt are not independent)."""
    o = _outcomes(outcomes, "outcomes", discrete=False)
    low, high = bootstrap_ci(o, n_boot=n_boot, level=level, seed=seed, groups=prompt_ids, equal_groups=False)
    return WinRate(rate=float(o.mean()), low=low, high=high, wins=int(np.sum(o > 0.5)),
                   ties=int(np.sum(o == 0.5)), losses=int(np.sum(o < 0.5)), n=int(o.size),
                   n_groups=None if prompt_ids is None else len(np.unique(np.asarray(prompt_ids))))


def combine_two_orders(first: ArrayLike, second: ArrayLike,
                       rule: Literal["fastchat", "average"] = "fastchat") -> np.ndarray:
    """One outcome per comparison judged in both orders. `first[i]`: verdict with the candidate in
    position A, `second[i]`: with it in position B, both already from the candidate's side (1/½/0).
    fastchat (MT-Bench `show_result.py`): the common outcome if the two agree on a win or a loss,
    otherwise ½ (disagreement, or a tie in either order). average (Arena-Hard: each order its own
    battle): (first + second)/2, so a win and a tie give ¾."""
    discrete = rule == "fastchat"
    a, b = _outcomes(first, "first", discrete), _outcomes(second, "second", discrete)
    _same_length("first", a, "second", b)
    if rule == "fastchat":
        return np.where((a == b) & (a != 0.5), a, 0.5)
    if rule == "average":
        return (a + b) / 2
    raise ValueError(f"unknown rule {rule!r}; choose 'fastchat' or 'average'")


def position_consistency(first: ArrayLike, second: ArrayLike) -> float:
    """Share of comparisons whose two orders give the same verdict (both win, both tie or both loss,
    from the candidate's side): (1/n) Σ_i [first_i = second_i]. A judge below 1 has position bias."""
    a, b = _outcomes(first, "first", True), _outcomes(second, "second", True)
    _same_length("first", a, "second", b)
    return float(np.mean(a == b))


def reward_judge_outcomes(candidate_scores: ArrayLike, baseline_scores: ArrayLike,
                          tie_tol: float = 0.0) -> np.ndarray:
    """Per comparison: 1 if c > b + tol, 0 if c < b − tol, else ½ (a reward model or oracle as judge)."""
    c, b = _vector(candidate_scores, "candidate_scores"), _vector(baseline_scores, "baseline_scores")
    _same_length("candidate_scores", c, "baseline_scores", b)
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be ≥ 0, got {tie_tol}")
    return np.where(c > b + tie_tol, 1.0, np.where(c < b - tie_tol, 0.0, 0.5))


def all_pairs_outcomes(cand_by_prompt: Sequence[Sequence[float]], base_by_prompt: Sequence[Sequence[float]],
                       tie_tol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """EXO's RM win rate: for every prompt, every (candidate, baseline) pair of its scores, judged as in
    `reward_judge_outcomes`. Returns (outcomes, prompt_ids), flat, prompt-major, then candidate, then
    baseline; a prompt with Kc candidates and Kb baselines gives Kc·Kb outcomes. Feed both to
    `win_rate(outcomes, prompt_ids=prompt_ids)` for a CI over prompts."""
    if len(cand_by_prompt) != len(base_by_prompt):
        raise ValueError(f"cand_by_prompt and base_by_prompt differ in prompts: "
                         f"{len(cand_by_prompt)} vs {len(base_by_prompt)}")
    outs, ids = [], []
    for i, (cand, base) in enumerate(zip(cand_by_prompt, base_by_prompt, strict=True)):
        c, b = _vector(cand, f"cand_by_prompt[{i}]"), _vector(base, f"base_by_prompt[{i}]")
        cc, bb = np.meshgrid(c, b, indexing="ij")
        outs.append(reward_judge_outcomes(cc.ravel(), bb.ravel(), tie_tol))
        ids.append(np.full(cc.size, i))
    return np.concatenate(outs), np.concatenate(ids)


# --- preference labelling -----------------------------------------------------------------------


def label_pairs(rewards_by_prompt: Sequence[Sequence[float]],
                mode: Literal["best_worst", "bradley_terry"] = "best_worst", noise: float = 0.0, beta: float = 1.0,
                rng: SeedLike | None = None) -> list[tuple[int, int] | None]:
    """(chosen index, rejected index) per prompt from an oracle's rewards of its N ≥ 2 samples.

    best_worst: (argmax r, argmin r), first index on ties (EXO's IMDB labelling);
    bradley_terry: a pair a ≠ b drawn uniformly, a chosen with probability σ((r_a − r_b)/β).
    None when no preference exists: all rewards equal (best_worst) or the drawn pair equal
    (bradley_terry). Then, with probability `noise`, chosen and rejected are swapped (label noise).
    `rng` (Generator or seed) is required when anything is drawn (bradley_terry or noise > 0); the
    draws are a fixed number per prompt, so a result is deterministic given rng.
    """
    if mode not in ("best_worst", "bradley_terry"):
        raise ValueError(f"unknown mode {mode!r}; choose 'best_worst' or 'bradley_terry'")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    padded, mask, counts = ragged(rewards_by_prompt)
    if counts.min() < 2:
        raise ValueError(f"rewards_by_prompt: prompt {int(np.argmin(counts))} has fewer than 2 samples")
    n_prompts = len(counts)
    random = mode == "bradley_terry" or noise > 0
    if random and rng is None:
        raise ValueError("label_pairs draws random numbers here (bradley_terry or noise > 0): pass rng=")
    gen = np.random.default_rng(rng) if random else None

    if mode == "best_worst":
        chosen = np.argmax(np.where(mask, padded, -np.inf), axis=1)
        rejected = np.argmin(np.where(mask, padded, np.inf), axis=1)
        valid = padded[np.arange(n_prompts), chosen] > padded[np.arange(n_prompts), rejected]
    else:
        a = gen.integers(0, counts)
        b = gen.integers(0, counts - 1)
        b = b + (b >= a)  # uniform over the other N − 1 indices
        u = gen.random(n_prompts)
        ra, rb = padded[np.arange(n_prompts), a], padded[np.arange(n_prompts), b]
        first = u < _sigmoid((ra - rb) / beta)
        chosen, rejected = np.where(first, a, b), np.where(first, b, a)
        valid = ra != rb
    flip = gen.random(n_prompts) < noise if noise > 0 else np.zeros(n_prompts, dtype=bool)
    out: list[tuple[int, int] | None] = []
    for i in range(n_prompts):
        if not valid[i]:
            out.append(None)
        elif flip[i]:
            out.append((int(rejected[i]), int(chosen[i])))
        else:
            out.append((int(chosen[i]), int(rejected[i])))
    return out


# --- best-of-n ----------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π_ref) = log n − (n − 1)/n, the standard analytic value for best-of-n (0 at n = 1).
    Exact for a continuous reward distribution; for discrete π_ref it is an upper bound, tight when
    rewards are distinct and no outcome carries much mass (Beirami et al. 2024)."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer ≥ 1, got {n}")
    return math.log(n) - (n - 1) / n


def _max_of_n_weights(m: int, n: int) -> np.ndarray:
    """w_i = C(i−1, n−1)/C(m, n), i = 1..m: the probability that the i-th smallest of m values is the max
    of a uniformly drawn n-subset. Built in logs (C(i, n−1) = C(i−1, n−1)·i/(i−n+1)) and normalised by
    the sum, which is C(m, n) by the hockey-stick identity."""
    logw = np.full(m, -np.inf)
    i = np.arange(n, m)  # 1-based i from n to m−1, step to i+1
    logw[n - 1 :] = np.concatenate([[0.0], np.cumsum(np.log(i) - np.log(i - n + 1))])
    w = np.exp(logw - logw.max())
    return w / w.sum()


def best_of_n_reward(rewards_by_prompt: Sequence[Sequence[float]], n: int) -> float:
    """Unbiased estimate of E[max of n draws from π_ref] per prompt from its M ≥ n i.i.d. reference
    rewards, r_(1) ≤ … ≤ r_(M): Σ_i r_(i) · C(i−1, n−1)/C(M, n) (the mean of the max over all n-subsets,
    a U-statistic), averaged over prompts (each weighted equally)."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer ≥ 1, got {n}")
    padded, _, counts = ragged(rewards_by_prompt)
    if counts.min() < n:
        raise ValueError(f"best_of_n_reward: n = {n} but prompt {int(np.argmin(counts))} has only "
                         f"{counts.min()} samples (need M ≥ n)")
    per_prompt = [float(np.sort(row[:m]) @ _max_of_n_weights(int(m), int(n)))
                  for row, m in zip(padded, counts, strict=True)]
    return float(np.mean(per_prompt))


def best_of_n_curve(rewards_by_prompt: Sequence[Sequence[float]], ns: Sequence[int]) -> list[tuple[int, float, float]]:
    """[(n, best_of_n_kl(n), best_of_n_reward(rewards_by_prompt, n)) for n in ns]: the best-of-n
    baseline of the reward–KL plot (KL analytic, reward estimated from reference samples)."""
    return [(int(n), best_of_n_kl(n), best_of_n_reward(rewards_by_prompt, n)) for n in ns]


# --- frontier geometry --------------------------------------------------------------------------


def _points(points: Sequence[tuple[float, float]], name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.empty((0, 2))
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values")
    return arr


def upper_envelope(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto-optimal (kl, reward) points, those that no other point dominates (KL' ≤ KL and
    reward' ≥ reward, one strict), sorted by KL; exact duplicates are kept once. Rewards increase
    strictly along the result."""
    arr = _points(points, "points")
    order = np.lexsort((-arr[:, 1], arr[:, 0]))  # by KL, then reward descending
    out: list[tuple[float, float]] = []
    best = -np.inf
    for kl, reward in arr[order]:
        if reward > best:
            out.append((float(kl), float(reward)))
            best = reward
    return out


def envelope_at(points: Sequence[tuple[float, float]], grid: np.ndarray) -> np.ndarray:
    """The upper envelope of `points` (kl, reward), linearly interpolated in KL at `grid`; NaN
    outside the envelope's KL range (never extrapolated)."""
    env = np.asarray(upper_envelope(points), dtype=np.float64).reshape(-1, 2)
    grid = np.asarray(grid, dtype=np.float64)
    out = np.full(grid.shape, np.nan)
    if env.shape[0] == 0:
        return out
    inside = (grid >= env[0, 0]) & (grid <= env[-1, 0])
    out[inside] = np.interp(grid[inside], env[:, 0], env[:, 1])
    return out


def frontier_gap(kl: float, reward: float, frontier: Sequence[tuple[float, float]]) -> float:
    """f(kl) − reward, where f linearly interpolates the (optimal) frontier's (kl, reward) points
    (sorted by KL; at a repeated KL the highest reward counts). Outside the frontier's KL range f is
    clamped to the end point's reward: below its smallest KL the gap is then over-stated and beyond its
    largest KL under-stated (the optimal frontier rises with KL), so cover the range of the points
    compared (β = inf gives KL = 0). Positive = below the frontier."""
    arr = _points(frontier, "frontier")
    if arr.shape[0] == 0:
        raise ValueError("frontier is empty")
    if not (np.isfinite(kl) and np.isfinite(reward)):
        raise ValueError(f"kl and reward must be finite, got ({kl}, {reward})")
    xs = np.unique(arr[:, 0])
    ys = np.array([arr[arr[:, 0] == x, 1].max() for x in xs])
    return float(np.interp(kl, xs, ys) - reward)

"""What a frontier compares: judged policies grouped into points and series, with statistics that
a researcher can draw a conclusion from.

- A *run* is one judged policy: one training seed of one configuration (or one kept checkpoint).
- A *point* is one configuration (objective, hyperparameters, everything else, and the checkpoint
  step) over its training seeds: the mean over seeds and prompts, with a CI that resamples both
  (prefkit.seedstats).
- A *series* is one objective under one configuration: the points of a sweep over the objective's
  own hyperparameters (β, α, ...). Runs that differ in anything else (LoRA or not, another step
  budget, another dataset) are another series, with its own envelope and legend entry.

On top of them: the optimal frontier from every run's samples (prefkit.optimal), each point's gap
to it, and every pair of series compared by reward at matched KL.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefkit import estimators, optimal
from prefkit.errors import UserError
from prefkit.rundir import read_jsonl
from prefkit.seedstats import SeedPromptCI, seed_prompt_ci, two_source_bootstrap

REFERENCE = "sft-reference"


@dataclass
class Run:
    """One judged policy, prompt by prompt (the prompts sorted, the same for every run)."""

    key: str
    objective: str
    params: dict
    seed: int
    step: int | None
    setting: dict  # the job's config but its seed (flattened)
    judge_job: str
    prompt_ids: np.ndarray
    reward: np.ndarray  # [P] mean reward of the prompt's samples
    kl: np.ndarray  # [P] mean KL estimate of the prompt's samples
    sample_rewards: list[list[float]]  # per prompt, per sample
    sample_log_ratios: list[list[float]]  # per prompt, per sample: log π(y) − log π_ref(y)

    @property
    def is_reference(self) -> bool:
        return self.objective == REFERENCE


@dataclass
class Point:
    series: str
    label: str  # the swept values, e.g. "beta=0.1" (and "@step")
    runs: list[Run]
    reward: SeedPromptCI | None = None
    kl: SeedPromptCI | None = None
    gap: tuple[float, float, float] | None = None  # (gap, low, high) to the optimal frontier

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class Series:
    key: str
    objective: str
    label: str
    points: list[Point] = field(default_factory=list)


# --- loading ------------------------------------------------------------------------------------

KL_FIELDS = {"exact": "kl_exact"}


def load_run(entry: dict, judge_job: str, kl_key: str) -> Run:
    """A judged policy from its summary entry and its per-sample scores file."""
    rows = read_jsonl(Path(entry["scores"]))
    if rows and "logp_policy" not in rows[0]:
        raise UserError(f"{entry['scores']} has no per-sample log-probs (judged by an older prefkit); rerun "
                        f"the judge with overwrite=true")
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    prompts = sorted(by_prompt)

    def kl_of(r: dict) -> float:
        d = r["logp_policy"] - r["logp_ref"]
        return {"exact": r.get("kl_exact", float("nan")), "k1": d, "k3": math.expm1(-d) + d}[kl_key]

    return Run(key=entry["policy"], objective=entry.get("objective", "?"), params=entry.get("params") or {},
               seed=int(entry.get("seed", 0)), step=entry.get("step"), setting=entry.get("setting") or {},
               judge_job=judge_job, prompt_ids=np.array(prompts),
               reward=np.array([np.mean([r["score"] for r in by_prompt[p]]) for p in prompts]),
               kl=np.array([np.mean([kl_of(r) for r in by_prompt[p]]) for p in prompts]),
               sample_rewards=[[r["score"] for r in by_prompt[p]] for p in prompts],
               sample_log_ratios=[[r["logp_policy"] - r["logp_ref"] for r in by_prompt[p]] for p in prompts])


# --- grouping -----------------------------------------------------------------------------------

def _series_setting(run: Run) -> dict:
    """The setting without the objective's own hyperparameters (what a series sweeps)."""
    return {k: v for k, v in run.setting.items() if not k.startswith("objective.") or k == "objective.name"}


def _key(d: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in d.items()))


def group(runs: list[Run]) -> list[Series]:
    """Runs -> points (same setting and step, any seed) -> series (same setting but the objective's
    hyperparameters). Two runs of one point with the same seed (judged twice) cannot be grouped."""
    points: dict[str, Point] = {}
    series: dict[str, Series] = {}
    for run in runs:
        skey = _key(_series_setting(run)) if not run.is_reference else REFERENCE
        pkey = _key({**run.setting, "@step": run.step})
        point = points.setdefault(pkey, Point(skey, "", []))
        twin = next((r for r in point.runs if r.seed == run.seed), None)
        if twin is not None:
            raise UserError(f"{run.key} (judge/{run.judge_job}) and {twin.key} (judge/{twin.judge_job}) are one "
                            f"setting and seed ({run.seed}) judged twice; choose one judge job with frontier.judge=")
        point.runs.append(run)
        if skey not in series:
            series[skey] = Series(skey, run.objective, run.objective)
        if point not in series[skey].points:
            series[skey].points.append(point)
    out = list(series.values())
    _label_series(out)
    for s in out:
        _label_points(s, [p for other in out if other.objective == s.objective for p in other.points])
    return out


def _label_series(all_series: list[Series]) -> None:
    """An objective's series are told apart by the settings in which they differ."""
    by_objective: dict[str, list[Series]] = defaultdict(list)
    for s in all_series:
        by_objective[s.objective].append(s)
    for group_ in by_objective.values():
        if len(group_) < 2:
            continue
        settings = [_series_setting(s.points[0].runs[0]) for s in group_]
        keys = sorted({k for st in settings for k in st if len({repr(x.get(k)) for x in settings}) > 1})
        names = _short_keys(keys)
        for s, st in zip(group_, settings, strict=True):
            s.label = f"{s.objective} ({', '.join(f'{names[k]}={st.get(k)}' for k in keys)})"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last component, or by as many as tell it apart (dataset.job, rewards.job)."""
    names = {}
    for k in keys:
        parts = k.split(".")
        n = 1
        while n < len(parts) and sum(o.split(".")[-n:] == parts[-n:] for o in keys) > 1:
            n += 1
        names[k] = ".".join(parts[-n:])
    return names


def _varying(params: list[dict]) -> list[str]:
    keys = sorted({k for d in params for k in d})
    return [k for k in keys if len({repr(d.get(k)) for d in params}) > 1]


def _label_points(s: Series, siblings: list[Point]) -> None:
    """A point is labelled with the hyperparameters that vary within its series; a series of one
    point, with those that vary among the points of its objective (nothing, when none do: the
    legend names the series)."""
    params = [p.runs[0].params for p in s.points]
    varying = _varying(params) if len(s.points) > 1 else _varying([p.runs[0].params for p in siblings])
    for p, d in zip(s.points, params, strict=True):
        step = f"@{p.runs[0].step}" if p.runs[0].step is not None else ""
        p.label = ",".join(f"{k}={d[k]}" for k in varying if k in d) + step


# --- statistics ---------------------------------------------------------------------------------

def aggregate(all_series: list[Series]) -> None:
    """Each point's reward and KL: mean over seeds and prompts, CI over both."""
    prompts = None
    for s in all_series:
        for p in s.points:
            for run in p.runs:
                if prompts is None:
                    prompts = run.prompt_ids
                elif not np.array_equal(prompts, run.prompt_ids):
                    raise UserError(f"{run.key} was sampled on other prompts than {s.points[0].runs[0].key}; "
                                    "compare policies sampled by one sample job (frontier.judge=<job>)")
            p.reward = seed_prompt_ci(np.stack([r.reward for r in p.runs]))
            p.kl = seed_prompt_ci(np.stack([r.kl for r in p.runs]))


@dataclass
class Optimal:
    points: list[optimal.OptimalPoint]
    per_prompt: list[optimal.PerPrompt]

    def trusted(self) -> tuple[list[optimal.OptimalPoint], list[optimal.PerPrompt]]:
        pairs = [(o, e) for o, e in zip(self.points, self.per_prompt, strict=True) if not o.low_ess]
        return [o for o, _ in pairs], [e for _, e in pairs]

    def curve(self, prompt_idx: np.ndarray | None = None) -> np.ndarray:
        """The trusted points' (kl, reward) upper envelope, means over (resampled) prompts."""
        _, ests = self.trusted()
        idx = slice(None) if prompt_idx is None else prompt_idx
        pts = [(float(e.kl[idx].mean()), float(e.reward[idx].mean())) for e in ests]
        return np.asarray(estimators.upper_envelope(pts), dtype=np.float64).reshape(-1, 2)


def optimal_frontier(runs: list[Run], betas: list[float]) -> Optimal | None:
    """π*_β from every run's samples, the best proposal per β; None without a reference run."""
    if not any(r.is_reference for r in runs):
        return None
    proposals = [optimal.Proposal(r.key, r.sample_rewards, None if r.is_reference else r.sample_log_ratios)
                 for r in runs]
    points, per_prompt = optimal.best_proposal_frontier(proposals, betas)
    return Optimal(points, per_prompt)


def _at(curve: np.ndarray, kl: float) -> float:
    """The curve at `kl`, NaN beyond its KL range (no gap against an extrapolated frontier)."""
    if curve.shape[0] == 0 or not curve[0, 0] <= kl <= curve[-1, 0]:
        return float("nan")
    return float(np.interp(kl, curve[:, 0], curve[:, 1]))


def gaps(all_series: list[Series], opt: Optimal, n_boot: int, seed: int) -> None:
    """Each point's gap to the optimal frontier at its KL, with a CI over seeds and prompts."""
    for s in all_series:
        for p in s.points:
            rewards, kls = np.stack([r.reward for r in p.runs]), np.stack([r.kl for r in p.runs])

            def gap(seed_idx, prompt_idx, rewards=rewards, kls=kls):
                r, k = rewards[seed_idx[0]][:, prompt_idx].mean(), kls[seed_idx[0]][:, prompt_idx].mean()
                return _at(opt.curve(prompt_idx), k) - r

            est, low, high = two_source_bootstrap(gap, [len(p.runs)], rewards.shape[1], n_boot=n_boot, seed=seed)
            p.gap = (float(est), float(low), float(high))


# --- reward at matched KL -----------------------------------------------------------------------

@dataclass
class Matched:
    a: str
    b: str
    grid: np.ndarray
    diff: np.ndarray
    low: np.ndarray
    high: np.ndarray
    mean: tuple[float, float, float]  # the mean difference over the range, with its CI

    def regions(self) -> list[tuple[str, float, float]]:
        """Stretches of the grid where the CI excludes zero: ("above" or "below", from, to)."""
        out: list[tuple[str, float, float]] = []
        for i, k in enumerate(self.grid):
            side = "above" if self.low[i] > 0 else "below" if self.high[i] < 0 else None
            if side and out and out[-1][0] == side and i > 0 and self.grid[i - 1] == out[-1][2]:
                out[-1] = (side, out[-1][1], float(k))
            elif side:
                out.append((side, float(k), float(k)))
        return out

    def verdict(self) -> str:
        parts = [f"{self.a if side == 'above' else self.b} above for KL in [{lo:.2f}, {hi:.2f}]"
                 for side, lo, hi in self.regions()]
        return "; ".join(parts) or "no KL where the CI excludes 0"


def _seed_curves(s: Series, grid: np.ndarray, seed_idx: np.ndarray, prompt_idx: np.ndarray) -> np.ndarray:
    """Per (resampled) seed, the series' upper envelope on the grid: [seeds, grid]."""
    seeds = sorted({seed for p in s.points for seed in p.seeds})
    curves = []
    for i in seed_idx:
        pts = [(float(r.kl[prompt_idx].mean()), float(r.reward[prompt_idx].mean()))
               for p in s.points for r in p.runs if r.seed == seeds[i]]
        curves.append(estimators.envelope_at(pts, grid))
    return np.array(curves)


def _range(s: Series) -> tuple[float, float]:
    """The KL range every seed's upper envelope covers (empty when a seed's envelope is one point)."""
    seeds = sorted({seed for p in s.points for seed in p.seeds})
    lows, highs = [], []
    for seed in seeds:
        env = estimators.upper_envelope([(float(r.kl.mean()), float(r.reward.mean()))
                                         for p in s.points for r in p.runs if r.seed == seed])
        lows.append(env[0][0])
        highs.append(env[-1][0])
    return max(lows), min(highs)


def matched_kl(a: Series, b: Series, n_grid: int, n_boot: int, seed: int) -> Matched | None:
    """Reward of `a` minus reward of `b` at equal KL, on a grid over the KL range both cover (every
    seed's upper envelope, linear in KL, never extrapolated; means over seeds), with CIs that
    resample each series' seeds and the shared prompts. None when the ranges do not overlap."""
    (lo_a, hi_a), (lo_b, hi_b) = _range(a), _range(b)
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, n_grid)
    seeds_a = len({x for p in a.points for x in p.seeds})
    seeds_b = len({x for p in b.points for x in p.seeds})
    n_prompts = len(a.points[0].runs[0].prompt_ids)

    def diff(seed_idx, prompt_idx):
        ca = _seed_curves(a, grid, seed_idx[0], prompt_idx).mean(axis=0)
        cb = _seed_curves(b, grid, seed_idx[1], prompt_idx).mean(axis=0)
        d = ca - cb
        return np.append(d, np.nan if np.isnan(d).all() else np.nanmean(d))  # the curve, then its mean

    est, low, high = two_source_bootstrap(diff, [seeds_a, seeds_b], n_prompts, n_boot=n_boot, seed=seed)
    return Matched(a.label, b.label, grid, est[:-1], low[:-1], high[:-1], (est[-1], low[-1], high[-1]))


def all_matched(all_series: list[Series], n_grid: int, n_boot: int, seed: int) -> list[Matched]:
    compared = [s for s in all_series if s.objective != REFERENCE and len(s.points) > 0]
    out = []
    for i, a in enumerate(compared):
        for b in compared[i + 1:]:
            m = matched_kl(a, b, n_grid, n_boot, seed)
            if m is not None:
                out.append(m)
    return out

"""Claims: a named statistic of a run with a direction, written in the experiment's config before
the experiment runs, and a verdict from its 95% CI over training seeds (and prompts, for statistics
of samples): "holds" when the CI lies on the claimed side of zero, "does not hold" when it lies on
the other side, "inconclusive" otherwise.

Statistics (`statistic.kind`):
- matched_kl   reward of series `a` minus series `b` at equal KL, averaged over their common KL range
               (prefkit.comparison; CI resamples each series' seeds and the prompts)
- contrast     Σ weight × (reward, KL or win rate against the SFT model) of points (one per `terms`
               entry; a selector picks the final model, or the checkpoint `step`); e.g. a difference
               of two points, or of two drops (CI: the seeds of every point, and the prompts)
- log_change   from training logs (metrics.jsonl): the last minus the first logged value of `metric`
               for the align jobs `a` selects (mean over them; with `b`, the difference of the two
               means); CI: Student/Welch t over the jobs (one per seed)
- log_final    the same with the last logged value; log_mean: the mean over every logged value;
               `abs: true` takes each job's absolute value (a change of either sign)
- log_ratio_gap  final eval metrics `x_a/y_a − x_b/y_b` (ratios of logged means; e.g. a conditional
               mean from `diag/…_x_frac` and `diag/frac_…`), per job; CI: t over the jobs
- density      EXO Fig. 3's question from `judge.task=density` (mean |log π/π_ref − log π*/π_ref| on
               the reference's likelier samples): series `a`'s distance minus series `b`'s

A selector picks series, points or jobs: {objective: dpo, params: {beta: 0.1}, setting: {dataset.job: x}}.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from prefkit.comparison import REFERENCE, Point, Series
from prefkit.errors import UserError
from prefkit.rundir import Job, flat, jobs, read_jsonl
from prefkit.seedstats import two_source_bootstrap

DIRECTIONS = (">", "<")


@dataclass
class Result:
    name: str
    description: str
    source: str
    statistic: str
    direction: str
    estimate: float
    low: float
    high: float
    verdict: str
    detail: str


def verdict(low: float, high: float, direction: str) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    positive = low > 0
    negative = high < 0
    if direction == "<":
        positive, negative = negative, positive
    return "holds" if positive else "does not hold" if negative else "inconclusive"


# --- selectors ----------------------------------------------------------------------------------

def matches(selector: dict, objective: str, params: dict, setting: dict) -> bool:
    if selector.get("objective") and selector["objective"] != objective:
        return False
    for k, v in (selector.get("params") or {}).items():
        if str(params.get(k)) != str(v):
            return False
    return all(str(setting.get(k)) == str(v) for k, v in (selector.get("setting") or {}).items())


def _one_series(series: list[Series], selector: dict, what: str) -> Series:
    found = [s for s in series if s.objective != REFERENCE
             and any(matches(selector, s.objective, p.runs[0].params, p.runs[0].setting) for p in s.points)]
    if len(found) != 1:
        names = ", ".join(s.label for s in found) or "none"
        raise UserError(f"claim {what}: selector {selector} picks {len(found)} series ({names}); it must pick one")
    return found[0]


def _one_point(series: list[Series], selector: dict, what: str) -> Point:
    """The point a selector picks: its final model unless the selector names a checkpoint `step`."""
    found = [p for s in series for p in s.points
             if matches(selector, s.objective, p.runs[0].params, p.runs[0].setting)
             and p.runs[0].step == selector.get("step")]
    if len(found) != 1:
        raise UserError(f"claim {what}: selector {selector} picks {len(found)} points; it must pick one")
    return found[0]


def _jobs(run: Path, selector: dict) -> list[Job]:
    out = []
    for job in jobs(run, "align"):
        cfg = job.config
        objective = dict(cfg.objective)
        if matches(selector, str(objective.get("name")), objective, flat(_container(cfg))):
            out.append(job)
    return out


def _container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


# --- statistics ---------------------------------------------------------------------------------

@dataclass
class Context:
    run: Path
    series: list[Series]
    n_boot: int
    seed: int


def _matched_kl(ctx: Context, st: dict, name: str) -> tuple[float, float, float, str]:
    from prefkit.comparison import matched_kl

    a, b = _one_series(ctx.series, st["a"], name), _one_series(ctx.series, st["b"], name)
    m = matched_kl(a, b, int(st.get("grid", 41)), ctx.n_boot, ctx.seed)
    if m is None:
        return math.nan, math.nan, math.nan, f"{a.label} and {b.label} share no KL range"
    return (*m.mean, f"{a.label} − {b.label} over KL [{m.grid[0]:.2f}, {m.grid[-1]:.2f}]: {m.verdict()}")


def _win_rates(run, reference) -> np.ndarray:
    """Per prompt: the share of the run's samples that beat the reference's sample of the same
    index (ties ½): a win rate against the SFT model, as `judge.task=winrate` with the scorer."""
    out = []
    for own, ref in zip(run.sample_rewards, reference.sample_rewards, strict=True):
        pairs = list(zip(own, ref, strict=False))
        out.append(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs]))
    return np.array(out)


def _values(ctx: Context, point: Point, metric: str) -> np.ndarray:
    if metric == "winrate":
        reference = next(p.runs[0] for s in ctx.series if s.objective == REFERENCE for p in s.points)
        return np.stack([_win_rates(r, reference) for r in point.runs])
    return np.stack([getattr(r, metric) for r in point.runs])


def _contrast(ctx: Context, st: dict, name: str) -> tuple[float, float, float, str]:
    metric = st.get("metric", "reward")
    if metric not in ("reward", "kl", "winrate"):
        raise UserError(f"claim {name}: contrast metric must be reward, kl or winrate, not {metric}")
    terms = [(_one_point(ctx.series, t["select"], name), float(t.get("weight", 1.0))) for t in st["terms"]]
    values = [_values(ctx, p, metric) for p, _ in terms]

    def stat(seed_idx, prompt_idx):
        return sum(w * v[idx][:, prompt_idx].mean() for (_, w), v, idx in zip(terms, values, seed_idx, strict=True))

    est, low, high = two_source_bootstrap(stat, [len(p.runs) for p, _ in terms], values[0].shape[1],
                                          n_boot=ctx.n_boot, seed=ctx.seed)
    detail = " ".join(f"{w:+g}×{p.runs[0].objective} {p.label}" for p, w in terms)
    return float(est), float(low), float(high), f"{metric}: {detail}"


def _log_values(run: Path, selector: dict, metric: str, kind: str, absolute: bool = False) -> list[float]:
    values = []
    for job in _jobs(run, selector):
        rows = [r[metric] for r in read_jsonl(job.path / "metrics.jsonl") if metric in r]
        if not rows:
            raise UserError(f"align/{job.name} never logged {metric}")
        value = {"log_change": rows[-1] - rows[0], "log_final": rows[-1], "log_mean": float(np.mean(rows))}[kind]
        values.append(abs(value) if absolute else value)
    if not values:
        raise UserError(f"no align job of the run matches {selector}")
    return values


def _t_interval(a: list[float], b: list[float] | None) -> tuple[float, float, float]:
    """Mean (or Welch difference of means) with its 95% t interval over jobs (one per seed)."""
    a_ = np.asarray(a, dtype=np.float64)
    if b is None:
        if len(a_) < 2:
            return float(a_.mean()), math.nan, math.nan
        se, df = a_.std(ddof=1) / math.sqrt(len(a_)), len(a_) - 1
        mean = float(a_.mean())
    else:
        b_ = np.asarray(b, dtype=np.float64)
        if min(len(a_), len(b_)) < 2:
            return float(a_.mean() - b_.mean()), math.nan, math.nan
        va, vb = a_.var(ddof=1) / len(a_), b_.var(ddof=1) / len(b_)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a_) - 1) + vb**2 / (len(b_) - 1)) if va + vb > 0 else math.inf
        mean = float(a_.mean() - b_.mean())
    half = float(stats.t.ppf(0.975, df)) * se if se > 0 else 0.0
    return mean, mean - half, mean + half


def _log(kind: str) -> Callable[[Context, dict, str], tuple[float, float, float, str]]:
    def compute(ctx: Context, st: dict, name: str) -> tuple[float, float, float, str]:
        absolute = bool(st.get("abs", False))
        a = _log_values(ctx.run, st["a"], st["metric"], kind, absolute)
        b = _log_values(ctx.run, st["b"], st["metric"], kind, absolute) if st.get("b") else None
        what = {"log_change": "change over training", "log_final": "final value",
                "log_mean": "mean over training"}[kind]
        what = f"|{what}|" if absolute else what
        detail = f"{st['metric']} {what}: {len(a)} job(s)" + (f" vs {len(b)}" if b else "")
        return (*_t_interval(a, b), detail)
    return compute


def _log_ratio_gap(ctx: Context, st: dict, name: str) -> tuple[float, float, float, str]:
    """Per job: x_a/y_a − x_b/y_b from its final eval row; mean over jobs with a t interval."""
    values = []
    for job in _jobs(ctx.run, st["select"]):
        rows = [r for r in read_jsonl(job.path / "metrics.jsonl") if st["xa"] in r]
        if not rows:
            raise UserError(f"align/{job.name} never logged {st['xa']}")
        r = rows[-1]
        if r[st["ya"]] > 0 and r[st["yb"]] > 0:
            values.append(r[st["xa"]] / r[st["ya"]] - r[st["xb"]] / r[st["yb"]])
    if not values:
        return math.nan, math.nan, math.nan, "no job had pairs of both kinds"
    return (*_t_interval(values, None), f"{len(values)} job(s)")


def _density(ctx: Context, st: dict, name: str) -> tuple[float, float, float, str]:
    from prefkit.density import distances

    a, b = _one_series(ctx.series, st["a"], name), _one_series(ctx.series, st["b"], name)
    return distances(ctx.run, a, b, st, ctx.n_boot, ctx.seed)


STATISTICS: dict[str, Callable[[Context, dict, str], tuple[float, float, float, str]]] = {
    "matched_kl": _matched_kl, "contrast": _contrast, "log_change": _log("log_change"),
    "log_final": _log("log_final"), "log_mean": _log("log_mean"), "log_ratio_gap": _log_ratio_gap,
    "density": _density}


def check_spec(claim: dict) -> None:
    """A claim as written in an experiment config: its fields and its statistic's kind."""
    name = claim.get("name", "?")
    for key in ("name", "description", "source", "statistic", "direction"):
        if key not in claim:
            raise UserError(f"claim {name} has no '{key}'")
    kind = claim["statistic"].get("kind")
    if kind not in STATISTICS:
        raise UserError(f"claim {name}: unknown statistic '{kind}'; valid: {', '.join(STATISTICS)}")
    if claim["direction"] not in DIRECTIONS:
        raise UserError(f"claim {name}: direction must be > or < (of zero), not {claim['direction']!r}")


def evaluate(claims: list[dict], ctx: Context) -> list[Result]:
    out = []
    for c in claims:
        st = dict(c["statistic"])
        est, low, high, detail = STATISTICS[st["kind"]](ctx, st, c["name"])
        out.append(Result(c["name"], c["description"], c["source"], st["kind"], c["direction"], est, low, high,
                          verdict(low, high, c["direction"]), detail))
    return out


def as_json(results: list[Result]) -> dict[str, Any]:
    return {"claims": [r.__dict__ for r in results]}

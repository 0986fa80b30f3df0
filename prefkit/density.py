"""EXO's density-ratio question (Ji et al. 2024, Fig. 3) as a number: along the reference's own
samples of a prompt, how far is a policy's log density ratio log π_θ(y)/π_ref(y) from the optimal
one, log π*_β(y)/π_ref(y) = r(y)/β − log Z (Z estimated from the same samples: mean exp(r/β))?
The paper's figure shows EXO following the optimal ratio where π_ref is high and DPO drifting
there; so the distance is the mean absolute difference over each prompt's likeliest samples (the
top `top` fraction by log π_ref). Data: `prefkit judge judge.task=density`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from prefkit.comparison import Point, Series
from prefkit.errors import UserError
from prefkit.rundir import jobs, read_jsonl
from prefkit.seedstats import two_source_bootstrap


def _density_job(run: Path, name: str | None) -> Path:
    found = [j for j in jobs(run, "judge") if (j.path / "density").is_dir() and (not name or j.name == name)]
    if len(found) != 1:
        raise UserError(f"the density claim needs one judge job with task=density in {run} "
                        f"(found {len(found)}); run `prefkit judge judge.task=density` (or name it with judge=)")
    return found[0].path


def per_prompt_distance(rows: list[dict], beta: float, top: float) -> dict[int, float]:
    """prompt id -> mean |log π/π_ref − (r/β − log Z)| over its likeliest samples under π_ref."""
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    out = {}
    for pid, rs in by_prompt.items():
        r = np.array([x["reward"] for x in rs]) / beta
        log_z = float(np.logaddexp.reduce(r) - math.log(len(r)))
        optimal = r - log_z
        ratio = np.array([x["logp_policy"] - x["logp_ref"] for x in rs])
        order = np.argsort([-x["logp_ref"] for x in rs])[: max(1, round(top * len(rs)))]
        out[pid] = float(np.mean(np.abs(ratio[order] - optimal[order])))
    return out


def _matrix(path: Path, point: Point, beta: float, top: float) -> np.ndarray:
    rows = []
    for run in point.runs:
        f = path / "density" / f"{run.key.replace('/', '~')}.jsonl"
        if not f.exists():
            raise UserError(f"{run.key} has no density data in {path}; rerun the density judge after sampling it")
        d = per_prompt_distance(read_jsonl(f), beta, top)
        rows.append([d[p] for p in sorted(d)])
    return np.array(rows)


def distances(run: Path, a: Series, b: Series, st: dict, n_boot: int, seed: int) -> tuple[float, float, float, str]:
    """Distance of series `a`'s point minus series `b`'s (at the selectors' parameters), mean over
    seeds and prompts; CI over both."""
    from prefkit.claims import _one_point

    path = _density_job(run, st.get("judge"))
    pa = _one_point([a], st["a"], "density")
    pb = _one_point([b], st["b"], "density")
    beta, top = float(st["beta"]), float(st.get("top", 0.5))
    da, db = _matrix(path, pa, beta, top), _matrix(path, pb, beta, top)

    def stat(seed_idx, prompt_idx):
        return da[seed_idx[0]][:, prompt_idx].mean() - db[seed_idx[1]][:, prompt_idx].mean()

    est, low, high = two_source_bootstrap(stat, [len(da), len(db)], da.shape[1], n_boot=n_boot, seed=seed)
    summary = json.loads((path / "summary.json").read_text())
    return (float(est), float(low), float(high),
            f"{a.label} {pa.label} − {b.label} {pb.label}: {da.mean():.3f} − {db.mean():.3f} nats on the top "
            f"{top:.0%} of {summary['samples_per_prompt']} reference samples of {da.shape[1]} prompts")

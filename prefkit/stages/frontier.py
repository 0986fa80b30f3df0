"""`prefkit frontier`: the reward-vs-KL comparison of everything judged in the run.

Every judged policy is a run; runs that differ only in their training seed are one point (mean over
seeds and prompts, CIs that resample both); points that differ only in the objective's own
hyperparameters are one series (prefkit.comparison). The stage writes and draws: each point with its
CIs and swept values, each seed faint behind it, each series' upper envelope; the SFT model; the
best-of-N curve (KL = log N − (N−1)/N); the optimal KL-regularised frontier π*_β ∝ π_ref·exp(r/β)
estimated from every sampled policy's samples (prefkit.optimal), with each point's gap to it; and
every pair of series compared by reward at matched KL.

Writes frontier.csv (one row per point), frontier_seeds.csv (one per run), optimal.csv,
best_of_n.csv, matched_kl.csv (+ matched_kl_grid.csv), frontier.png/.svg and summary.json.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.table import Table

from prefkit import comparison, estimators, plots
from prefkit.comparison import REFERENCE, Matched, Optimal, Series
from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import jobs, run_dir, start_job, write_json, write_lineage, write_text


def run(cfg: DictConfig) -> None:
    out = start_job(cfg)
    if out is None:
        return
    f = cfg.frontier
    run_path = run_dir(cfg)
    entries, meta = gather(run_path, f.get("judge"))
    runs = [comparison.load_run(entry, judge_job, str(f.kl)) for judge_job, entry in entries]
    series = comparison.group(runs)
    comparison.aggregate(series)
    betas = [math.inf, *np.geomspace(float(f.beta_min), float(f.beta_max), int(f.n_betas)).tolist()]
    opt = comparison.optimal_frontier(runs, betas)
    boot, seed = int(f.bootstrap), int(f.seed)
    if opt is not None:
        comparison.gaps(series, opt, boot, seed)
    else:
        console.print("no SFT/reference samples in the run: no optimal frontier, no best-of-N (sample the SFT model "
                      "too, e.g. sample.n_reference=16)")
    matched = comparison.all_matched(series, int(f.grid), boot, seed)
    bon = best_of_n(runs)

    write_csvs(out, series, opt, matched, bon)
    title = f"reward ({meta['scorer']}) vs KL ({f.kl}) — run {cfg.run.name}"
    plots.frontier(series, opt, bon, out, title, str(f.kl), plots.kl_scale(str(f.kl_scale), series))
    print_tables(series, matched)
    write_json(out / "summary.json", summary(series, opt, matched, meta, str(f.kl), out))
    write_lineage(out, cfg, {"judge_jobs": sorted({r.judge_job for r in runs})})
    console.print(f"frontier: {len(runs)} policies in {sum(len(s.points) for s in series)} points -> "
                  f"{out / 'frontier.png'}")


def gather(run: Path, wanted: str | None) -> tuple[list[tuple[str, dict]], dict]:
    """(judge job, policy entry) of every scored policy, and the scorer and sampling they share:
    judgements made with different scorers or sampling settings cannot be compared on one plot."""
    scored = [j for j in jobs(run, "judge") if (j.path / "summary.json").exists()
              and "policies" in json.loads((j.path / "summary.json").read_text())]
    if wanted:
        scored = [j for j in scored if j.name == wanted]
    if not scored:
        raise UserError(f"no scored samples in {run}: run `prefkit sample run.name={run.name}` and "
                        f"`prefkit judge run.name={run.name}` first")
    entries, kinds = [], {}
    for job in scored:
        summary = json.loads((job.path / "summary.json").read_text())
        kinds[job.name] = (summary.get("scorer"), json.dumps(summary.get("sampling", {}), sort_keys=True))
        entries += [(job.name, {"policy": key, **entry}) for key, entry in summary["policies"].items()]
    if len(set(kinds.values())) > 1:
        clash = "; ".join(f"judge/{name}: scorer {scorer}" for name, (scorer, _) in sorted(kinds.items()))
        raise UserError(f"these judge jobs cannot be compared on one frontier (different scorers or sampling "
                        f"settings): {clash}; choose one with frontier.judge=<job>")
    scorer, sampling = next(iter(kinds.values()))
    return entries, {"scorer": scorer, "sampling": json.loads(sampling)}


def best_of_n(runs: list) -> list[tuple[int, float, float]]:
    """The best-of-N curve from the reference's own samples (N up to its samples per prompt)."""
    ref = next((r for r in runs if r.is_reference), None)
    if ref is None:
        return []
    m = min(len(s) for s in ref.sample_rewards)
    return estimators.best_of_n_curve(ref.sample_rewards, [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= m])


# --- output -------------------------------------------------------------------------------------

def point_rows(series: list[Series]) -> list[dict]:
    rows = []
    for s in series:
        for p in s.points:
            gap = p.gap or (float("nan"),) * 3
            rows.append({"series": s.label, "objective": s.objective, "point": p.label, "seeds": len(p.runs),
                         "seed_list": " ".join(str(x) for x in p.seeds), "reward": p.reward.mean,
                         "reward_low": p.reward.low, "reward_high": p.reward.high, "reward_se_seeds": p.reward.se_seeds,
                         "reward_se_prompts": p.reward.se_prompts, "kl": p.kl.mean, "kl_low": p.kl.low,
                         "kl_high": p.kl.high, "gap_to_optimal": gap[0], "gap_low": gap[1], "gap_high": gap[2],
                         "policies": " ".join(r.key for r in p.runs)})
    return rows


def write_csvs(out: Path, series: list[Series], opt: Optimal | None, matched: list[Matched], bon: list) -> None:
    _csv(out / "frontier.csv", point_rows(series))
    _csv(out / "frontier_seeds.csv", [
        {"series": s.label, "point": p.label, "seed": r.seed, "step": r.step, "policy": r.key,
         "reward": float(r.reward.mean()), "kl": float(r.kl.mean())} for s in series for p in s.points for r in p.runs])
    _csv(out / "optimal.csv", [o.__dict__ for o in opt.points] if opt else [])
    _csv(out / "best_of_n.csv", [{"n": n, "kl": k, "reward": r} for n, k, r in bon])
    _csv(out / "matched_kl.csv", [
        {"a": m.a, "b": m.b, "kl_from": float(m.grid[0]), "kl_to": float(m.grid[-1]), "mean_difference": m.mean[0],
         "low": m.mean[1], "high": m.mean[2], "where_ci_excludes_zero": m.verdict()} for m in matched])
    _csv(out / "matched_kl_grid.csv", [
        {"a": m.a, "b": m.b, "kl": float(k), "difference": float(d), "low": float(lo), "high": float(hi)}
        for m in matched for k, d, lo, hi in zip(m.grid, m.diff, m.low, m.high, strict=True)])


def _csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def _ci(mean: float, low: float, high: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def print_tables(series: list[Series], matched: list[Matched]) -> None:
    table = Table(title="reward-vs-KL frontier (means over seeds and prompts; 95% CIs resample both)")
    for col in ("series", "swept values", "seeds", "reward [95% CI]", "KL [95% CI]", "gap to optimal [95% CI]"):
        table.add_column(col, justify="left" if col in ("series", "swept values") else "right")
    for s in sorted(series, key=lambda s: (s.objective != REFERENCE, s.label)):
        for p in sorted(s.points, key=lambda p: p.kl.mean):
            gap = p.gap or (float("nan"),) * 3
            table.add_row(s.label, p.label or "-", str(len(p.runs)), _ci(p.reward.mean, p.reward.low, p.reward.high),
                          _ci(p.kl.mean, p.kl.low, p.kl.high), _ci(*gap, signed=True))
    console.print(table)
    if not matched:
        console.print("reward at matched KL: no two series share a KL range (each seed's upper envelope needs two "
                      "points or more: sweep a hyperparameter, or keep checkpoints)")
        return
    table = Table(title="reward at matched KL: A − B, mean over the common KL range (95% CI over seeds and prompts)")
    for col in ("A", "B", "KL range", "mean A − B [95% CI]", "where the CI excludes 0"):
        table.add_column(col)
    for m in matched:
        table.add_row(m.a, m.b, f"[{m.grid[0]:.2f}, {m.grid[-1]:.2f}]", _ci(*m.mean, signed=True), m.verdict())
    console.print(table)


def summary(series: list[Series], opt: Optimal | None, matched: list[Matched], meta: dict, kl_key: str,
            out: Path) -> dict:
    """Everything the report needs, as data."""
    return {"kl_estimator": kl_key, "scorer": meta["scorer"], "sampling": meta["sampling"],
            "points": point_rows(series),
            "optimal": [o.__dict__ for o in opt.points] if opt else [],
            "matched_kl": [{"a": m.a, "b": m.b, "grid": m.grid.tolist(), "diff": m.diff.tolist(), "low": m.low.tolist(),
                            "high": m.high.tolist(), "mean": list(m.mean), "verdict": m.verdict()} for m in matched],
            "plot": str(out / "frontier.png")}

"""`prefkit run experiment=<name>`: an experiment's stages in order, each an ordinary prefkit
command in the same run directory, then its claims.

Every stage skips what is complete and resumes what was killed, so rerunning an experiment after a
kill (or with one more claim) redoes nothing that is done. The experiment's own job directory,
<run>/experiment/<name>/, holds plan.json (the commands), timings.tsv (wall time per stage),
claims.json (each claim's statistic, CI and verdict), and lineage.json once all is done. A
`report` stage, if listed, runs after the claims so the report shows them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table

from prefkit import claims, comparison, experiment
from prefkit.console import console
from prefkit.errors import UserError
from prefkit.rundir import run_dir, start_job, write_json, write_lineage, write_text


def run(cfg: DictConfig) -> None:
    out = start_job(cfg, incremental=True)  # rerunning a finished experiment re-tests its claims
    plan = experiment.plan(cfg.experiment)
    run_path = run_dir(cfg)
    write_json(out / "plan.json", {"name": plan.name, "title": plan.title, "commands": [str(s) for s in plan.steps]})
    console.print(f"[bold]experiment {plan.name}[/]: {plan.title} -> {run_path}")
    timings, t_start = [], time.perf_counter()
    before_report = [s for s in plan.steps if s.stage != "report"]
    for step in before_report:
        i = plan.steps.index(step) + 1
        timings.append((f"{i} {step.stage}", _run_step(step, cfg, i, len(plan.steps))))
    if plan.claims:
        t0 = time.perf_counter()
        results = test_claims(plan, run_path, cfg)
        write_json(out / "claims.json", claims.as_json(results))
        print_claims(results)
        timings.append(("claims", time.perf_counter() - t0))
    for step in (s for s in plan.steps if s.stage == "report"):
        i = plan.steps.index(step) + 1
        timings.append((f"{i} report", _run_step(step, cfg, i, len(plan.steps))))
    timings.append(("total", time.perf_counter() - t_start))
    write_text(out / "timings.tsv", "".join(f"{name}\t{sec:.0f}\n" for name, sec in timings))
    write_lineage(out, cfg, {"commands": [str(s) for s in plan.steps]})
    console.print("wall time per stage (s): " + ", ".join(f"{name} {sec:.0f}" for name, sec in timings))


def _run_step(step: experiment.Step, cfg: DictConfig, i: int, n: int) -> float:
    command = step.command(sys.executable, str(cfg.run.name), str(cfg.run.root))
    console.print(f"[bold]== {i}/{n}[/] {escape(str(step))} run.name={cfg.run.name}")
    t0 = time.perf_counter()
    proc = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise UserError(f"stage {i} ({step}) stopped with exit status {proc.returncode}; fix what it said, then "
                        f"rerun `prefkit run experiment={cfg.experiment.name}`: what is complete is kept")
    return time.perf_counter() - t0


def test_claims(plan: experiment.Plan, run_path: Path, cfg: DictConfig) -> list[claims.Result]:
    """The claims on the run's frontier judgements and training logs."""
    from prefkit.stages.frontier import gather

    entries, _ = gather(run_path, cfg.test.get("judge"))
    runs = [comparison.load_run(entry, job, str(cfg.test.kl)) for job, entry in entries]
    series = comparison.group(runs)
    comparison.aggregate(series)
    ctx = claims.Context(run_path, series, int(cfg.test.bootstrap), int(cfg.seed))
    return claims.evaluate(plan.claims, ctx)


def print_claims(results: list[claims.Result]) -> None:
    table = Table(title="claims (direction: the sign the statistic is claimed to have; 95% CIs)")
    for col in ("claim", "source", "statistic", "estimate [95% CI]", "claimed", "verdict"):
        table.add_column(col)
    colour = {"holds": "green", "does not hold": "red", "inconclusive": "yellow"}
    for r in results:
        ci = "–" if r.estimate != r.estimate else f"{r.estimate:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"
        table.add_row(escape(r.description), escape(r.source), escape(f"{r.statistic}: {r.detail}"), ci,
                      f"{r.direction} 0",
                      f"[{colour[r.verdict]}]{r.verdict}[/]")
    console.print(table)

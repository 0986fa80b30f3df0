"""`prefkit status [run.name=...] [--json]`: every job of a run, by stage, with its state and its
headline numbers. Reads the run directory; writes nothing.

States: complete; stale (complete, but a job it read has changed since); running (its lock is held
by a live process); killed (started, not complete, nobody holds it: rerunning the command resumes
it). Headlines: SFT held-out loss and perplexity; reward-model accuracy; an aligned policy's
held-out reward accuracy and, once judged, its reward and KL, and its win rate against the SFT
model where one was judged (with the CI of each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefkit.rundir import LINEAGE, LOCK, Job, _holder_alive, jobs, stale_inputs

STAGES = ("sft", "reward", "align", "sample", "judge", "frontier", "report", "experiment")


def state(job: Job) -> str:
    if (job.path / LINEAGE).exists():
        return "stale" if stale_inputs(job.lineage()) else "complete"
    lock = job.path / LOCK
    if lock.exists():
        try:
            if _holder_alive(json.loads(lock.read_text())) is not False:
                return "running"
        except (OSError, json.JSONDecodeError):
            pass
    return "killed" if (job.path / "config.yaml").exists() else "empty"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _ci(entry: dict, key: str = "mean") -> str:
    return f"{entry[key]:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _judged(run: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per policy key: its score entry (reward, KL) and its win rate, from the newest judge jobs."""
    scores, wins = {}, {}
    for job in jobs(run, "judge"):
        summary = _read(job.path / "summary.json")
        scores.update(summary.get("policies", {}) if isinstance(summary.get("policies"), dict) else {})
        winrates = _read(job.path / "winrates.json")
        wins.update({k: {**v, "baseline": winrates.get("baseline")} for k, v in winrates.get("results", {}).items()})
    return scores, wins


def headline(job: Job, scores: dict, wins: dict) -> str:
    summary = _read(job.path / "summary.json")
    if job.stage == "sft" and "eval_loss" in summary:
        return f"held-out loss {summary['eval_loss']:.3f}, perplexity {summary['eval_perplexity']:.2f}"
    if job.stage == "reward" and "eval_accuracy" in summary:
        return f"held-out accuracy {summary['eval_accuracy']:.3f}"
    if job.stage == "align":
        parts = []
        if "eval_rewards/accuracies" in summary:
            parts.append(f"held-out accuracy {summary['eval_rewards/accuracies']:.3f}")
        entry = scores.get(f"align/{job.name}")
        if entry:
            parts.append(f"reward {_ci(entry['reward'])}")
            if "exact" in entry.get("kl", {}):
                parts.append(f"KL {_ci(entry['kl']['exact'])}")
        win = wins.get(f"align/{job.name}")
        if win:
            parts.append(f"win rate vs {win['baseline']} {_ci(win, 'rate')}")
        return ", ".join(parts)
    if job.stage == "sample":
        return f"{len(_read(job.path / 'policies.json'))} policies sampled"
    if job.stage == "judge":
        task = job.config.judge.task if (job.path / "config.yaml").exists() else "?"
        return f"task {task}" + (f", {len(summary['policies'])} policies scored" if "policies" in summary else "")
    if job.stage == "frontier" and "points" in summary:
        return f"{len(summary['points'])} points"
    if job.stage == "experiment":
        claims = _read(job.path / "claims.json").get("claims", [])
        held = sum(c["verdict"] == "holds" for c in claims)
        return f"{len(claims)} claims: {held} hold" if claims else ""
    return ""


def rows(run: Path) -> list[dict[str, Any]]:
    scores, wins = _judged(run)
    out = []
    for stage in STAGES:
        for job in jobs(run, stage, done_only=False):
            out.append({"stage": stage, "job": job.name, "state": state(job), "headline": headline(job, scores, wins),
                        "path": str(job.path)})
    return out


def show(run: Path, as_json: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from prefkit.console import console

    found = rows(run)
    if as_json:
        print(json.dumps(found, indent=2))
        return
    if not found:
        console.print(f"no jobs in {run} yet: start with `prefkit sft run.name={run.name}`")
        return
    colour = {"complete": "green", "stale": "yellow", "running": "cyan", "killed": "red", "empty": "dim"}
    table = Table(title=f"run {run.name} ({run})")
    for col in ("stage", "job", "state", "headline"):
        table.add_column(col)
    for r in found:
        table.add_row(r["stage"], escape(r["job"]), f"[{colour[r['state']]}]{r['state']}[/]", escape(r["headline"]))
    console.print(table)

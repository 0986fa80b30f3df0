"""prefkit from Python: every stage with the same configs, overrides and code as the CLI.

    from prefkit import api

    api.sft("train.max_steps=100")
    dpo = api.align(objective="dpo", overrides=["objective.beta=0.3"])
    dpo.summary["eval_rewards/accuracies"]     # the job's summary.json, as a dict
    dpo.metrics()                              # metrics.jsonl as a pandas DataFrame
    api.sample(); api.judge()
    api.frontier().table("frontier")           # frontier.csv as a DataFrame
    api.status()                               # every job of the run, as `prefkit status` shows it

A call composes the stage's config from `overrides` and the keyword choices (`objective="dpo"` is
the override `objective=dpo`), validates it as the CLI does, and runs it through the same Hydra
entry point, in this process; it returns the job (a list of jobs with `multirun=True`). A bad
override raises prefkit.errors.UserError with the CLI's one-line message; Ctrl-C raises
prefkit.config.Stopped after the checkpoint is written. Note that Hydra configures logging on
each call, as it does for a command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefkit import rundir


@dataclass(frozen=True)
class Job(rundir.Job):
    """A job directory of a run (<run.root>/<run.name>/<stage>/<job>) and what it wrote: its
    `stage`, `name`, `config` and `lineage()` (prefkit.rundir.Job), and the readers below."""

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json ({} for a stage that writes none)."""
        file = self.path / "summary.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def metrics(self):
        """The training log (metrics.jsonl) as a DataFrame, one row per logged step."""
        import pandas as pd

        return pd.read_json(self.path / "metrics.jsonl", lines=True)

    def table(self, name: str):
        """A CSV the job wrote (`frontier`, `matched_kl`, `optimal`, ...) as a DataFrame."""
        import pandas as pd

        file = self.path / f"{name}.csv"
        if not file.exists():
            have = ", ".join(sorted(p.stem for p in self.path.glob("*.csv"))) or "none"
            raise FileNotFoundError(f"{self.stage}/{self.name} wrote no {name}.csv (its tables: {have})")
        return pd.read_csv(file)


def run(stage: str, overrides: list[str] | tuple[str, ...] = (), *, multirun: bool = False,
        **choices: Any) -> Job | list[Job]:
    """Run `stage` as `prefkit <stage> [-m] <overrides> <key>=<value>...` would."""
    from prefkit.cli import STAGES, load_stage
    from prefkit.config import execute

    if stage not in STAGES:
        from prefkit.errors import UserError

        raise UserError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    args = (["-m"] if multirun else []) + list(overrides) + [f"{k}={_value(v)}" for k, v in choices.items()]
    ran = [Job(p) for p in execute(stage, args, lambda: load_stage(STAGES[stage][0]))]
    return ran if multirun else ran[0]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def sft(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("sft", overrides, **kw)


def reward(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("reward", overrides, **kw)


def align(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("align", overrides, **kw)


def sample(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("sample", overrides, **kw)


def judge(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("judge", overrides, **kw)


def frontier(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("frontier", overrides, **kw)


def report(overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job | list[Job]:
    return run("report", overrides, **kw)


def status(name: str = "default", root: str | Path = "outputs"):
    """Every job of the run (stage, job, state, headline, path) as a DataFrame."""
    import pandas as pd

    from prefkit.status import rows

    return pd.DataFrame(rows(Path(root) / name), columns=["stage", "job", "state", "headline", "path"])


def experiment(name: str, overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Job:
    """`prefkit run experiment=<name>`: its stages in order, then its claims (the job's claims.json)."""
    return run("run", [f"experiment={name}", *overrides], **kw)

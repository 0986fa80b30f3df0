"""`dataset=labeled`: preference pairs that `prefkit judge judge.task=label` made from the run's
own samples (the synthetic-pairs loop: sample N=2 from the SFT model, label with the oracle)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefkit.errors import UserError
from prefkit.rundir import jobs, read_jsonl


def pairs_file(ds: DictConfig, run: Path | None) -> Path:
    if run is None:
        raise UserError("dataset=labeled reads the run directory's labelled pairs; no run directory given")
    labelled = [j for j in jobs(run, "judge") if (j.path / "pairs.jsonl").exists()]
    if ds.get("job"):
        labelled = [j for j in labelled if j.name == str(ds.job)]
    if len(labelled) != 1:
        names = ", ".join(j.name for j in labelled) or "none"
        hint = (f"run `prefkit judge run.name={run.name} judge.task=label` first" if not labelled
                else "choose one with dataset.job=<judge job>")
        raise UserError(f"dataset=labeled needs one judge job with pairs.jsonl in {run} (found: {names}); {hint}")
    return labelled[0].path / "pairs.jsonl"


def load(ds: DictConfig, kind: str, split: str, run: Path | None) -> list[dict]:
    rows = [r for r in read_jsonl(pairs_file(ds, run)) if r.get("split", "train") == split]
    if kind == "preference":
        return [{"prompt": r["prompt"], "completions": r["completions"], "rewards": r["rewards"]} for r in rows]
    if kind == "sft":  # the preferred completions
        return [{"prompt": r["prompt"], "completion": r["completions"][0]} for r in rows]
    return [{"prompt": r["prompt"], "reference": r["completions"][0]} for r in rows]

"""`dataset=labeled`: preference pairs that `prefkit judge judge.task=label` made from the run's
own samples (the synthetic-pairs loop: sample N=2 from the SFT model, label with the oracle)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefkit.data import check_rows
from prefkit.datasets.base import register
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


class Labeled:
    def __init__(self, ds: DictConfig, kind: str, tokenizer=None, run: Path | None = None):
        self.ds, self.kind, self.run = ds, kind, run

    def rows(self, split: str) -> list[dict]:
        path = pairs_file(self.ds, self.run)
        rows = [r for r in read_jsonl(path) if r.get("split", "train") == split]
        if self.kind == "preference":
            rows = [{"prompt": r["prompt"], "completions": r["completions"], "rewards": r["rewards"]} for r in rows]
        elif self.kind == "sft":  # the preferred completions
            rows = [{"prompt": r["prompt"], "completion": r["completions"][0]} for r in rows]
        else:
            rows = [{"prompt": r["prompt"], "reference": r["completions"][0]} for r in rows]
        return check_rows(rows, self.kind, f"{path} ({self.kind}, {split})", str(self.ds.get("on_bad_row", "error")))


register("labeled", Labeled)

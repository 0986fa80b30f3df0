"""Hydra's submitit launcher with prefkit: the Hydra side of the SLURM path. `hydra/launcher=
submitit_local` runs each job of an align sweep as its own process through submitit, as
`submitit_slurm` does on a cluster (the README's SLURM example differs only in the launcher's name
and its settings)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_ALIGN, prefkit

pytestmark = pytest.mark.slow  # two jobs in their own processes, about 20 s


def test_submitit_local_runs_a_two_job_align_sweep(sft_run):
    prefkit("align", "-m", "run.name=shared", *TINY_ALIGN, "seed=7", "objective=dpo,simpo",
            "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", cwd=sft_run)
    align = sft_run / "outputs/shared/align"
    done = {}
    for summary in align.glob("*/summary.json"):
        config = (summary.parent / "config.yaml").read_text()
        if "seed: 7" in config:
            done[summary.parent.name.split("_")[0]] = json.loads(summary.read_text())
    assert sorted(done) == ["dpo", "simpo"]
    assert all("eval_loss" in s for s in done.values())
    # submitit's own records of the two jobs it ran (one folder of logs per job)
    assert len([p for p in (align / ".submitit").iterdir() if p.is_dir()]) >= 2

"""Hydra launchers and sweepers with prefkit. `hydra/launcher=submitit_local` runs each job of an
align sweep as its own process through submitit, as `submitit_slurm` does on a cluster (the
README's SLURM example differs only in the launcher's name and its settings). `hydra/sweeper=optuna`
is prefkit's own Optuna sweeper (hydra_plugins/prefkit_optuna_sweeper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_ALIGN, prefkit
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

# the module, not its names: Hydra's plugin scan re-executes it, which redefines its classes
from hydra_plugins.prefkit_optuna_sweeper import optuna_sweeper


@pytest.mark.slow  # two jobs in their own processes, about 20 s
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


@pytest.mark.slow  # two tiny align jobs in one process, about 8 s
@pytest.mark.parametrize("metric, direction", [("eval_loss", "minimize"), ("eval_rewards/margins", "maximize")])
def test_optuna_sweeper_runs_a_two_trial_search_whose_values_are_the_jobs_metric(metric, direction, sft_run):
    study = direction
    prefkit("align", "-m", "run.name=shared", *TINY_ALIGN, "seed=8", "objective=dpo", "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0", f"hydra.sweeper.study_name={study}",
            f"hydra.sweeper.direction={direction}", f"sweep_metric={metric}",
            "objective.beta=tag(log,interval(0.02,0.5))", cwd=sft_run)
    results = OmegaConf.to_container(OmegaConf.load(sft_run / f"outputs/shared/align/optuna_{study}.yaml"))
    trials = results["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    betas = [t["params"]["objective.beta"] for t in trials]
    assert all(0.02 <= b <= 0.5 for b in betas) and betas[0] != betas[1]
    for trial, beta in zip(trials, betas, strict=True):
        job = Path(trial["job"])
        assert OmegaConf.load(job / "config.yaml").objective.beta == pytest.approx(beta, rel=1e-12)
        assert trial["value"] == json.loads((job / "summary.json").read_text())[metric]
    pick = min if direction == "minimize" else max
    best = pick(trials, key=lambda t: t["value"])
    assert trials[0]["value"] != trials[1]["value"]  # else the best trial would not be defined by the values
    assert results["best"] == {"number": best["number"], "params": best["params"], "value": best["value"]}


def test_optuna_search_space_follows_hydras_sweep_syntax():
    space, fixed = optuna_sweeper.search_space(["objective=dpo", "objective.beta=tag(log,interval(0.01,0.5))",
                                 "train.lr=interval(1e-5,1e-4)", "train.max_steps=range(100,400,100)",
                                 "+extra.k=tag(int,interval(1.5,6))", "objective.loss=choice(sigmoid,hinge)",
                                 "train.warmup=range(0,0.3,0.1)", "seed=choice(1,2)", "seed=3"])
    assert fixed == ["objective=dpo", "seed=3"]  # a later override of a key replaces the earlier one
    assert space["objective.beta"] == ("objective.beta", FloatDistribution(0.01, 0.5, log=True))
    assert space["train.lr"][1] == FloatDistribution(1e-5, 1e-4)
    assert space["train.max_steps"][1] == IntDistribution(100, 300, step=100)  # Hydra's range excludes its stop
    assert space["extra.k"] == ("+extra.k", IntDistribution(2, 6))
    assert space["objective.loss"][1] == CategoricalDistribution(["sigmoid", "hinge"])
    assert [float(v) for v in space["train.warmup"][1].choices] == pytest.approx([0.0, 0.1, 0.2])  # floats: categorical
    assert "seed" not in space
    for bad in ["objective.beta=interval(0.5,0.1)", "objective.beta=tag(log,interval(0,1))",
                "train.max_steps=range(5,1)", "objective=glob(*)", "train.max_steps=tag(int,interval(1.2,1.8))"]:
        with pytest.raises(optuna_sweeper.SearchSpaceError):
            optuna_sweeper.search_space([bad])


@pytest.mark.slow  # one tiny align job (or none: the search above made it), about 5 s
def test_a_trial_that_stops_with_an_error_is_recorded_and_stops_the_sweep(sft_run):
    proc = prefkit("align", "-m", "run.name=shared", *TINY_ALIGN, "seed=8", "objective=dpo", "hydra/sweeper=optuna",
                   "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.study_name=broken",
                   "sweep_metric=eval_nope", "objective.beta=tag(log,interval(0.02,0.5))", cwd=sft_run, check=False)
    assert proc.returncode == 2 and "sweep_metric=eval_nope" in proc.stderr and "Traceback" not in proc.stderr
    results = OmegaConf.to_container(OmegaConf.load(sft_run / "outputs/shared/align/optuna_broken.yaml"))
    assert [t["state"] for t in results["trials"]] == ["FAIL"] and results["best"] is None  # the second never ran


@pytest.mark.slow  # two tiny align jobs that stop after two steps, about 8 s
def test_a_diverging_trial_fails_and_the_search_goes_on(sft_run):
    proc = prefkit("align", "-m", "run.name=shared", *TINY_ALIGN, "seed=9", "objective=dpo", "hydra/sweeper=optuna",
                   "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=diverge", "train.max_bad_steps=2",
                   "train.lr=tag(log,interval(1e25,1e30))", cwd=sft_run)  # every trial's weights blow up
    trials = OmegaConf.to_container(OmegaConf.load(sft_run / "outputs/shared/align/optuna_diverge.yaml"))["trials"]
    assert [t["state"] for t in trials] == ["FAIL", "FAIL"]
    assert all("non-finite" in t["error"] for t in trials)
    assert proc.stdout.count("the search goes on") == 2


def test_align_returns_its_sweep_metric_or_names_the_ones_it_has():
    from prefkit.errors import UserError
    from prefkit.stages.align import sweep_value

    summary = {"eval_loss": 0.69, "eval_rewards/accuracies": 0.5, "objective": "dpo"}
    assert sweep_value(OmegaConf.create({}), summary) == 0.69  # the default: the held-out loss
    assert sweep_value(OmegaConf.create({"sweep_metric": "eval_rewards/accuracies"}), summary) == 0.5
    for wrong in ("eval_accuracy", "objective"):  # absent, or not a number
        with pytest.raises(UserError, match="eval_loss, eval_rewards/accuracies"):
            sweep_value(OmegaConf.create({"sweep_metric": wrong}), summary)


@pytest.mark.slow  # one CLI start-up, about 6 s
def test_optuna_sweep_without_a_search_space_stops_with_one_line(tmp_path):
    proc = prefkit("align", "-m", "hydra/sweeper=optuna", "objective.beta=0.1", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "no search space" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # stopped before any job or sweep record was written

"""Experiments (conf/experiment/*.yaml): every one composes (every command of every sweep, its
claims and their pairing with the planned jobs); a bad one stops before anything runs; one runs
end to end at a reduced size and ends in a claims table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import prefkit

from prefkit.config import conf_dir, validate
from prefkit.errors import UserError

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def test_there_are_the_four_papers_experiments_and_their_real_model_settings():
    assert {"main", "tdpo_imdb", "exo_imdb", "edpo_hh_analysis", "drdo_noise"} <= set(EXPERIMENTS)
    assert len([e for e in EXPERIMENTS if e.startswith("paper_")]) == 7


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    validate("run", [f"experiment={name}"])


BAD = [
    (["experiment.stages.0.0=sftt"], "stage 1 is 'sftt', which is not a stage"),
    (["experiment.claims.0.statistic.kind=nope"], "unknown statistic 'nope'"),
    (["experiment.claims.0.statistic.a.objective=simpo"], "claim exo_above_dpo cannot be paired"),
    (["experiment.claims.0.direction=up"], "direction must be > or <"),
    (['+experiment.extra.align=["objective.alpah=1"]'], "objective.alpah is not an option of align"),
    (['+experiment.extra.nope=["x=1"]'], "extra names unknown stage(s) nope"),
]
TDPO_BAD = [
    (["experiment.claims.0.statistic.metric=eval_kl/margn"],
     "claim dpo_rejected_seqkl_grows_faster reads the training metric eval_kl/margn, which no align job of dpo logs"),
    # DPO logs SeqKL only because this experiment turns the diagnostic on
    (['+experiment.extra.align=["diagnostics.seq_kl=false"]'],
     "reads the training metric eval_kl/margin, which no align job of dpo logs"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_experiment_stops_before_anything_runs(overrides, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate("run", ["experiment=main", *overrides])


@pytest.mark.parametrize(("overrides", "expected"), TDPO_BAD, ids=[b[1][:40] for b in TDPO_BAD])
def test_a_claim_on_a_metric_no_job_logs_stops_before_anything_runs(overrides, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate("run", ["experiment=tdpo_imdb", *overrides])


def test_extra_overrides_replace_the_stages_own():
    from omegaconf import OmegaConf

    from prefkit.experiment import plan

    exp = OmegaConf.create({"name": "x", "stages": [["align", "objective=dpo,exo", "seed=0,1,2"]],
                            "extra": {"align": ["seed=0", "train.max_steps=4"]}})
    (step,) = plan(exp).steps
    assert step.overrides == ["objective=dpo,exo", "seed=0", "train.max_steps=4"] and step.sweep


TINY = {"sft": ["model=tiny_test", "dataset=synthetic_test", "train.max_steps=40", "train.eval_every=40",
                "train.save_every=0"],
        "sample": ["model=tiny_test", "dataset=synthetic_test", "sample.max_new_tokens=16", "sample.n_reference=8",
                   "sample.max_prompts=48"],
        "judge": ["model=tiny_test", "dataset=synthetic_test"],
        "reward": ["model=tiny_test", "train.max_steps=4", "train.batch_size=8", "hardware.micro_batch_size=8",
                   "train.eval_every=4", "train.save_every=0"],
        "align": ["model=tiny_test", "seed=0,1", "train.max_steps=6", "train.batch_size=8",
                  "hardware.micro_batch_size=8", "train.save_every=0", "train.eval_every=6"]}


@pytest.mark.slow
def test_an_experiment_runs_end_to_end_and_tests_its_claims(tmp_path):
    extra = [f'+experiment.extra.{stage}=[{",".join(json.dumps(o) for o in overrides)}]'
             for stage, overrides in TINY.items()]
    # drdo_noise's stages and claims, cut to the clean and 40%-noise settings its claims read
    # (tests/conf/experiment/claims_test.yaml; 13 stages instead of 16, ~40 s less)
    proc = prefkit("run", "experiment=claims_test", *extra, cwd=tmp_path, timeout=1200)
    run = tmp_path / "outputs/claims_test"
    (job,) = (run / "experiment").iterdir()
    claims = json.loads((job / "claims.json").read_text())["claims"]
    assert [c["name"] for c in claims] == ["drdo_reward_falls_less_with_noise", "drdo_win_rate_falls_less_with_noise",
                                           "drdo_lowers_rejected_more", "drdo_raises_chosen", "dpo_raises_chosen"]
    for c in claims:
        assert c["verdict"] in ("holds", "does not hold", "inconclusive")
        assert c["verdict"] == "inconclusive" or c["low"] <= c["estimate"] <= c["high"], c
    assert "claims" in proc.stderr + proc.stdout and (job / "lineage.json").exists()
    timings = (job / "timings.tsv").read_text()
    assert "claims" in timings and "total" in timings
    assert (run / "report/report/report.html").read_text().count("Claims") >= 1
    assert Path(run / "align").is_dir()


@pytest.mark.slow
def test_rerunning_an_experiment_redoes_nothing_that_is_done(tmp_path):
    """(On a small experiment: rerunning drdo_noise above would cost ~110 s of suite time, most of it
    starting one process per stage.)"""
    first = prefkit("run", "experiment=rerun_test", cwd=tmp_path)
    assert "already complete" not in first.stderr + first.stdout
    again = prefkit("run", "experiment=rerun_test", cwd=tmp_path)
    assert (again.stderr + again.stdout).count("already complete") == 3  # sft, and align's two jobs

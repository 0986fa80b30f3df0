"""The Python API: the CLI's configs, validation and code, in-process, returning jobs as data."""

import pytest
from conftest import TINY, TINY_SFT, prefkit

from prefkit import api
from prefkit.errors import UserError

pytestmark = pytest.mark.slow  # trains (briefly)


def test_stages_run_in_process_and_return_their_jobs_as_data(in_run_dir):
    sft = api.sft([*TINY_SFT, "run.name=nb"])
    assert sft.path.parent == in_run_dir / "outputs/nb/sft" and sft.stage == "sft" and (sft.path / "model").is_dir()
    assert sft.summary["eval_loss"] > 0
    steps = sft.metrics()
    assert steps["step"].max() == 16 and "loss" in steps.columns
    dpo = api.align(["run.name=nb", *TINY, "train.max_steps=2", "train.batch_size=8", "hardware.micro_batch_size=8"],
                    objective="dpo", seed=1)
    assert dpo.path.name.startswith("dpo_seed-1") and dpo.config.objective.name == "dpo"
    assert 0.0 <= dpo.summary["eval_rewards/accuracies"] <= 1.0
    table = api.status("nb")
    assert list(table["stage"]) == ["sft", "align"] and set(table["state"]) == {"complete"}


def test_a_sweep_returns_every_job(in_run_dir):
    api.sft([*TINY_SFT, "run.name=sw"])
    jobs = api.align(["run.name=sw", *TINY, "train.max_steps=1", "train.batch_size=8", "hardware.micro_batch_size=8",
                      "objective=dpo,ipo"], multirun=True)
    assert sorted(j.name.split("_")[0] for j in jobs) == ["dpo", "ipo"] and all(j.summary for j in jobs)


def test_bad_input_raises_the_clis_one_line_and_writes_nothing(in_run_dir):
    with pytest.raises(UserError, match=r"unknown objective 'dop' \(did you mean dpo\?\)") as err:
        api.align(objective="dop")
    cli = prefkit("align", "objective=dop", cwd=in_run_dir, check=False)
    assert str(err.value) in cli.stderr and cli.returncode == 2
    with pytest.raises(UserError, match="no completed sft job"):
        api.align([*TINY, "run.name=empty"])
    assert not (in_run_dir / "outputs/empty/align").exists() or not any((in_run_dir / "outputs/empty/align").iterdir())

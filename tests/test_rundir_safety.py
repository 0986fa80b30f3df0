"""The run directory as a safe store: destructive operations stay inside it, checkpoints hold no
pickle, one writer per job, a job continues only under its own config, damage is detected, and
the smaller things a kill or a shared file system brings (one test per defect)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_ALIGN, TINY_SFT, prefkit
from test_trainer import Killed, _cfg, _setup, _weights

from prefkit import checkpoint
from prefkit.errors import UserError
from prefkit.rundir import _tmp, check_inside, check_name, job_lock, remove_stale_temporaries

# --- 1. names and destructive operations ---------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "../../etc", "a/b", ".hidden", "a\\b", "", "x" * 201, "a b", "a,b"])
def test_bad_names_are_refused(name):
    with pytest.raises(UserError, match="bad job"):
        check_name(name, "job")


@pytest.mark.parametrize("name", ["dpo", "tdpo2_a0.3", "run-1", "beta=0.1", "x" * 200])
def test_good_names_pass(name):
    assert check_name(name, "job") == name


def test_destructive_operations_stay_inside(tmp_path):
    stage = tmp_path / "run" / "align"
    (stage / "job").mkdir(parents=True)
    assert check_inside(stage / "job", stage) == (stage / "job").resolve()
    for outside in (stage, stage / "..", tmp_path, stage / "job" / ".." / ".."):
        with pytest.raises(UserError, match="refusing to modify"):
            check_inside(outside, stage)


@pytest.mark.slow
def test_overwrite_of_the_run_root_is_refused_and_nothing_is_deleted(sft_run):
    before = sorted(p.relative_to(sft_run) for p in (sft_run / "outputs").rglob("*"))
    for bad in ("job=..", "job=."):
        proc = prefkit("sft", "run.name=shared", bad, "overwrite=true", *TINY_SFT, cwd=sft_run, check=False)
        assert proc.returncode == 2 and "bad job" in proc.stderr
    assert sorted(p.relative_to(sft_run) for p in (sft_run / "outputs").rglob("*")) == before


# --- 2. no pickle in checkpoints ----------------------------------------------------------------

class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_never_loaded(tmp_path):
    trainer = _setup(tmp_path, _cfg(max_steps=4, save_every=0))
    planted = tmp_path / "job/checkpoints/step-3"
    planted.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    payload = _Planted()
    payload.marker = marker
    (planted / "trainer_state.pt").write_bytes(pickle.dumps(payload))
    assert not trainer.maybe_resume()  # refused, set aside, and training starts over
    assert not marker.exists()
    assert not planted.exists() and (tmp_path / "job/checkpoints/corrupt-step-3/trainer_state.pt").exists()
    with pytest.raises(checkpoint.CorruptCheckpoint, match="pickle files, which prefkit never loads"):
        checkpoint.load(tmp_path / "job/checkpoints/corrupt-step-3")


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    trainer = _setup(tmp_path, _cfg(max_steps=3, save_every=3))
    trainer.save_checkpoint()
    files = sorted(p.name for p in (tmp_path / "job/checkpoints/step-0").iterdir())
    assert files == ["state.json", "state.safetensors", "weights.safetensors"]
    json.loads((tmp_path / "job/checkpoints/step-0/state.json").read_text())


def test_the_state_codec_round_trips_what_training_keeps():
    import numpy as np

    state = {"python": (3, (1, 2, 3), None), "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]},
             "nan": float("nan")}
    tensors: dict = {}
    encoded = json.loads(json.dumps(checkpoint.encode(state, tensors)))
    back = checkpoint.decode(encoded, tensors)
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert list(back["optimizer"]["state"]) == [0] and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    with pytest.raises(TypeError, match="cannot checkpoint"):
        checkpoint.encode({"f": object()}, {})


# --- 4. one writer per job ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_writer_stops_with_one_line_naming_the_first(sft_run):
    job = sft_run / "outputs/shared/sample/locked"
    job.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (job / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                               "since": "earlier", "command": "prefkit sample job=locked"}))
        proc = prefkit("sample", "run.name=shared", "job=locked", "sample.policies=[sft]", "sample.max_prompts=2",
                       *TINY, cwd=sft_run, check=False)
    finally:
        holder.kill()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"is in use by pid {holder.pid}" in lines[0] and "prefkit sample job=locked" in lines[0]
    assert (job / ".lock").exists() and not (job / "config.yaml").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    with job_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_held_in_this_process_refuses_a_second_holder(tmp_path):
    with job_lock(tmp_path), pytest.raises(UserError, match="is in use by pid"), job_lock(tmp_path):
        pass


def test_temporary_names_are_unique():
    path = Path("/x/samples.jsonl")
    assert _tmp(path) != _tmp(path) and _tmp(path).name.startswith(".samples.jsonl.tmp-")


# --- 5. a job continues only under its own config ----------------------------------------------

@pytest.mark.slow
def test_rerun_with_another_config_is_refused_naming_the_keys(sft_run):
    args = ["sample", "run.name=shared", "job=temp", "sample.policies=[sft]", "sample.max_prompts=2",
            "sample.max_new_tokens=8", *TINY]
    prefkit(*args, cwd=sft_run)
    proc = prefkit(*args, "sample.temperature=0.7", cwd=sft_run, check=False)
    assert proc.returncode == 2 and "sample.temperature: 1.0 -> 0.7" in proc.stderr, proc.stderr
    prefkit(*args, "hardware.num_threads=1", cwd=sft_run)  # threads do not change results: accepted


@pytest.mark.slow
def test_an_explicit_job_reused_with_another_objective_is_refused(sft_run):
    (sft_run / "outputs/shared/align/mine").mkdir(parents=True)
    (sft_run / "outputs/shared/align/mine/config.yaml").write_text("objective:\n  name: dpo\n")
    proc = prefkit("align", "run.name=shared", "job=mine", "objective=exo", *TINY_ALIGN, cwd=sft_run, check=False)
    assert proc.returncode == 2 and "objective.name: dpo -> exo" in proc.stderr, proc.stderr


# --- 6. damage is detected ----------------------------------------------------------------------

def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    straight = _setup(tmp_path / "a", _cfg())
    straight.fit()
    crashed = _setup(tmp_path / "b", _cfg(), fail_at=15)  # killed in step 8: checkpoints 3 and 6 exist
    with pytest.raises(Killed):
        crashed.fit()
    weights = tmp_path / "b/job/checkpoints/step-6/weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a full disk
    resumed = _setup(tmp_path / "b", _cfg())
    resumed.fit()
    assert (tmp_path / "b/job/checkpoints/corrupt-step-6").is_dir()
    a, b = _weights(straight), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # exact, from step 3


@pytest.mark.slow
def test_a_cut_samples_file_is_reported_then_sampled_again(sft_run):
    args = ["run.name=shared", "job=cut", "sample.policies=[sft]", "sample.max_prompts=3", "sample.n=2",
            "sample.max_new_tokens=8", *TINY]
    prefkit("sample", *args, cwd=sft_run)
    (samples,) = (sft_run / "outputs/shared/sample/cut").glob("sft/*/samples.jsonl")
    whole = samples.read_text()
    samples.write_text(whole[: len(whole) - 20])
    proc = prefkit("judge", "run.name=shared", "job=cut", "judge.samples=cut", *TINY, cwd=sft_run, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "line 6 is not a whole JSON row" in lines[0], proc.stderr
    assert "rerun `prefkit sample run.name=shared job=cut`" in lines[0]
    redo = prefkit("sample", *args, cwd=sft_run)
    assert "sampling it again" in redo.stderr
    assert samples.read_text() == whole  # the same seeds give the same rows
    prefkit("judge", "run.name=shared", "job=cut", "judge.samples=cut", *TINY, cwd=sft_run)


# --- 8. the smaller things ----------------------------------------------------------------------

def test_metrics_after_a_resume_have_each_step_once(tmp_path):
    crashed = _setup(tmp_path, _cfg(), fail_at=17)  # killed in step 9: checkpoints 3 and 6, rows up to step 8
    with pytest.raises(Killed):
        crashed.fit()
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "job/metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 8  # a row after the step-6 checkpoint, which the resumed run logs again
    _setup(tmp_path, _cfg()).fit()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "job/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_stale_temporaries_go_and_artifacts_stay(tmp_path):
    (tmp_path / ".model.tmp-123-abcdef").mkdir()
    (tmp_path / ".model.tmp-123-abcdef/model.safetensors").write_text("half")
    (tmp_path / "checkpoints/.step-6.tmp").mkdir(parents=True)
    (tmp_path / ".summary.json.tmp-9-000000").write_text("{")
    (tmp_path / "model").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "model", "summary.json"]


def test_wandb_runs_of_different_jobs_differ(tmp_path):
    from prefkit.trainer import wandb_run_id

    cfg = _cfg()
    assert wandb_run_id(tmp_path / "a", cfg) != wandb_run_id(tmp_path / "b", cfg)
    assert wandb_run_id(tmp_path / "a", cfg) == wandb_run_id(tmp_path / "a", cfg)


@pytest.mark.slow
def test_safetensors_files_are_readable_by_the_group(sft_run):
    files = list((sft_run / "outputs/shared/sft").rglob("*.safetensors"))
    assert files
    for path in files:
        assert path.stat().st_mode & stat.S_IRGRP, path


def test_an_option_added_since_a_job_ran_at_its_default_is_not_another_config():
    """A job written before objectives gained an option (dpo's f_divergence, say) still counts as
    the same config when the option is at its default; set on the command line, it differs."""
    from prefkit.rundir import config_differences

    old = {"stage": "align", "objective": {"name": "dpo", "beta": 0.1}}
    new = {"stage": "align", "objective": {"name": "dpo", "beta": 0.1, "f_divergence": "reverse_kl"}}
    assert config_differences(old, new, named={"objective.beta"}) == []
    assert config_differences(old, new, named={"objective.f_divergence"}) == [
        "objective.f_divergence: <absent> -> reverse_kl"]
    assert config_differences(old, new) == ["objective.f_divergence: <absent> -> reverse_kl"]
    changed = {"stage": "align", "objective": {"name": "dpo", "beta": 0.2}}
    assert config_differences(old, changed, named=set()) == ["objective.beta: 0.1 -> 0.2"]

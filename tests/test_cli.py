"""The command layer: help, version, one-line errors for bad input, run-directory layout."""

import json

import pytest
from conftest import TEST_CONF, TINY_SFT, prefkit


def test_help_lists_every_stage(tmp_path):
    out = prefkit("--help", cwd=tmp_path).stdout
    for stage in ("sft", "reward", "align", "sample", "judge", "frontier"):
        assert f"  {stage} " in out
    assert prefkit("--version", cwd=tmp_path).stdout.startswith("prefkit ")


def test_stage_help_is_hydras(tmp_path):
    out = prefkit("align", "--help", cwd=tmp_path).stdout
    assert "objective:" in out and "tdpo2" in out and "hardware:" in out


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = prefkit("align", "objective=tdpo2", "--cfg", "job", cwd=tmp_path).stdout
    assert "name: tdpo2" in out and "alpha: 0.5" in out
    assert not (tmp_path / "outputs").exists()


def _error(tmp_path, *args):
    proc = prefkit(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
    return lines[0]


def test_unknown_group_option_names_the_choices(tmp_path):
    line = _error(tmp_path, "align", "objective=dpoo")
    assert "unknown objective 'dpoo'" in line and "did you mean dpo" in line and "tdpo2" in line


def test_unknown_key_names_the_valid_keys(tmp_path):
    line = _error(tmp_path, "align", "objective=tdpo2", "objective.alpah=0.3")
    assert "objective.alpah" in line and "did you mean objective.alpha" in line


def test_bad_value_type(tmp_path):
    assert "train.lr" in _error(tmp_path, "sft", "train.lr=fast")


def test_bad_override_inside_a_sweep(tmp_path):
    # objective.alpha exists for tdpo2 but not for dpo: the sweep's dpo job would fail
    line = _error(tmp_path, "align", "-m", "objective=tdpo2,dpo", "objective.alpha=0.3")
    assert "objective.alpha" in line


def test_missing_stage_output_says_what_to_run(tmp_path):
    line = _error(tmp_path, "align", "run.name=fresh")
    assert "prefkit sft run.name=fresh" in line


@pytest.mark.slow
def test_sft_multirun_gives_one_job_per_learning_rate(tmp_path):
    prefkit("sft", "-m", "run.name=lr", "train.lr=1e-3,3e-3", *TINY_SFT, cwd=tmp_path)
    jobs = sorted(p.name for p in (tmp_path / "outputs/lr/sft").iterdir() if p.is_dir())
    assert len(jobs) == 2 and all(len(j) <= 72 for j in jobs)  # long override lists end in a short hash
    assert not any("," in j or "=" in j for j in jobs)  # names can be passed back as override values
    lrs = {j: [o for o in json.loads((tmp_path / "outputs/lr/sft" / j / "lineage.json").read_text())["overrides"]
               if o.startswith("train.lr=")] for j in jobs}
    assert sorted(v[0] for v in lrs.values()) == ["train.lr=0.001", "train.lr=0.003"]  # the full overrides
    for job in jobs:
        path = tmp_path / "outputs/lr/sft" / job
        lineage = json.loads((path / "lineage.json").read_text())
        assert lineage["stage"] == "sft" and lineage["config_hash"]
        assert (path / "model" / "model.safetensors").exists()
        assert (path / "metrics.jsonl").read_text().strip()
        assert "lr:" in (path / "config.yaml").read_text()


@pytest.mark.slow
def test_a_complete_job_is_skipped_unless_overwrite(tmp_path):
    args = ["sft", "run.name=ow", "job=ow", *TINY_SFT, "train.max_steps=2"]
    prefkit(*args, cwd=tmp_path)
    job = tmp_path / "outputs/ow/sft/ow"
    (job / "planted.txt").write_text("left by the first run")
    first = json.loads((job / "lineage.json").read_text())["finished"]
    again = prefkit(*args, cwd=tmp_path)
    assert "already complete" in again.stderr + again.stdout and (job / "planted.txt").exists()
    import time

    time.sleep(1.1)  # lineage times have a resolution of one second
    redone = prefkit(*args, "overwrite=true", cwd=tmp_path)
    assert "already complete" not in redone.stderr + redone.stdout
    assert not (job / "planted.txt").exists()  # the job was emptied, then made again
    assert json.loads((job / "lineage.json").read_text())["finished"] != first
    assert (job / "model/model.safetensors").exists()


def test_user_config_dir_on_the_search_path(tmp_path):
    (tmp_path / "myconf" / "objective").mkdir(parents=True)
    (tmp_path / "myconf" / "objective" / "mydpo.yaml").write_text("name: dpo\nbeta: 0.42\nsft_weight: 0.0\n")
    paths = f"{tmp_path / 'myconf'}:{TEST_CONF}"
    out = prefkit("align", "objective=mydpo", "model=tiny_test", "--cfg", "job", cwd=tmp_path,
                  env={"PREFKIT_CONFIG_PATH": paths}).stdout
    assert "beta: 0.42" in out

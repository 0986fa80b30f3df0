"""Every bad input of the user's or the environment's: one line on stderr, exit status 2, and
nothing left in the run directory. One table: (stage and overrides, a part of the expected line)."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
from conftest import prefkit

# Caught before anything runs (composition and the config schema).
BEFORE_RUNNING = [
    (["sft", "job=.."], "bad job '..'"),
    (["sft", "job=."], "bad job '.'"),
    (["sft", "job=../../etc"], "bad job '../../etc'"),
    (["sft", "job=a/b"], "bad job 'a/b'"),
    (["sft", "job=.hidden"], "bad job '.hidden'"),
    (["sft", "run.name=../../x"], "bad run.name '../../x'"),
    (["sft", "run.name=a/b"], "bad run.name 'a/b'"),
    (["sft", "overwrite=no"], "bad value for overwrite: 'no' is not true/false"),
    (["sft", "overwrite=maybe"], "bad value for overwrite: 'maybe' is not true/false"),
    (["sft", "seed=abc"], "bad value for seed: 'abc' is not a number"),
    (["sft", "train.batch_size=0"], "bad value for train.batch_size: 0 (must be an integer >= 1)"),
    (["sft", "train.batch_size=-4"], "bad value for train.batch_size: -4"),
    (["align", "train.max_steps=ten"], "bad value for train.max_steps: 'ten'"),
    (["align", "train.max_steps=0"], "bad value for train.max_steps: 0"),
    (["sft", "train.lr=-1"], "bad value for train.lr: -1 (must be a number > 0)"),
    (["align", "objective.beta=null"], "bad value for objective.beta: None (must be a number > 0)"),
    (["align", "objective.beta=0"], "bad value for objective.beta: 0"),
    (["align", "objective=exo", "objective.beta=-0.1"], "bad value for objective.beta: -0.1"),
    (["align", "objective=edpo", "objective.epsilon=1.5"], "bad value for objective.epsilon: 1.5"),
    (["align", "hardware.micro_batch_size=0"], "bad value for hardware.micro_batch_size: 0"),
    (["sample", "sample.n=0"], "bad value for sample.n: 0 (must be an integer >= 1)"),
    (["sample", "sample.max_new_tokens=0"], "bad value for sample.max_new_tokens: 0"),
    (["sample", "sample.temperature=-1"], "bad value for sample.temperature: -1"),
    (["sample", "sample.temperature=0"], "sample.temperature=0 is greedy decoding: all 4 samples"),
    (["sample", "sample.top_p=2"], "bad value for sample.top_p: 2 (must be a number > 0 and <= 1)"),
    (["sample", "sample.top_k=-1"], "bad value for sample.top_k: -1"),
    (["judge", "judge.label.noise=1.5"], "bad value for judge.label.noise: 1.5"),
    (["frontier", "frontier.beta_min=60"], "frontier.beta_min (60) must be below frontier.beta_max"),
    (["frontier", "frontier.kl_scale=lg"], "bad value for frontier.kl_scale: 'lg' (must be one of auto, linear, log)"),
    (["align", "train.scheduler=cosin"], "bad value for train.scheduler: 'cosin' (must be one of constant, linear"),
    (["judge", "judge.task=scores"], "bad value for judge.task: 'scores'"),
    (["sft", "run.root=/proc/prefkit-runs"], "run.root=/proc/prefkit-runs: cannot write in /proc"),
    (["sft", "logger.wandb=true"], "logger.wandb=true but wandb has no credentials"),
]


def _one_line(tmp_path: Path, args: list[str], env: dict | None = None) -> str:
    proc = prefkit(*args, cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    outputs = tmp_path / "outputs"  # nothing but the embedded model's cache, which any run would make
    left = [p for p in outputs.rglob("*") if ".cache" not in p.relative_to(outputs).parts] if outputs.exists() else []
    assert not left, left
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), BEFORE_RUNNING, ids=[" ".join(a) for a, _ in BEFORE_RUNNING])
def test_bad_input_before_running(tmp_path, args, expected):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}
    assert expected in _one_line(tmp_path, args, env)


def test_a_report_on_a_run_with_nothing_judged_says_what_to_run(tmp_path):
    line = _one_line(tmp_path, ["report", "run.name=empty"])
    assert "no frontier in outputs/empty to report on" in line and "`prefkit judge run.name=empty`" in line


def test_run_root_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a directory" in _one_line(tmp_path, ["sft", f"run.root={tmp_path / 'afile' / 'runs'}"])


def test_run_root_that_is_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is the real case
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("running as root without permission to mount a read-only file system")
    else:
        ro.chmod(0o555)
    try:
        line = _one_line(tmp_path, ["sft", f"run.root={ro / 'runs'}"])
        assert f"run.root={ro / 'runs'}: cannot write in {ro}" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], capture_output=True)


# Caught when the data is read: a data file that is not what it claims to be.
def _data(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    return str(path)


GOOD = b'{"prompt": "a", "completion": "b"}\n'
BAD_FILES = [
    ("empty.jsonl", b"", "is empty"),
    ("blank.jsonl", b"\n\n", "is empty"),
    ("latin1.jsonl", GOOD + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"), "line 2 is not UTF-8"),
    ("broken.jsonl", GOOD + b'{"prompt": "a", "completion": }\n', "line 2 is not valid JSON"),
    ("broken.jsonl.gz", GOOD + GOOD + b"[1, 2]\n", "line 3 is a JSON list, not an object"),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_bad_data_file(tmp_path, name, content, expected):
    path = _data(tmp_path, name, content)
    line = _one_line(tmp_path, ["sft", "model=tiny_test", "dataset=local", f"dataset.data_files={path}",
                                "dataset.splits.eval=null"])
    assert expected in line and name in line


def test_missing_data_file(tmp_path):
    line = _one_line(tmp_path, ["sft", "model=tiny_test", "dataset=local", "dataset.data_files=nowhere.jsonl",
                                "dataset.splits.eval=null"])
    assert "nowhere.jsonl does not exist" in line


def test_a_whole_json_document_is_not_a_bad_line(tmp_path):
    """A JSON array file (which the datasets library reads too) passes the line check."""
    from prefkit.datasets.reader import check_json_file

    path = tmp_path / "rows.json"
    path.write_text('[\n {"prompt": "a",\n  "completion": "b"}\n]\n')
    check_json_file(path, "test")


def test_the_defaults_pass_the_schema():
    """Every stage's defaults pass the schema (so each case above fails for its own reason only)."""
    from hydra import compose, initialize_config_dir

    from prefkit import schema
    from prefkit.config import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for stage in ("sft", "reward", "align", "sample", "judge", "frontier"):
            schema.check(compose(config_name=stage), check_paths=False)

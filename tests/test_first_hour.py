"""A researcher's first hour, through the CLI: their own 300 rows of ordinary English in a JSONL,
from nothing to a frontier and `prefkit status`, with each quiet failure of issue 14 now loud or
gone. (The tiny test model keeps it to a minute; the README's walkthrough is the same commands on
the default model.)"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import TEST_CONF, prefkit
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow  # the CLI end to end

SUBJECTS = ["the meeting", "my order", "the report", "your flight", "the new library", "our garden", "the train",
            "this recipe", "the weather", "her birthday party", "the school trip", "a broken laptop"]
POLITE = ["Thank you for asking about {s}. I am happy to help, and here is what I know.",
          "Of course! Let me explain {s} step by step, and please ask if anything is unclear.",
          "Good question about {s}. I would suggest checking the details together with me."]
RUDE = ["Stop bothering me about {s}. Figure it out yourself.", "Who cares about {s}? Not my problem.",
        "That is a stupid question about {s}. Go away."]
ASKS = ["Could you tell me about {s}?", "What should I do about {s}?", "Any advice on {s}, please?"]
SMALL = ["model=tiny_test", "hardware.micro_batch_size=8"]
TRAIN = [*SMALL, "train.batch_size=16", "train.eval_every=4", "train.save_every=4"]


def made_up_rows(n: int = 300) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        s = f"{rng.choice(SUBJECTS)} (note {i})"
        rows.append({"prompt": rng.choice(ASKS).format(s=s), "chosen": rng.choice(POLITE).format(s=s),
                     "rejected": rng.choice(RUDE).format(s=s)})
    return rows


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made_up_rows()))
    return root


def test_own_data_from_nothing_to_a_frontier_and_status(mine):
    r, data = "run.name=mine", ["dataset=local", "dataset.data_files=rows.jsonl"]
    # 1, 2: the embedded tokenizer reads ordinary English; eval is carved from the one file by default
    sft = prefkit("sft", r, *data, *TRAIN, "train.max_steps=8", cwd=mine)
    log = sft.stdout + sft.stderr
    assert "<unk>" not in log and "eval_fraction=0.05" in log
    assert "train.max_steps=8 wins over train.epochs=1" in log  # 8: which of steps and epochs is in force, said
    # 3: later stages take the SFT job's data without repeating it; another dataset is refused in one line
    prefkit("reward", r, *TRAIN, "train.max_steps=4", cwd=mine)
    refused = prefkit("align", r, "dataset=synthetic", *TRAIN, "train.max_steps=2", cwd=mine, check=False)
    assert refused.returncode == 2 and "this command reads dataset synthetic" in refused.stderr
    assert "rows.jsonl" in refused.stderr and not (mine / "outputs/mine/align").exists()
    align = prefkit("align", r, "objective=dpo", *TRAIN, "train.max_steps=4", cwd=mine)
    (sft_job,) = (mine / "outputs/mine/sft").iterdir()
    assert f"dataset: local (rows.jsonl), as sft/{sft_job.name} used" in align.stdout + align.stderr
    (job,) = (mine / "outputs/mine/align").iterdir()
    assert OmegaConf.load(job / "config.yaml").dataset.name == "local"
    prefkit("sample", r, *SMALL, "sample.n=2", "sample.n_reference=4", "sample.max_new_tokens=16",
            "sample.split=eval", cwd=mine)
    prefkit("judge", r, *SMALL, "judge.scorer=reward_model", cwd=mine)
    prefkit("frontier", r, cwd=mine)
    # 9: one command lists the run's jobs with their state and headline numbers
    table = json.loads(prefkit("status", r, "--json", cwd=mine).stdout)
    by_job = {(row["stage"], row["job"]): row for row in table}
    assert {s for s, _ in by_job} == {"sft", "reward", "align", "sample", "judge", "frontier"}
    assert all(row["state"] == "complete" for row in table)
    headline = by_job["align", job.name]["headline"]
    assert "held-out accuracy" in headline and "KL" in headline and "win rate" not in headline
    # 7: every job's console output is in its <stage>.log
    assert "steps of 16" in (job / "align.log").read_text()
    # 5: new policies make the judged samples stale: judge redoes them, never silently reuses them
    prefkit("align", r, "objective=ipo", *TRAIN, "train.max_steps=2", cwd=mine)
    prefkit("sample", r, *SMALL, "sample.n=2", "sample.n_reference=4", "sample.max_new_tokens=16",
            "sample.split=eval", cwd=mine)
    stale = {row["job"]: row["state"] for row in json.loads(prefkit("status", r, "--json", cwd=mine).stdout)
             if row["stage"] == "judge"}
    assert set(stale.values()) == {"stale"}
    again = prefkit("judge", r, *SMALL, "judge.scorer=reward_model", cwd=mine)
    assert "changed since" in again.stdout + again.stderr
    summary = json.loads(next((mine / "outputs/mine/judge").glob("*/summary.json")).read_text())
    assert any(key.startswith("align/ipo") for key in summary["policies"])


def test_ctrl_c_says_where_it_stopped_and_the_rerun_resumes(mine):
    """7: SIGINT mid-training: exit 130, the step reached and the resume command; rerunning resumes."""
    args = ["sft", "run.name=stop", "dataset=local", "dataset.data_files=rows.jsonl", *TRAIN, "train.max_steps=200",
            "train.save_every=0", "train.eval_every=0", "job=stop"]
    env = {**os.environ, "PREFKIT_CONFIG_PATH": str(TEST_CONF), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    # a terminal's Ctrl-C: the default SIGINT handling, even when the suite itself was started in the
    # background by a shell that ignores SIGINT (its children inherit that)
    proc = subprocess.Popen([sys.executable, "-m", "prefkit.cli", *args], cwd=mine, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    job = mine / "outputs/stop/sft/stop"
    deadline = time.time() + 300
    log = job / "metrics.jsonl"
    while time.time() < deadline and not (log.exists() and log.stat().st_size):  # the first logged step
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    reached = int(re.search(r"interrupted at step (\d+)/200 \(checkpoint of step \d+ saved\)", err).group(1))
    assert f"rerun the same command to resume: prefkit {' '.join(args)}" in err
    assert (job / f"checkpoints/step-{reached}").is_dir() and "steps of 16" in (job / "sft.log").read_text()
    rerun = prefkit(*args, cwd=mine)
    assert f"resumed from {job / 'checkpoints' / f'step-{reached}'} (step {reached}/200)" in rerun.stdout + rerun.stderr

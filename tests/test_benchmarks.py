"""The benchmark scripts that import prefkit's stages still run (at the smallest shapes, one
repeat; nothing is timed here): both had stopped running unnoticed when the code they import
changed. (bench_tdpo_memory.py, which imports only the objectives' maths, is left out: its
measurement subprocesses cost ~15 s even at the smallest shape.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each script's start-up and a few tiny steps, about 6-10 s each

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script, args", [
    ("bench_align.py", ["--sizes", "tiny", "--steps", "1", "--warmup", "1", "--repeats", "1",
                        "--impls", "bare,prefkit,trl"]),
    ("bench_sample.py", ["--sizes", "tiny", "--repeats", "1", "--prompts", "4", "--max-new-tokens", "8",
                         "--no-vllm"]),
])
def test_benchmark_script_runs_and_prints_its_ratios(script, args, tmp_path):
    env = {**os.environ, "PREFKIT_BENCH_CACHE": str(tmp_path), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RATIOS:" in proc.stdout

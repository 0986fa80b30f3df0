"""Shared helpers: a tiny configuration that keeps every CLI run to seconds, and a runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tests/conf is on the config search path (PREFKIT_CONFIG_PATH), with a smaller embedded model
# and dataset than the defaults: the same code paths, in seconds.
TEST_CONF = Path(__file__).parent / "conf"
TINY = ["model=tiny_test", "dataset=synthetic_test"]
TINY_SFT = [*TINY, "train.max_steps=16", "train.batch_size=32", "hardware.micro_batch_size=16",
            "train.eval_every=8", "train.save_every=8"]
TINY_ALIGN = [*TINY, "train.max_steps=6", "train.batch_size=16", "hardware.micro_batch_size=8",
              "train.eval_every=3", "train.save_every=3"]


def prefkit(*args: str, cwd: Path, check: bool = True, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (as a user would), in `cwd`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
                "PREFKIT_CONFIG_PATH": str(TEST_CONF), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "prefkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's other processes.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeAccelerator:
    """The few parts of accelerate.Accelerator that objectives use, for one process."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, m):
        return m


@pytest.fixture
def in_run_dir(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory of in-process stages (prefkit.api), with the tests' configs
    on the search path and wandb off, as the CLI runner sets them for a subprocess."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFKIT_CONFIG_PATH", str(TEST_CONF))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """A finished tiny SFT job, shared by the tests that need a policy."""
    root = tmp_path_factory.mktemp("shared")
    prefkit("sft", "run.name=shared", *TINY_SFT, cwd=root)
    return root

"""The shared run directory: where each stage writes, how a later stage finds it, and when an
output counts as done.

    outputs/<run.name>/
      <stage>/<job>/          one directory per job (a multirun job is named from its overrides)
        config.yaml           the resolved config
        metrics.jsonl         one JSON object per logged step
        lineage.json          inputs, config hash, code version; written last: its presence
                              is what makes the job complete
        ...                   the stage's artifacts (model/, samples.jsonl, frontier.png, ...)
      cache/                  shared across the jobs of the run (reference log-probs)

Every artifact is written under a temporary name and renamed into place, so a killed job never
leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import prefkit
from prefkit.errors import UserError

LINEAGE = "lineage.json"
# Keys that do not change what a job computes, so they stay out of its config hash.
_UNHASHED = ("run", "job", "overwrite", "logger", "resume")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.root) / str(cfg.run.name)


def job_dir() -> Path:
    """The current Hydra job's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def config_hash(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _UNHASHED:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """prefkit's version, plus the git commit (and '+dirty') when run from a checkout."""
    root = Path(prefkit.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return prefkit.__version__ + (f"+g{commit}" if commit else "") + ("+dirty" if dirty else "")


# --- atomic writes ------------------------------------------------------------------------------

def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block completes."""
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl: appended one line per log event, flushed as it goes."""

    def __init__(self, path: Path, resume: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a" if resume else "w")  # noqa: SIM115  (held open for the run)

    def log(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# --- jobs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    path: Path

    @property
    def stage(self) -> str:
        return self.path.parent.name

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def done(self) -> bool:
        return (self.path / LINEAGE).exists()

    def config(self) -> DictConfig:
        return OmegaConf.load(self.path / "config.yaml")

    def lineage(self) -> dict[str, Any]:
        return json.loads((self.path / LINEAGE).read_text())

    def __str__(self) -> str:
        return f"{self.stage}/{self.name}"


def jobs(run: Path, stage: str, done_only: bool = True) -> list[Job]:
    base = run / stage
    if not base.is_dir():
        return []
    found = [Job(p) for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return [j for j in found if j.done] if done_only else found


def require_job(run: Path, stage: str, name: str | None, *, key: str, how: str) -> Job:
    """The one completed job of `stage` (or the one called `name`), or a UserError that says
    which command makes it, or which `key=` override picks among several."""
    done = jobs(run, stage)
    if name:
        for job in done:
            if job.name == name:
                return job
        have = ", ".join(j.name for j in done) or "none"
        raise UserError(f"no completed {stage} job '{name}' in {run}/{stage} (completed: {have})")
    if not done:
        raise UserError(f"no completed {stage} job in {run}; run `{how}` first")
    if len(done) > 1:
        names = ", ".join(j.name for j in done)
        raise UserError(f"{len(done)} completed {stage} jobs in {run}/{stage} ({names}); choose one with {key}=<name>")
    return done[0]


def write_config(path: Path, cfg: DictConfig) -> None:
    write_text(path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_lineage(path: Path, cfg: DictConfig, inputs: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Mark the job complete. `inputs` names what it read (paths, hashes of earlier jobs)."""
    write_json(path / LINEAGE, {
        "stage": str(cfg.get("stage")),
        "job": path.name,
        "config_hash": config_hash(cfg),
        "code_version": code_version(),
        "inputs": inputs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        **(extra or {}),
    })


def job_input(job: Job) -> dict[str, str]:
    """How a consumer records an earlier job in its lineage."""
    return {"path": str(job.path), "config_hash": job.lineage().get("config_hash", "")}


def start_job(cfg: DictConfig) -> Path | None:
    """Open the current job directory: None if it is already complete (and overwrite is off),
    else the path, emptied first when overwrite=true, with the resolved config written."""
    from prefkit.console import console

    out = job_dir()
    if (out / LINEAGE).exists() and not cfg.get("overwrite"):
        console.print(f"{out} is already complete; skipping (overwrite=true redoes it)")
        return None
    if cfg.get("overwrite"):
        for item in out.iterdir():
            if item.name == ".hydra" or item.suffix == ".log":
                continue
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    write_config(out, cfg)
    return out


def discard_if_unstarted(out: Path) -> None:
    """After a failure, remove a job directory that holds nothing but Hydra's bookkeeping and
    the config (so a failed command leaves nothing half-written), and its empty parents."""
    if not out.is_dir():
        return
    bookkeeping = {".hydra", "config.yaml", f"{out.parent.name}.log"}
    if any(item.name not in bookkeeping for item in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in (out.parent, out.parent.parent):
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break

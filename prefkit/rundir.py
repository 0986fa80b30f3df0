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
import datetime
import hashlib
import json
import os
import re
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
LOCK = ".lock"
# Keys that do not change what a job computes, so they stay out of its config hash (a job may be
# resumed with other values of these). Dotted keys name one leaf.
_UNHASHED = ("run", "job", "overwrite", "logger", "resume", "hardware.num_threads", "train.keep_checkpoints",
             "sweep_metric")
# A run or job name is one path component that every later command can pass back unquoted.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+@-]{0,199}")


def check_name(value: object, what: str) -> str:
    """`value` as a run or job name, or a UserError: one path component (no separators, not
    `.` or `..`, not hidden), at most 200 characters of letters, digits and `_ . = + @ -`."""
    name = str(value)
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"bad {what} {name!r}: use one name of letters, digits and _ . = + @ - (no '/', no "
                        "leading '.', at most 200 characters)")
    return name


def check_inside(path: Path, parent: Path) -> Path:
    """`path`, resolved, if it lies strictly inside `parent`; a UserError otherwise (the guard of
    every destructive operation on the run directory)."""
    resolved, base = path.resolve(), parent.resolve()
    if resolved == base or base not in resolved.parents:
        raise UserError(f"refusing to modify {path}: it is not inside {parent}")
    return resolved


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.root) / str(cfg.run.name)


def job_dir() -> Path:
    """The current Hydra job's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config without the keys that do not change what a job computes."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    data.pop("hydra", None)
    for key in _UNHASHED:
        parent, _, leaf = key.rpartition(".")
        node = data.get(parent) if parent else data
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def config_hash(cfg: DictConfig | dict) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def config_differences(old: DictConfig | dict, new: DictConfig | dict, limit: int = 4,
                       named: set[str] | None = None) -> list[str]:
    """The keys whose values differ between two configs' identities, as 'key: old -> new' (changed
    values first, then keys that only one of them has). With `named` (the keys the new command
    sets), a key the old config lacks and the command does not set is not a difference: an option
    added to prefkit since the old job ran, at its default (defaults of new options keep the old
    behaviour)."""
    a, b = flat(identity(old)), flat(identity(new))
    keys = sorted((k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")
                   and not (named is not None and k not in a and k not in named)),
                  key=lambda k: (k not in a or k not in b, k))
    shown = [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in keys[:limit]]
    return shown + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


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

TMP_MARK = ".tmp-"


def _tmp(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and call (two writers never share one)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{os.urandom(3).hex()}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_group(path: Path) -> None:
    """Give a file the mode a plain open() would (0666 minus the umask): some writers, safetensors
    among them, create 0600 files that a group sharing the run directory could not read."""
    os.chmod(path, 0o666 & ~_umask())


def share_safetensors(folder: Path) -> None:
    """readable_by_group for every safetensors file under `folder` (save_pretrained writes 0600)."""
    for path in folder.rglob("*.safetensors"):
        readable_by_group(path)


def save_safetensors(tensors: dict, path: Path) -> None:
    """Write a safetensors file atomically, readable as any other file of the run directory."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        save_file(tensors, str(tmp))
        readable_by_group(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """metrics.jsonl: appended one line per log event, flushed as it goes. A job resumed from the
    checkpoint of step N keeps the rows up to step N (and drops those a kill left after it, which
    the resumed run logs again)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
            write_text(path, "".join(kept))
        self._f = open(path, "a" if resume_step is not None else "w")  # noqa: SIM115  (held open for the run)

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

    @property
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
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="microseconds"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "overrides": _hydra_overrides(),
        **(extra or {}),
    })


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (tests, the Python API)
        return []


def job_input(job: Job) -> dict[str, str]:
    """How a consumer records an earlier job in its lineage: where it is, its config, and when it
    finished (a rerun of it that changed its output changes this: the consumer is then stale)."""
    lineage = job.lineage()
    return {"path": str(job.path), "config_hash": lineage.get("config_hash", ""),
            "finished": lineage.get("finished", "")}


def stale_inputs(lineage: dict) -> list[str]:
    """The recorded inputs of a complete job that changed since it ran: 'stage/job (finished A, now B)'."""
    out = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "path" in node and "finished" in node:
                path = Path(node["path"])
                now = Job(path).lineage().get("finished", "missing") if (path / LINEAGE).exists() else "missing"
                if now != node["finished"]:
                    out.append(f"{path.parent.name}/{path.name} (finished {node['finished'] or '?'}, now {now})")
            for value in node.values():
                walk(value)

    walk(lineage.get("inputs", {}))
    return out


def command_keys() -> set[str]:
    """The keys the command line sets, group choices included (`dataset`, `objective.beta`)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not inside a Hydra job
        return set()
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


def start_job(cfg: DictConfig, incremental: bool = False) -> Path | None:
    """Open the current job directory: None if it is already complete (and overwrite is off),
    else the path, emptied first when overwrite=true, with the resolved config written.

    A job that exists (complete, or killed and resumable) continues only under the same config:
    otherwise one line names the keys that differ. `incremental` stages (sample) add to a
    complete job instead of skipping it."""
    from prefkit.console import console

    out = job_dir()
    stage_dir = run_dir(cfg) / str(cfg.stage)
    check_inside(out, stage_dir)
    if cfg.get("overwrite"):
        _empty(out)
    elif (out / "config.yaml").exists():
        previous = OmegaConf.load(out / "config.yaml")
        diff = config_differences(previous, cfg, named=command_keys())
        if diff:
            state = "complete" if (out / LINEAGE).exists() else "started (and can resume)"
            raise UserError(f"{out} is a {state} job with another config ({'; '.join(diff)}); rerun with its "
                            "settings, choose another job=<name>, or pass overwrite=true to redo it")
        stale = stale_inputs(json.loads((out / LINEAGE).read_text())) if (out / LINEAGE).exists() else []
        if stale:  # what it read has changed since: redo it rather than hand on an outdated result
            console.print(f"[yellow]{out} is stale: {'; '.join(stale)} changed since it ran; redoing it[/]")
            _empty(out)
        elif (out / LINEAGE).exists() and not incremental:
            console.print(f"{out} is already complete; skipping (overwrite=true redoes it)")
            return None
    remove_stale_temporaries(out)
    write_config(out, cfg)
    return out


def _empty(out: Path) -> None:
    """Remove a job's results (its lock and log stay)."""
    for item in out.iterdir():
        if item.name in (".hydra", LOCK) or item.suffix == ".log":
            continue
        shutil.rmtree(item) if item.is_dir() else item.unlink()


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files and directories that a killed writer left (never a finished artifact, nor
    one a live process is writing: the other ranks of a launch open the same job at the same time)."""
    for item in list(path.rglob(f"*{TMP_MARK}*")) + list(path.rglob("*.tmp")):
        writer = re.search(rf"{re.escape(TMP_MARK)}(\d+)-", item.name)
        if writer and _alive(int(writer.group(1))):
            continue
        if item.exists() and item.name.startswith("."):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process of this pid runs on this host (it may be another one that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobBusy(UserError):
    """Another process holds the job's lock (its directory must then be left alone)."""


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (accelerate, torchrun), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a live holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool | None:
    """True/False when it can be told (same host), None for a holder on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if not _alive(pid):
        return False
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


@contextlib.contextmanager
def job_lock(path: Path) -> Iterator[None]:
    """Hold <job>/.lock (the holder's pid, host and command) while a job runs: a second writer
    stops with one line naming the first. A lock whose holder is gone (same host) is stale and
    is taken over."""
    from prefkit.console import console

    if not is_main_process():
        yield
        return
    lock = path / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            alive = _holder_alive(holder) if holder else (time.time() - lock.stat().st_mtime < 30)
            if alive is False or (not holder and not alive):
                console.print(f"{path}: removing a stale lock (pid {holder.get('pid', '?')} is no longer running)")
                lock.unlink(missing_ok=True)
                continue
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
            raise JobBusy(f"{path} is in use by {who} ({holder.get('command', '?')}); wait for it to finish, or "
                            f"remove {lock} if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise UserError(f"cannot take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()


def discard_if_unstarted(out: Path) -> None:
    """After a failure, remove a job directory that holds nothing but Hydra's bookkeeping and
    the config (so a failed command leaves nothing half-written), and its empty parents."""
    if not out.is_dir():
        return
    bookkeeping = {".hydra", "config.yaml", LOCK, f"{out.parent.name}.log"}
    if any(item.name not in bookkeeping for item in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in (out.parent, out.parent.parent):
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break

"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

    checkpoints/step-<N>/
      weights.safetensors   the model's weights (LoRA: only what trains)
      state.safetensors     every tensor of the training state (optimizer moments, RNG, objective state)
      state.json            the rest of the state, with references into state.safetensors, and the
                            size of every file above; written last, so a checkpoint is complete iff
                            it exists and every size matches
      model/                a sampleable HF model (train.keep_checkpoints_after_training=true)
      engine/               under FSDP / DeepSpeed: the engine's own sharded optimizer files

Nothing here can run code when it is read: JSON decodes to dicts, lists and numbers, and the
codec below rebuilds only tuples, dicts with non-string keys and tensors from them.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prefkit.errors import UserError
from prefkit.rundir import save_safetensors, write_json

STATE_JSON, STATE_TENSORS, WEIGHTS = "state.json", "state.safetensors", "weights.safetensors"
FORMAT = 1


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back as written."""


# --- a JSON codec for state dicts ------------------------------------------------------------------

def encode(obj: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """`obj` as JSON values; tensors go to `tensors` under their path and leave a reference."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{path}/k{i}"), encode(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        try:
            return tensors[obj["__tensor__"]]
        except KeyError:
            raise CorruptCheckpoint(f"tensor {obj['__tensor__']} is missing") from None
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


# --- RNG ----------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the checkpoint -----------------------------------------------------------------------------

@dataclass
class Progress:
    """Where training stands."""

    step: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    tokens: int = 0


@dataclass
class TrainingState:
    """Everything besides the weights that an exact resume restores."""

    progress: Progress
    config_hash: str
    scheduler: dict[str, Any]
    sampler: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=rng_state)
    optimizer: dict[str, Any] | None = None  # None: the sharding engine wrote it (engine/)
    stateful: dict[str, dict[str, Any]] = field(default_factory=dict)  # objective state and the like
    partial_weights: bool = False  # LoRA: weights.safetensors holds only the trainable tensors
    config: dict[str, Any] | None = None  # the config identity (rundir.identity); None in older checkpoints


def save(folder: Path, weights: dict[str, Tensor], state: TrainingState) -> None:
    """Write weights and state into `folder` (a staging directory the caller renames into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(unique_tensors(weights), folder / WEIGHTS)
    tensors: dict[str, Tensor] = {}
    body = encode({**asdict(state), "progress": asdict(state.progress)}, tensors)
    save_safetensors(tensors, folder / STATE_TENSORS)
    sizes = {name: (folder / name).stat().st_size for name in (WEIGHTS, STATE_TENSORS)}
    write_json(folder / STATE_JSON, {"format": FORMAT, "files": sizes, "state": body})


def load(folder: Path) -> tuple[dict[str, Tensor], TrainingState]:
    """Weights and state of a checkpoint, or CorruptCheckpoint (never a pickle: a folder that
    holds only .pt/.bin/.pkl files is refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest_path = folder / STATE_JSON
    if not manifest_path.exists():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pickle"))
        what = f"holds {', '.join(pickles)} (pickle files, which prefkit never loads)" if pickles else \
            f"has no {STATE_JSON}"
        raise CorruptCheckpoint(what)
    try:
        manifest = json.loads(manifest_path.read_text())
        for name, size in manifest["files"].items():
            actual = (folder / name).stat().st_size
            if actual != size:
                raise CorruptCheckpoint(f"{name} has {actual} bytes, {size} were written")
        weights, tensors = load_file(str(folder / WEIGHTS)), load_file(str(folder / STATE_TENSORS))
        raw = decode(manifest["state"], tensors)
        raw["progress"] = Progress(**raw["progress"])
        return weights, TrainingState(**raw)
    except CorruptCheckpoint:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CorruptCheckpoint(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def unique_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses shared storage (tied embeddings): keep one copy of each tensor."""
    seen: set[tuple] = set()
    unique = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        unique[name] = t.detach().contiguous().cpu()
    return unique


def step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def listed(base: Path) -> list[Path]:
    """The checkpoint folders under `base`, oldest first (complete or not)."""
    found = [p for p in base.glob("step-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=step_of)


def set_aside(folder: Path) -> Path:
    """Move a corrupt checkpoint out of the way (kept for inspection, never loaded again)."""
    target = folder.with_name(f"corrupt-{folder.name}")
    shutil.rmtree(target, ignore_errors=True)
    folder.rename(target)
    return target


def load_weights(model: nn.Module, tensors: dict[str, Tensor], partial: bool = False) -> None:
    """Load a state dict saved by `checkpoint.save`: every parameter must come back, except tied
    ones whose twin did (and, for `partial` checkpoints, the frozen ones)."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[n].data_ptr() for n in tensors if n in params}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    untied_missing = [n for n in missing if params[n].data_ptr() not in loaded_ptrs
                      and (not partial or n in trainable)]
    if untied_missing or unexpected:
        raise UserError(f"checkpoint does not match the model (missing: {untied_missing[:3]}, "
                        f"unexpected: {list(unexpected)[:3]})")

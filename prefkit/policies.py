"""The policies of a run directory, and the reference each one is measured against.

A policy key names a model the run made: `sft/<job>`, `align/<job>`, or a checkpoint kept
for sampling, `align/<job>/step-<N>`. Anything else (a path, a Hub id) is its own key. The
reference of an aligned policy is the model it started from (from its lineage); the SFT model
is its own reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from prefkit.errors import UserError
from prefkit.rundir import Job, flat, identity, jobs


@dataclass(frozen=True)
class Policy:
    key: str  # "sft/default", "align/dpo", "align/dpo/step-50", or a path / Hub id
    path: str  # the HF model directory (or Hub id)
    reference: str  # the model it is measured against
    job: Job | None = None
    step: int | None = None  # a checkpoint's step; None for the final model

    @property
    def is_reference(self) -> bool:
        return self.path == self.reference


def _reference_of(job: Job) -> str:
    inputs = job.lineage().get("inputs", {})
    if "sft" in inputs:
        return str(Path(inputs["sft"]["path"]) / "model")
    for key in ("base_model", "model"):
        if key in inputs:
            return str(inputs[key])
    return str(job.path / "model")


def run_policies(run: Path, checkpoints: bool = False) -> list[Policy]:
    """Every completed sft and align job's model (and kept checkpoints when asked), in order."""
    found: list[Policy] = []
    for job in jobs(run, "sft"):
        path = str(job.path / "model")
        found.append(Policy(f"sft/{job.name}", path, path, job))
    for job in jobs(run, "align"):
        ref = _reference_of(job)
        if checkpoints:
            for ckpt in sorted(job.path.glob("checkpoints/step-*/model"), key=lambda p: int(p.parent.name[5:])):
                step = int(ckpt.parent.name[5:])
                found.append(Policy(f"align/{job.name}/step-{step}", str(ckpt), ref, job, step))
        found.append(Policy(f"align/{job.name}", str(job.path / "model"), ref, job))
    return found


def select(run: Path, wanted, checkpoints: bool, reference_override: str | None = None) -> list[Policy]:
    """`wanted`: "all", or a list of keys of this run (or paths / Hub ids, measured against
    `reference_override`, else against themselves)."""
    available = run_policies(run, checkpoints)
    if isinstance(wanted, str) and wanted == "all":
        if not available:
            raise UserError(f"no policies in {run}: run `prefkit sft run.name={run.name}` (and align) first")
        return available
    by_key = {p.key: p for p in available}
    chosen = []
    for key in ([wanted] if isinstance(wanted, str) else list(wanted)):
        key = str(key)
        if key in by_key:
            chosen.append(by_key[key])
        elif key in ("sft", "align") and any(p.key.startswith(key + "/") for p in available):
            chosen += [p for p in available if p.key.startswith(key + "/")]
        elif Path(key).exists() or ("/" in key and not key.startswith(("sft/", "align/"))):
            chosen.append(Policy(key, key, reference_override or key))
        else:
            have = ", ".join(by_key) or "none"
            raise UserError(f"no policy '{key}' in {run} (available: {have})")
    return chosen


def describe(policy: Policy) -> dict:
    """Objective, hyperparameters, seed and step of a policy, for the frontier's table."""
    info: dict = {"policy": policy.key, "path": policy.path, "reference": policy.reference, "step": policy.step}
    if policy.job is None:
        return {**info, "objective": "external", "stage": "external"}
    cfg: DictConfig = policy.job.config
    info["stage"] = policy.job.stage
    info["seed"] = int(cfg.get("seed", 0))
    # what the job computed, but its seed (and the diagnostics it logged besides): jobs equal in this are
    # one point of the frontier, over seeds
    info["setting"] = {k: v for k, v in flat(identity(cfg)).items() if k != "seed" and not k.startswith("diagnostics.")}
    if policy.job.stage == "sft":
        return {**info, "objective": "sft-reference", "params": {}}
    objective = dict(cfg.objective)
    name = objective.pop("name")
    objective.pop("import", None)
    if not objective.get("sft_weight"):
        objective.pop("sft_weight", None)
    return {**info, "objective": name, "params": objective}

"""Scorers for `judge`: the synthetic task's exact oracle, a prefkit reward model (or
ensemble), or an HF sequence-classification model, behind one call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from prefkit import synthetic
from prefkit.data import encode_options, join_text
from prefkit.errors import UserError
from prefkit.rundir import job_input, require_job

ScoreFn = Callable[[list[tuple[str, str]]], list[float]]


def make_scorer(cfg: DictConfig, run: Path, inputs: dict) -> tuple[ScoreFn, str]:
    """(score function over (prompt, completion) pairs, a description for the record)."""
    kind = str(cfg.judge.scorer)
    if kind == "oracle":
        if str(cfg.dataset.name) not in ("synthetic", "labeled"):
            raise UserError(f"scorer=oracle is the embedded task's exact reward; dataset {cfg.dataset.name} has "
                            "none (use judge.scorer=reward_model or classifier)")
        return (lambda pairs: [synthetic.oracle_reward(join_text(p, c)) for p, c in pairs]), "oracle"
    from prefkit.rewardmodel import load_classifier, load_reward_model, score_texts

    device = "cuda" if str(cfg.hardware.device).startswith("cuda") else "cpu"
    batch = int(cfg.judge.batch_size)
    if kind == "reward_model":
        job = require_job(run, "reward", cfg.judge.get("reward_job"), key="judge.reward_job",
                          how=f"prefkit reward run.name={cfg.run.name}")
        inputs["reward_model"] = job_input(job)
        scorer = load_reward_model(job.path, device)
        return (lambda pairs: score_texts(scorer, pairs, batch)), f"reward_model:{job}"
    if kind == "classifier":
        c = cfg.judge.classifier
        if not c.get("path"):
            raise UserError("scorer=classifier needs judge.classifier.path (an HF sequence-classification model)")
        scorer = load_classifier(str(c.path), c.label, str(c.output), encode_options(cfg.dataset), device)
        inputs["classifier"] = str(c.path)
        return (lambda pairs: score_texts(scorer, pairs, batch)), f"classifier:{c.path}:{c.label}:{c.output}"
    raise UserError(f"unknown judge.scorer '{kind}'; valid: oracle, reward_model, classifier")

"""What every user-settable config value may be: one validation pass over a composed config,
run before anything is written. A rule applies wherever its key exists (each stage composes
only some sections); a violation is one line that names the key, the value and what it must be.

Types are checked against the defaults elsewhere (prefkit.config); the rules here add what a
type cannot say: ranges, optional values, and the combinations that make no sense.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefkit.errors import UserError
from prefkit.rundir import check_name


@dataclass(frozen=True)
class Rule:
    key: str
    kind: type  # int or float (a float rule takes ints too); booleans are never numbers here
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < value instead of low <= value
    high_open: bool = False
    optional: bool = False  # null allowed
    also: tuple[str, ...] = ()  # other accepted strings (e.g. "auto")

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = what + (" " + " and ".join(parts) if parts else "")
        extra = [*self.also, *(["null"] if self.optional else [])]
        return text + (f" (or {', '.join(extra)})" if extra else "")

    def check(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, str):
            return value in self.also
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def _positive(key: str, kind: type = float, **kw: Any) -> Rule:
    return Rule(key, kind, 0, low_open=True, **kw)


def _at_least(key: str, low: float, kind: type = int, **kw: Any) -> Rule:
    return Rule(key, kind, low, **kw)


def _fraction(key: str, **kw: Any) -> Rule:
    return Rule(key, float, 0, 1, **kw)


RULES: tuple[Rule, ...] = (
    _at_least("seed", 0),
    # training
    _at_least("train.batch_size", 1),
    _at_least("train.max_steps", 1, optional=True),
    _positive("train.epochs"),
    _positive("train.lr"),
    _positive("peft.lr_scale"),
    _at_least("train.weight_decay", 0, float),
    _at_least("train.warmup_steps", 0),
    _positive("train.max_grad_norm", optional=True),
    _at_least("train.eval_every", 0, optional=True),
    _at_least("train.save_every", 0, optional=True),
    _at_least("train.keep_checkpoints", 1),
    _at_least("train.max_bad_steps", 1),
    _at_least("logger.every", 1),
    _at_least("hardware.micro_batch_size", 1),
    _at_least("hardware.num_threads", 1, optional=True),
    _at_least("hardware.logprob_chunk", 1, also=("auto",)),
    # objectives: every temperature of the KL-regularised problem is positive
    _positive("objective.beta"),
    _positive("objective.beta_pi"),
    _positive("objective.beta_r"),
    _positive("objective.temperature"),
    Rule("objective.epsilon", float, 0, 1, high_open=True),
    _at_least("objective.sft_weight", 0, float, optional=True),
    _at_least("objective.gamma", 0, float),
    _at_least("objective.sync_steps", 1),
    Rule("diagnostics.edpo_test", float, 0, 1, low_open=True, high_open=True, optional=True),
    _at_least("reward.members", 1),
    _fraction("reward.sft_weight"),
    # sampling
    _at_least("sample.n", 1),
    _at_least("sample.n_reference", 1, optional=True),
    _at_least("sample.max_new_tokens", 1),
    _at_least("sample.temperature", 0, float),
    Rule("sample.top_p", float, 0, 1, low_open=True),
    _at_least("sample.top_k", 0),
    _at_least("sample.batch_size", 1),
    _at_least("sample.max_prompts", 1, optional=True),
    _at_least("sample.seed", 0),
    # judging and the frontier
    _at_least("judge.bootstrap", 1),
    _at_least("judge.density.prompts", 1),
    _at_least("judge.batch_size", 1),
    _fraction("judge.label.noise"),
    Rule("judge.label.eval_fraction", float, 0, 1, high_open=True),
    _positive("judge.label.bt_beta"),
    _at_least("judge.winrate.tie_tol", 0, float),
    _at_least("judge.winrate.max_prompts", 1, optional=True),
    _positive("judge.llm.timeout_s"),
    _at_least("judge.llm.retries", 1),
    _positive("frontier.beta_min"),
    _positive("frontier.beta_max"),
    _at_least("frontier.n_betas", 2),
    _at_least("frontier.bootstrap", 50),
    _at_least("frontier.grid", 2),
    _at_least("report.samples", 0),
)


# Options that take one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "train.optimizer": ("adamw", "rmsprop", "sgd"),
    "train.scheduler": ("constant", "linear", "cosine"),
    "hardware.precision": ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
    "hardware.distributed": ("none", "ddp", "fsdp", "deepspeed"),
    "reference.cache": ("auto", "true", "false"),
    "rewards.source": ("auto", "data", "model"),
    "reward.kind": ("bt", "drdo_oracle"),
    "reward.sft_form": ("nll", "grm_logsigmoid"),
    "dataset.prompt_truncation": ("keep_end", "keep_start"),
    "dataset.on_bad_row": ("error", "skip"),
    "judge.task": ("score", "label", "winrate", "density"),
    "judge.scorer": ("oracle", "reward_model", "classifier"),
    "judge.label.mode": ("best_worst", "bradley_terry", "all"),
    "judge.winrate.judge": ("scorer", "llm"),
    "judge.winrate.pairs": ("first", "all"),
    "judge.winrate.tie_rule": ("fastchat", "average"),
    "judge.llm.backend": ("openai", "hf"),
    "frontier.kl": ("exact", "k1", "k3"),
    "frontier.kl_scale": ("auto", "linear", "log"),
}


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return False, None
    return True, node[leaf]


def _combinations(cfg: DictConfig) -> None:
    """Settings that are fine alone and wrong together."""
    found, temperature = _value(cfg, "sample.temperature")
    if found and temperature == 0:
        n = max(int(cfg.sample.n), int(cfg.sample.get("n_reference") or 0))
        if n > 1:
            raise UserError(f"sample.temperature=0 is greedy decoding: all {n} samples of a prompt would be the same; "
                            "set sample.n=1 (and sample.n_reference=null), or a temperature > 0")
    found, beta_min = _value(cfg, "frontier.beta_min")
    if found and beta_min >= cfg.frontier.beta_max:
        raise UserError(f"frontier.beta_min ({beta_min}) must be below frontier.beta_max ({cfg.frontier.beta_max})")


def _writable_root(root: Path) -> None:
    """run.root must be (or be creatable as) a directory this process can write, checked by making
    and removing a probe directory in its nearest existing ancestor."""
    import tempfile

    existing = root
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"run.root={root}: {existing} is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".prefkit-probe-", dir=existing)).rmdir()
    except OSError as err:
        raise UserError(f"run.root={root}: cannot write in {existing} ({err.strerror or type(err).__name__})") from None


def _wandb_ready() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled",
                                                                                        "dryrun"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def check(cfg: DictConfig, check_paths: bool = True) -> None:
    """Raise UserError on the first value of `cfg` that breaks a rule."""
    if "run" in cfg:
        check_name(cfg.run.name, "run.name")
    if cfg.get("job") is not None:
        check_name(cfg.job, "job")
    for rule in RULES:
        found, value = _value(cfg, rule.key)
        if found and not rule.check(value):
            raise UserError(f"bad value for {rule.key}: {value!r} (must be {rule.describe()})")
    for key, options in CHOICES.items():
        found, value = _value(cfg, key)
        if found and str(value).lower() not in options:
            raise UserError(f"bad value for {key}: {value!r} (must be one of {', '.join(options)})")
    _combinations(cfg)
    if check_paths and "run" in cfg:
        _writable_root(Path(str(cfg.run.root)))
    if cfg.get("logger") is not None and cfg.logger.get("wandb") and not _wandb_ready():
        raise UserError("logger.wandb=true but wandb has no credentials: set WANDB_API_KEY (or run `wandb login`), "
                        "or WANDB_MODE=offline to log locally")


"""Hydra plumbing: where the configs live, how a job directory is named, and how a bad
override becomes one clear line instead of a traceback.

Each CLI stage re-enters a `hydra.main` entry point with its own primary config (conf/<stage>.yaml),
so `-m` multirun, `--cfg job`, Hydra's `--help`, sweepers and launchers all work unchanged.
Before that, the overrides are composed once per sweep combination with the Compose API to
catch mistakes early, while nothing has been written yet.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import itertools
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefkit.errors import UserError

# Keys that do not change what a job computes; they stay out of job directory names.
_NOT_IN_JOB_NAME = ("run.", "job", "overwrite", "hardware", "logger", "hydra", "resume", "sweep_metric")
_MAX_VALIDATED_COMBINATIONS = 64
_LONG_NAME = 64  # longer derived job names keep only the keys below and a hash of the other overrides
_ALWAYS_NAMED = ("objective.", "seed", "reward.", "judge.task")


def conf_dir() -> Path:
    """conf/ shipped inside the wheel, or the repository's top-level conf/ for a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "common.yaml").is_file():
            return candidate
    raise RuntimeError(f"prefkit's configs are missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


def user_search_path() -> list[str]:
    """Extra config directories from PREFKIT_CONFIG_PATH (colon-separated), searched before
    prefkit's own so a user's conf/model/my-model.yaml is found without editing the package."""
    dirs = [d for d in os.environ.get("PREFKIT_CONFIG_PATH", "").split(os.pathsep) if d]
    return [f"file://{Path(d).resolve()}" for d in dirs]


def job_name(job: str | None, prefix: str, prefix_key: str, overrides: list[str]) -> str:
    """A job's directory name: `job` if given, else the prefix (align: the objective's name, taken
    from the `prefix_key` override if any) plus each override that changes the computation as
    `<key>-<value>`, joined by `_`: `tdpo2_alpha-0.3_seed-1`. Keys are shortened to their last part
    unless that is ambiguous; a value that is not a short plain word or number (a path, a list)
    becomes a short hash; a name over 64 characters keeps the objective's values and the seed and
    hashes the rest (`dpo_beta-0.1_seed-2_h3f2a1c`). Names never hold `,` or `=`, so they can be passed back as values
    (`judge.winrate.baseline=align/tdpo2_alpha-0.3`); the full overrides are in lineage.json."""
    if job:
        from prefkit.rundir import check_name

        return check_name(job, "job")
    pairs = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(_NOT_IN_JOB_NAME) or (prefix_key and key == prefix_key and value == prefix):
            # (the prefix names that override already)
            continue
        pairs.append((key, value))
    leaves = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    items = {k: f"{k.rsplit('.', 1)[-1] if leaves.count(k.rsplit('.', 1)[-1]) == 1 else k}-{_short(v)}"
             for k, v in pairs}
    name = "_".join(([prefix] if prefix else []) + sorted(items.values())) or "default"
    if len(name) > _LONG_NAME:  # the swept values (the objective's, the seed) stay readable; a hash for the rest
        kept = sorted(v for k, v in items.items() if k.startswith(_ALWAYS_NAMED))
        rest = sorted(v for k, v in items.items() if not k.startswith(_ALWAYS_NAMED))
        digest = "h" + hashlib.sha1("_".join(rest).encode()).hexdigest()[:6]
        name = "_".join(([prefix] if prefix else []) + kept + [digest])
    return name


def _short(value: str) -> str:
    """A value as it may stand in a job name: itself when it is a short plain word or number, else
    a short hash of it."""
    if re.fullmatch(r"[A-Za-z0-9.+@-]{1,24}", value):
        return value
    return "h" + hashlib.sha1(value.encode()).hexdigest()[:6]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pk_mul"):
        OmegaConf.register_new_resolver("pk_mul", lambda a, b: float(a) * float(b))
    if not OmegaConf.has_resolver("pk_job"):
        OmegaConf.register_new_resolver(
            "pk_job", lambda job, prefix, key, overrides: job_name(job, prefix, key, list(overrides or [])))


# --- validation ---------------------------------------------------------------------------------

def override_variants(overrides: list[str]) -> list[list[str]]:
    """The override lists of the sweep's jobs (at most a bounded number of them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra.errors.OverrideParseException
        raise UserError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    axes: list[list[str]] = []
    for o in parsed:
        key = o.input_line.split("=", 1)[0]
        if o.is_sweep_override() and o.is_discrete_sweep():
            try:
                axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
            except Exception:  # glob() sweeps need a config loader; Hydra checks them itself
                continue
        elif isinstance(o.value(), IntervalSweep):  # an optimiser's range: check that both ends compose
            ends = o.value().start, o.value().end
            if "int" in o.value().tags:
                ends = math.ceil(ends[0]), math.floor(ends[1])
            axes.append([f"{key}={end}" for end in ends])
        elif not o.is_sweep_override():
            axes.append([o.input_line])
    combos = itertools.islice(itertools.product(*axes), _MAX_VALIDATED_COMBINATIONS)
    return [list(c) for c in combos]


@functools.cache
def _is_group(key: str) -> bool:
    return "/" in key or ("." not in key and bool(_group_options(key)))


def _is_group_choice(override: str) -> bool:
    """`objective=tdpo2`, `hydra/launcher=...`: a config-group choice, not a value."""
    return _is_group(override.split("=", 1)[0].lstrip("+~"))


def validate(stage: str, overrides: list[str]) -> None:
    """Compose every job of the (possibly swept) command; raise UserError on the first problem. An
    experiment (`prefkit run`) also composes every job of every stage it plans, and its claims."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for variant in override_variants(overrides):
            cfg = compose_checked(stage, variant)
            if stage == "run":
                from prefkit import experiment

                experiment.check(experiment.plan(cfg.experiment), compose_checked)
    GlobalHydra.instance().clear()


def _dry_run(stage: str, overrides: list[str]) -> str:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from prefkit.helptext import dry_run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        variants = override_variants(overrides)
        configs = [compose_checked(stage, v) for v in variants]
        if stage == "align":  # a dry run may import torch: build each objective, so its options are checked too
            from prefkit.objectives import build

            for cfg in configs:
                build(OmegaConf.to_container(cfg.objective, resolve=True))
        text = "\n".join(dry_run(stage, cfg, v) for cfg, v in zip(configs[:1], variants[:1], strict=True))
    GlobalHydra.instance().clear()
    more = f"\n(and {len(variants) - 1} more job(s) of this sweep)" if len(variants) > 1 else ""
    return text + more


def compose_checked(stage: str, overrides: list[str]) -> DictConfig:
    """One job's config, composed and checked (types, schema); inside an initialised Hydra."""
    from hydra import compose

    from prefkit import schema

    search = user_search_path()
    extra = [f"hydra.searchpath=[{','.join(search)}]"] if search else []
    try:
        cfg = compose(config_name=stage, overrides=extra + overrides)
        # the same groups without value overrides: the reference for value types
        defaults = _defaults(stage, tuple(extra + [o for o in overrides if _is_group_choice(o)]))
    except Exception as err:
        raise UserError(_explain(stage, overrides, err)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{stage} needs a value for {', '.join(missing)} (add e.g. {missing[0]}=...)")
    _check_types(cfg, defaults)
    schema.check(cfg)
    check_imports(cfg)
    return cfg


_DEFAULTS: dict[tuple, DictConfig] = {}


def _defaults(stage: str, groups: tuple[str, ...]) -> DictConfig:
    """A stage's config with only these group choices (cached: a sweep's jobs share them)."""
    from hydra import compose

    key = (stage, groups)
    if key not in _DEFAULTS:
        _DEFAULTS[key] = compose(config_name=stage, overrides=list(groups))
    return _DEFAULTS[key]


def _check_types(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    """A value given where the default is a number or a boolean must be one too."""
    for key in cfg:
        if key == "hydra" or key not in defaults:
            continue
        value, default = cfg._get_node(key), defaults._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig) and isinstance(default, DictConfig):
            _check_types(value, default, path + ".")
            continue
        if OmegaConf.is_interpolation(cfg, key):
            continue
        new = OmegaConf.to_object(value) if isinstance(value, DictConfig) else value._value()
        # the default's type, through its interpolation if it has one (train.lr: ${model.lr.sft})
        old = None if isinstance(default, DictConfig) else defaults[key] if OmegaConf.is_interpolation(
            defaults, key) else default._value()
        if isinstance(old, bool) and not isinstance(new, bool) and new is not None:
            raise UserError(f"bad value for {path}: {new!r} is not true/false")
        if isinstance(old, (int, float)) and not isinstance(old, bool) and new is not None and \
                isinstance(new, (str, bool, list, dict, DictConfig)):
            raise UserError(f"bad value for {path}: {new!r} is not a number")


def config_dirs() -> list[Path]:
    """Where configs are found: the user's PREFKIT_CONFIG_PATH directories first, then prefkit's."""
    return [Path(u[len("file://"):]) for u in user_search_path()] + [conf_dir()]


def _group_options(group: str) -> list[str]:
    """Every option of a config group, the user's own (PREFKIT_CONFIG_PATH) included."""
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def importable_dirs() -> list[str]:
    """Where a config's `import:` modules are looked for: the working directory and the
    PREFKIT_CONFIG_PATH directories (beside the YAML that names them)."""
    return [os.getcwd(), *(str(d) for d in config_dirs()[:-1])]


def check_imports(cfg: DictConfig) -> None:
    """An objective's `import:` modules can be found (before anything runs)."""
    import importlib.util

    names = (cfg.get("objective") or {}).get("import") or []
    for name in [names] if isinstance(names, str) else list(names):
        for d in importable_dirs():
            if d not in sys.path:
                sys.path.insert(0, d)
        if importlib.util.find_spec(str(name)) is None:
            raise UserError(f"objective {cfg.objective.name} imports {name}, which is not in the working directory or "
                            f"a PREFKIT_CONFIG_PATH directory ({', '.join(importable_dirs())}); put {name}.py there")


def _explain(stage: str, overrides: list[str], err: Exception) -> str:
    """Turn a Hydra/OmegaConf composition error into one line with the valid choices."""
    text = str(err)
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, value = m.groups()
        options = _group_options(group)
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown {group} '{value}'{hint}; valid choices: {', '.join(options) or 'none found'}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(stage, overrides, key, parent)
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean {(parent + '.') if parent else ''}{close[0]}?)" if close else ""
        if "Value '" in text or "could not be converted" in text:
            detail = [ln.strip() for ln in text.splitlines() if "Value '" in ln or "converted" in ln]
            return f"bad value for {key}: {detail[0] if detail else text.splitlines()[0]}"
        if parent and not valid:  # the section itself does not exist in this stage
            top = _valid_keys(stage, overrides, key, "")
            return (f"{key} is not an option of {stage}: it has no section '{parent.split('.')[0]}' "
                    f"(its sections and keys: {', '.join(k for k in top if k != 'hydra')})")
        where = f"under {parent}" if parent else "at the top level"
        return (f"{key} is not an option of {stage}{hint}; valid keys {where}: {', '.join(valid)}. "
                f"To add a new key use +{key}=...")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return f"bad configuration: {first}"


def _valid_keys(stage: str, overrides: list[str], key: str, parent: str) -> list[str]:
    from hydra import compose

    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    search = user_search_path()
    extra = [f"hydra.searchpath=[{','.join(search)}]"] if search else []
    try:
        cfg = compose(config_name=stage, overrides=extra + rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []


# --- stopping ---------------------------------------------------------------------------------

class Stopped(Exception):
    """A job stopped by Ctrl-C (exit 130) or SIGTERM (exit 143); the message says where."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that the same code saves and reports."""


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM raises Terminated; an interrupt that no stage turned into Stopped (e.g. while
    sampling) becomes one here."""
    import signal

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except Terminated:
        raise Stopped("stopped by SIGTERM (what is complete is kept)", 143) from None
    except KeyboardInterrupt:
        raise Stopped("interrupted (what is complete is kept)", 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(stage: str, args: list[str]) -> str:
    import shlex

    return " ".join(["prefkit", stage, *(shlex.quote(a) for a in args)])


# --- entry --------------------------------------------------------------------------------------

_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                           "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
_HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                     "--shell-completion", "-sc", "--resolve"}


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags, overrides)."""
    flags, overrides = [], []
    it = iter(args)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _HYDRA_FLAGS_WITH_VALUE and arg not in ("--info", "-i"):
                value = next(it, None)
                if value is not None:
                    flags.append(value)
        else:
            overrides.append(arg)
    return flags, overrides


class Abort(BaseException):
    """Carries a job's (or a sweeper's) UserError or Stopped out through Hydra, which reports (and
    exits on) any Exception it sees."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def execute(stage: str, args: list[str], load_task: Callable[[], Callable[[DictConfig], Any]]) -> list[Path]:
    """Validate `args`, then run them through a hydra.main entry point for conf/<stage>.yaml, as
    the CLI and the Python API both do. Returns the job directories it ran (one per job of a
    sweep); raises UserError (nothing run, or the job discarded if it wrote nothing) or Stopped."""
    import hydra

    register_resolvers()
    flags, overrides = split_args(args)
    if ("--cfg" in flags or "-c" in flags) and "--resolve" not in flags:
        flags.append("--resolve")  # show values, not ${interpolations}
    if not any(f in _HYDRA_INFO_FLAGS for f in flags):
        validate(stage, overrides)
    task = load_task()
    search = user_search_path()
    extra = [f"hydra.searchpath=[{','.join(search)}]"] if search else []
    ran: list[Path] = []

    @hydra.main(config_path=str(conf_dir()), config_name=stage, version_base="1.3")
    def _entry(cfg: DictConfig) -> Any:
        from prefkit.console import mirrored_to
        from prefkit.rundir import JobBusy, discard_if_unstarted, job_dir, job_lock

        out = job_dir()
        try:
            with job_lock(out), mirrored_to(out / f"{stage}.log"), stopped_by_signals():
                value = task(cfg)  # what a sweeper optimises (align: the held-out loss)
        except JobBusy as err:  # the holder's job: touch nothing
            raise Abort(err) from None
        except UserError as err:
            discard_if_unstarted(out)
            raise Abort(err) from None
        except Stopped as stop:
            raise Abort(stop) from None
        ran.append(out)
        return value

    argv = sys.argv
    sweep = "-m" in flags or "--multirun" in flags
    sys.argv = [f"prefkit {stage}", *flags, *extra, *(under_swept_groups(overrides) if sweep else overrides)]
    try:
        _entry()
    except Abort as abort:
        raise abort.error from None
    finally:
        sys.argv = argv
    return ran


def under_swept_groups(overrides: list[str]) -> list[str]:
    """Hydra composes a sweep's base config with the group's default option before it sweeps the
    group, so `-m objective=exo_rw,dpo_rw objective.beta_r=0.1` fails there (the default, dpo, has no
    beta_r) though every job has the key. Every job was composed and checked by `validate`, so values
    under a swept group are passed as `++key=value` (set, adding if absent): the same for each job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override() and _is_group(o.key_or_group)}
    if not swept:
        return overrides
    return [f"++{o}" if not o.startswith(("+", "~")) and o.split("=", 1)[0].split(".", 1)[0] in swept
            and "." in o.split("=", 1)[0] else o for o in overrides]


def run_stage(stage: str, args: list[str], load_task: Callable[[], Callable[[DictConfig], Any]],
              summary: str = "") -> None:
    """The CLI: `--help` describes the stage's keys; `--dry-run` validates and says what the command
    would write and read, writing nothing; otherwise `execute`, with every error as one line and an
    exit status (2: bad input; 130/143: stopped, with the command that resumes). The stage's code
    (and torch) is imported only once the command is known to be valid: a bad override answers in
    a second."""
    from prefkit.console import print_error

    register_resolvers()
    flags, overrides = split_args(args)
    if "--help" in flags or "-h" in flags:
        from prefkit.helptext import stage_help

        print(stage_help(stage, summary))
        return
    try:
        if "--dry-run" in flags:
            validate(stage, overrides)
            print(_dry_run(stage, overrides))
            return
        execute(stage, args, load_task)
    except UserError as err:
        print_error(stage, str(err))
        raise SystemExit(2) from None
    except Stopped as stop:  # Ctrl-C or SIGTERM: say where it stopped and how to go on
        print_error(stage, f"{stop}; rerun the same command to resume: {resume_command(stage, args)}")
        raise SystemExit(stop.exit_code) from None

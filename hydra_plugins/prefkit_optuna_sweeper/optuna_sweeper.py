"""`hydra/sweeper=optuna`: a Bayesian (or random, grid, ...) search over a stage's settings with
Optuna's ask-and-tell interface, one Hydra job per trial, each trial's value being what the stage
returns (`align`: the held-out loss).

hydra-optuna-sweeper 1.3, the last release of Hydra's own plugin, pins optuna < 3; this one takes
the same search-space syntax (`choice`, `range`, `interval`, `tag(log, ...)`, `tag(int, ...)`) and
settings (`n_trials`, `n_jobs`, `direction`, `sampler`, `storage`, `study_name`, `params`) on
optuna ≥ 3. Optuna is imported when a sweep starts, so plugin discovery stays cheap.
"""

# no `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses would look the string annotations up
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.prefkit_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    direction: str = "minimize"  # or maximize
    n_trials: int = 20
    n_jobs: int = 1  # trials asked (and launched) together: parallel under a parallel launcher
    # any optuna sampler, instantiated by Hydra; hydra.sweeper.sampler.seed=0 makes the search repeatable
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    storage: str | None = None  # e.g. sqlite:///outputs/default/optuna.db: a rerun continues the study
    study_name: str = "prefkit"
    params: dict[str, str] = field(default_factory=dict)  # key -> search space, as on the command line


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="prefkit")


class SearchSpaceError(ValueError):
    """A search space Optuna cannot take; the message says which override and why."""


def _stop(message: str) -> BaseException:
    """A sweep setting that cannot run: one line and exit status 2 through prefkit's CLI."""
    from prefkit.config import Abort
    from prefkit.errors import UserError

    return Abort(UserError(f"hydra/sweeper=optuna: {message}"))


def _bare_key(override: Override) -> str:
    return override.input_line.split("=", 1)[0].lstrip("+~")


def distribution(override: Override) -> Any:
    """The Optuna distribution of one swept override: choice -> categorical; range of integers ->
    integers with that step (Hydra's range excludes its stop); any other range -> categorical of its
    values; interval -> float (`tag(int, ...)`: integer), log-uniform under `tag(log, ...)`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    key = _bare_key(override)
    if isinstance(sweep, IntervalSweep):
        low, high, log = sweep.start, sweep.end, "log" in sweep.tags
        if low is None or high is None or not low < high:
            raise SearchSpaceError(f"{key}: interval needs low < high, got interval({low}, {high})")
        if log and low <= 0:
            raise SearchSpaceError(f"{key}: a log interval needs low > 0, got {low}")
        if "int" in sweep.tags:
            if math.ceil(low) > math.floor(high):
                raise SearchSpaceError(f"{key}: interval({low}, {high}) holds no integer")
            return IntDistribution(math.ceil(low), math.floor(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep) and all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
        values = list(range(sweep.start, sweep.stop, sweep.step))
        if not values or sweep.step < 0:
            raise SearchSpaceError(f"{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) is empty or descending")
        return IntDistribution(values[0], values[-1], step=sweep.step)
    if isinstance(sweep, ChoiceSweep | RangeSweep):
        # the override strings themselves, so a trial's value is passed back exactly as written
        values = list(override.sweep_string_iterator())
        if not values:
            raise SearchSpaceError(f"{key}: an empty choice")
        return CategoricalDistribution(values)
    raise SearchSpaceError(f"{key}: Optuna cannot search {override.input_line!r} (glob sweeps are not supported)")


def search_space(overrides: list[str]) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """Split overrides into the search space (bare key -> (key as written, distribution)) and the
    fixed overrides every trial gets. A later override of a key replaces an earlier one, so the
    command line wins over `hydra.sweeper.params`."""
    parser = OverridesParser.create()
    space: dict[str, tuple[str, Any]] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(overrides):
        key = _bare_key(override)
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = (override.input_line.split("=", 1)[0], distribution(override))
        else:
            fixed[key] = override.input_line
    return space, list(fixed.values())


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, sampler: Any, storage: str | None,
                 study_name: str, params: dict[str, str] | None) -> None:
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.sampler, self.storage, self.study_name = sampler, storage, study_name
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def sweep(self, arguments: list[str]) -> list[dict[str, Any]]:
        import optuna
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher
        from hydra.utils import instantiate

        from prefkit.config import Stopped
        from prefkit.errors import Diverged

        if self.direction not in ("minimize", "maximize"):
            raise _stop(f"hydra.sweeper.direction must be minimize or maximize, not {self.direction!r}")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise _stop("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1")
        try:
            space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        except SearchSpaceError as err:
            raise _stop(str(err)) from None
        if not space:
            raise _stop("no search space: sweep a value, e.g. 'objective.beta=tag(log,interval(0.01,0.5))', "
                        "'objective.beta=choice(0.05,0.1)' or 'train.max_steps=range(100,400,100)'")
        # Hydra instantiates the sweeper's config recursively: `sampler` arrives as an optuna sampler
        sampler = instantiate(self.sampler) if isinstance(self.sampler, DictConfig | dict) else self.sampler
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    direction=self.direction, load_if_exists=True)
        # a continued study (storage) keeps its direction and must keep measuring the same thing
        metric = str(self.config.get("sweep_metric") or "")
        if study.direction.name.lower() != self.direction or study.user_attrs.get("sweep_metric", metric) != metric:
            raise _stop(f"study {self.study_name!r} in {self.storage} was made to {study.direction.name.lower()} "
                        f"sweep_metric={study.user_attrs.get('sweep_metric') or 'its stage value'}; continue it with "
                        "those, or name a new one with hydra.sweeper.study_name=...")
        study.set_user_attr("sweep_metric", metric)
        if study.trials:  # continued: fresh random start-up draws, not the first sweep's again
            study.sampler.reseed_rng()
        distributions = {key: dist for key, (_, dist) in space.items()}
        written = {key: as_written for key, (as_written, _) in space.items()}
        # the basic launcher runs jobs one after another anyway: one trial per launch, so that one
        # trial's error never takes the finished trials of its batch down with it
        per_launch = 1 if isinstance(self.launcher, BasicLauncher) else self.n_jobs
        trials: list[dict[str, Any]] = []
        job_idx = 0
        while job_idx < self.n_trials:
            asked = [study.ask(distributions) for _ in range(min(per_launch, self.n_trials - job_idx))]
            batch = [[*fixed, *(f"{written[k]}={v}" for k, v in t.params.items())] for t in asked]
            try:
                self.validate_batch_is_legal(batch)
                returns = self.launcher.launch(batch, initial_job_idx=job_idx)
            except BaseException as err:  # a job's one-line error or Ctrl-C, raised through the launcher
                error = getattr(err, "error", err)  # prefkit's Abort carries the job's error
                for trial in asked:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    if isinstance(error, Stopped):  # a rerun with the same storage takes these first
                        study.enqueue_trial(trial.params)
                    trials.append({"number": trial.number, "params": trial.params, "job": None, "state": "FAIL",
                                   "value": None, "error": str(error)})
                self._write(study, trials)
                if not (isinstance(error, Diverged) and len(asked) == 1):
                    raise
                print(f"optuna: trial {asked[0].number} failed ({error}); the search goes on", flush=True)
                job_idx += 1
                continue
            job_idx += len(batch)
            failure: BaseException | None = None
            for trial, ret in zip(asked, returns, strict=True):
                record = {"number": trial.number, "params": trial.params,
                          "job": ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg else None}
                try:
                    value = ret.return_value  # raises the job's exception if it failed
                except Exception as err:  # recorded; raised once the whole batch is told
                    failure, value = failure or err, None
                if value is None and failure is None:  # sft, reward, ...: nothing to optimise
                    failure = _stop("this stage returns no value to optimise; the optuna sweeper works with "
                                    "`prefkit align` (its sweep_metric)")
                if value is None or not math.isfinite(float(value)):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    record.update(state="FAIL", value=None)
                else:
                    study.tell(trial, float(value))
                    record.update(state="COMPLETE", value=float(value))
                trials.append(record)
            self._write(study, trials)
            if failure is not None:
                raise failure
        where = self.sweep_dir / f"optuna_{self.study_name}.yaml"
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            best = ", ".join(f"{k}={v}" for k, v in study.best_params.items())
            print(f"optuna: best of {len(study.trials)} trial(s): {study.best_value:.6g} at {best} -> {where}")
        else:
            print(f"optuna: no trial completed -> {where}")
        return trials

    def _write(self, study: Any, trials: list[dict[str, Any]]) -> None:
        """`<sweep dir>/optuna_<study>.yaml`: the study's best trial so far (with a storage, over
        every sweep of the study) and each trial of this sweep."""
        from optuna.trial import TrialState

        from prefkit.rundir import write_text

        best = None
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = {"number": study.best_trial.number, "params": study.best_params, "value": study.best_value}
        summary = {"study": self.study_name, "direction": self.direction, "best": best, "trials": trials}
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.sweep_dir / f"optuna_{self.study_name}.yaml", OmegaConf.to_yaml(OmegaConf.create(summary)))

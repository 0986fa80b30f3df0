"""An experiment config (conf/experiment/<name>.yaml): the stages to run in order, each an ordinary
prefkit command (a sweep runs as a Hydra multirun), and the claims to test on the results.

    name: tdpo_imdb
    title: TDPO (Zeng et al. 2024), Fig. 1 and Fig. 3 on the embedded task
    stages:
      - [sft]
      - [align, dataset=labeled, "objective=dpo,tdpo2", "seed=0,1,2"]
      - [frontier, job=frontier]
    launch: [accelerate, launch, --multi_gpu, --num_processes, "8"]   # optional, for sft, reward, align
    claims:
      - name: tdpo2_above_dpo
        description: TDPO2's reward at matched KL is above DPO's
        source: Zeng et al. 2024, Fig. 3(a)
        statistic: {kind: matched_kl, a: {objective: tdpo2}, b: {objective: dpo}}
        direction: ">"

`extra.<stage>: [...]` adds overrides to every command of that stage, replacing the stage's own
override of the same key (tests shrink an experiment with it: `extra.align: ["seed=0"]`).
Everything is checked before anything runs: every command composes (every job of every sweep),
every claim is well formed, and every claim's selectors pick jobs that the sweeps plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from prefkit.errors import UserError

RUNNABLE = ("sft", "reward", "align", "sample", "judge", "frontier", "report")


TRAINING = ("sft", "reward", "align")


@dataclass
class Step:
    stage: str
    overrides: list[str]
    sweep: bool  # a multirun (some override sweeps)
    launch: list[str] = field(default_factory=list)  # e.g. accelerate launch ... (training stages only)

    def command(self, python: str, run_name: str, root: str) -> list[str]:
        head = [*self.launch, "-m", "prefkit.cli"] if self.launch else [python, "-m", "prefkit.cli"]
        return [*head, self.stage, *(["-m"] if self.sweep else []), *self.overrides, f"run.name={run_name}",
                f"run.root={root}"]

    def __str__(self) -> str:
        head = [*self.launch, "-m", "prefkit.cli"] if self.launch else ["prefkit"]
        return " ".join([*head, self.stage, *(["-m"] if self.sweep else []), *self.overrides])


@dataclass
class Plan:
    name: str
    title: str
    steps: list[Step]
    claims: list[dict] = field(default_factory=list)


def _merge(overrides: list[str], extra: list[str]) -> list[str]:
    """The stage's overrides with `extra` added; an extra override of a key the stage sets replaces it
    (so `extra.align: ["seed=0"]` runs one seed of a three-seed sweep)."""
    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    replaced = {key(o): o for o in extra}
    return [replaced.pop(key(o), o) for o in overrides] + list(replaced.values())


def _is_sweep(overrides: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))
    except Exception as err:  # hydra.errors.OverrideParseException
        raise UserError(f"cannot parse overrides {overrides}: {str(err).splitlines()[0]}") from None


def plan(experiment: DictConfig) -> Plan:
    """The experiment config as steps; one line for a malformed one."""
    exp = OmegaConf.to_container(experiment, resolve=True)
    name = exp.get("name") or "?"
    if not isinstance(exp.get("stages"), list) or not exp["stages"]:
        raise UserError(f"experiment {name} lists no stages")
    extra = exp.get("extra") or {}
    unknown = sorted(set(extra) - set(RUNNABLE))
    if unknown:
        raise UserError(f"experiment {name}: extra names unknown stage(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(RUNNABLE)}")
    launch = exp.get("launch") or []
    if not isinstance(launch, list) or not all(isinstance(x, str) for x in launch):
        raise UserError(f"experiment {name}: launch must be a list of words (e.g. [accelerate, launch, --multi_gpu])")
    steps = []
    for i, entry in enumerate(exp["stages"]):
        if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
            raise UserError(f"experiment {name}: stage {i + 1} must be a list [stage, overrides...], not {entry!r}")
        stage = entry[0]
        if stage not in RUNNABLE:
            raise UserError(f"experiment {name}: stage {i + 1} is '{stage}', which is not a stage; valid: "
                            f"{', '.join(RUNNABLE)}")
        overrides = _merge([str(o) for o in entry[1:]], [str(o) for o in extra.get(stage, [])])
        steps.append(Step(stage, overrides, _is_sweep(overrides), launch if stage in TRAINING else []))
    claims = exp.get("claims") or []
    from prefkit.claims import check_spec

    for claim in claims:
        check_spec(claim)
    return Plan(str(name), str(exp.get("title") or name), steps, claims)


def check(p: Plan, compose) -> None:
    """Every job of every step composes (`compose(stage, overrides)` raises UserError otherwise),
    and every claim's selectors pick at least one planned align job."""
    from prefkit.claims import matches
    from prefkit.config import override_variants
    from prefkit.rundir import flat

    planned = []
    for step in p.steps:
        for variant in override_variants(step.overrides):
            cfg = compose(step.stage, variant)
            if step.stage == "align":
                planned.append(cfg)
    for claim in p.claims:
        for role, selector in _selectors(claim["statistic"]):
            chosen = [c for c in planned
                      if matches(selector, str(c.objective.name), dict(c.objective), flat(OmegaConf.to_container(c)))]
            if not chosen:
                raise UserError(f"experiment {p.name}: claim {claim['name']} cannot be paired: its {role} {selector} "
                                "matches no align job the stages plan (a missing objective or setting?)")
            for metric in _logged_metrics_of(claim["statistic"]):
                missing = sorted({str(c.objective.name) for c in chosen if metric not in _logs(c)})
                if missing:
                    raise UserError(f"experiment {p.name}: claim {claim['name']} reads the training metric {metric}, "
                                    f"which no align job of {', '.join(missing)} logs (see `Objective.logs`; "
                                    "diagnostics.* adds more)")


def _logged_metrics_of(statistic: dict) -> list[str]:
    """The metrics.jsonl keys a log_* statistic reads."""
    if str(statistic.get("kind", "")).startswith("log_"):
        return [str(statistic[k]) for k in ("metric", "xa", "ya", "xb", "yb") if statistic.get(k)]
    return []


def _logs(cfg) -> set[str]:
    from prefkit.diagnostics import logged_metrics
    from prefkit.objectives.base import build

    objective, sft_weight = build(OmegaConf.to_container(cfg.objective, resolve=True))
    return logged_metrics(objective, cfg.get("diagnostics"), sft_weight)


def _selectors(statistic: dict) -> list[tuple[str, dict]]:
    out = [(key, statistic[key]) for key in ("a", "b", "select") if isinstance(statistic.get(key), dict)]
    out += [(f"term {i + 1}", t["select"]) for i, t in enumerate(statistic.get("terms") or [])]
    return out

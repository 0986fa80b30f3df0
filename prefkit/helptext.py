"""What `prefkit <stage> --help` and `--dry-run` print: the stage's keys with their defaults and the
comments of the YAML that sets them, its config groups with their options; and, for a dry run, the
job folder the command would write, what it would read, and the resolved config (nothing written)."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from prefkit.config import _group_options, config_dirs, job_name

GROUPS = ("model", "dataset", "objective", "hardware", "peft", "judge_template", "experiment")
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def documented_keys(path: Path) -> list[tuple[str, str, str]]:
    """(dotted key, value, comment) of every leaf in a YAML file, in order; `defaults` and `hydra` skipped."""
    out, stack = [], []
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        depth = len(m["indent"]) // 2
        stack = [*stack[:depth], m["key"]]
        if stack[0] in ("defaults", "hydra"):
            continue
        value = m["value"].strip()
        if value.startswith("${"):
            value = "(derived: " + value.replace("${", "").replace("}", "") + ")"
        if value:
            out.append((".".join(stack), value, (m["comment"] or "").strip()))
    return out


def _files(stage: str) -> list[Path]:
    primary = next(d / f"{stage}.yaml" for d in config_dirs() if (d / f"{stage}.yaml").exists())
    names = [n for n in ("common", "training", "from_sft")
             if re.search(rf"^\s*- {n}\s*$", primary.read_text(), flags=re.M)]
    return [next(d / f"{n}.yaml" for d in config_dirs() if (d / f"{n}.yaml").exists()) for n in names] + [primary]


def stage_help(stage: str, summary: str) -> str:
    files = _files(stage)
    text = files[-1].read_text()
    groups = [g for g in GROUPS if re.search(rf"^\s*- {g}: *(\S+)", text, flags=re.M)]
    lines = [f"prefkit {stage}: {summary}", "",
             f"usage: prefkit {stage} [-m] [group=option ...] [key=value ...] [--dry-run] [--cfg job --resolve]", ""]
    if groups:
        lines.append("config groups (group=option; your own options: PREFKIT_CONFIG_PATH=<dir>/<group>/<name>.yaml):")
        for g in groups:
            default = re.search(rf"^\s*- {g}: *(\S+)", text, flags=re.M)[1]
            options = ", ".join(o + (" (default)" if o == default else "") for o in _group_options(g))
            lines.append(f"  {g}: {options}")
        lines.append("")
    lines.append("keys (key=value), with their defaults:")
    seen: dict[str, tuple[str, str]] = {}
    for f in files:
        for key, value, comment in documented_keys(f):
            if key not in ("stage", "job_prefix", "job_prefix_key"):
                seen[key] = (value, comment or seen.get(key, ("", ""))[1])
    width = max(len(f"{k} = {v}") for k, (v, _) in seen.items())
    lines += [f"  {f'{k} = {v}':<{width}}  {c}".rstrip() for k, (v, c) in seen.items()]
    lines += ["", f"The group options add their own keys (e.g. objective.beta); `prefkit {stage} --cfg job --resolve` "
              "prints the whole composed config."]
    return "\n".join(lines)


def dry_run(stage: str, cfg: DictConfig, overrides: list[str]) -> str:
    """The job folder, what the command reads, and its resolved config."""
    from prefkit.rundir import run_dir

    run = run_dir(cfg)
    name = job_name(cfg.get("job"), str(cfg.get("job_prefix") or ""), str(cfg.get("job_prefix_key") or ""), overrides)
    lines = [f"prefkit {stage} (dry run: nothing is written)", f"  writes: {run / str(cfg.stage) / name}"]
    lines += [f"  reads:  {r}" for r in _reads(stage, cfg, run)]
    lines += ["", OmegaConf.to_yaml(cfg, resolve=True)]
    return "\n".join(lines)


def _reads(stage: str, cfg: DictConfig, run: Path) -> list[str]:
    from prefkit.errors import UserError
    from prefkit.rundir import jobs, require_job

    def earlier(stage_: str, name: str | None, key: str) -> str:
        try:
            return str(require_job(run, stage_, name, key=key, how=f"prefkit {stage_} run.name={run.name}").path)
        except UserError as err:
            return f"(not yet: {err})"

    data = f"dataset {cfg.dataset.name}" if "dataset" in cfg else ""
    if stage in ("align", "reward"):
        start = earlier("sft", cfg.policy.get("sft_job"), "policy.sft_job") if cfg.policy.init == "sft" \
            else cfg.policy.init
        return [f"the policy's start: {start}", data]
    if stage == "sample":
        return [f"policies: {cfg.sample.policies} of {run}", data]
    if stage == "judge":
        return [f"samples: {earlier('sample', cfg.judge.get('samples'), 'judge.samples')}", data]
    if stage == "frontier":
        return [f"judge jobs: {', '.join(j.name for j in jobs(run, 'judge')) or 'none yet'}"]
    if stage == "report":
        return [f"frontier jobs: {', '.join(j.name for j in jobs(run, 'frontier')) or 'none yet'}"]
    if stage == "run":
        from prefkit.experiment import plan

        return [f"stage {i + 1}: {s}" for i, s in enumerate(plan(cfg.experiment).steps)]
    return [data] if data else []

"""`prefkit <stage> [hydra overrides...]`: the Typer command layer.

Each stage is a thin command that hands everything after it to Hydra (see prefkit.config), so
`prefkit align -m objective=dpo,exo`, `prefkit sft --cfg job` and `prefkit judge --help` behave
exactly as they would for a plain Hydra app.
"""

from __future__ import annotations

import importlib

import typer

import prefkit

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="prefkit: offline preference alignment (DPO, EXO, TDPO, ε-DPO, DRDO, baselines) in one run directory.\n\n"
         "Every stage takes Hydra overrides, e.g. `prefkit align objective=tdpo2 model=pythia2.8b` or "
         "`prefkit align -m objective=dpo,edpo,exo`; `prefkit <stage> --help` lists its config groups.")

# stage -> (module with `run(cfg)`, one-line help)
STAGES = {
    "sft": ("prefkit.stages.sft", "Supervised fine-tuning: base model -> <run>/sft/<job>/model."),
    "reward": ("prefkit.stages.reward", "Train a Bradley-Terry reward model (or DRDO oracle, or ensemble) on pairs."),
    "align": ("prefkit.stages.align", "Align a policy with a preference objective (dpo, exo, tdpo2, edpo, drdo, ...)."),
    "sample": ("prefkit.stages.sample", "Sample completions from every policy in the run directory."),
    "judge": ("prefkit.stages.judge", "Score samples, estimate KL, label pairs, or compute win rates."),
    "frontier": ("prefkit.stages.frontier", "Reward-vs-KL frontier of everything judged: CSV, plot, table."),
    "report": ("prefkit.stages.report", "One self-contained HTML (and Markdown) report of the run."),
    "run": ("prefkit.stages.experiment", "Run an experiment (conf/experiment/<name>.yaml), then test its claims."),
}


def load_stage(module: str):
    """The stage's `run`, imported (with torch and transformers) only when it is about to run."""
    from prefkit.console import quiet_libraries

    quiet_libraries()
    return importlib.import_module(module).run


def _make_command(stage: str, module: str, help_text: str) -> None:
    @app.command(name=stage, help=help_text, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def command(ctx: typer.Context) -> None:
        from prefkit.config import run_stage

        run_stage(stage, list(ctx.args), lambda: load_stage(module), help_text)


for _stage, (_module, _help) in STAGES.items():
    _make_command(_stage, _module, _help)


@app.command(name="status", help="Every job of a run by stage: state and headline numbers (run.name=..., --json).",
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")
           ) -> None:
    from pathlib import Path

    from prefkit.console import print_error
    from prefkit.errors import UserError
    from prefkit.rundir import check_name
    from prefkit.status import show

    settings = {"run.name": "default", "run.root": "outputs"}
    try:
        for arg in ctx.args:
            key, _, value = arg.partition("=")
            if key not in settings or not value:
                raise UserError(f"status takes run.name=<name> and run.root=<dir> (and --json), not {arg!r}")
            settings[key] = value
        show(Path(settings["run.root"]) / check_name(settings["run.name"], "run.name"), as_json)
    except UserError as err:
        print_error("status", str(err))
        raise SystemExit(2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefkit {prefkit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    """prefkit: offline preference alignment in one run directory."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

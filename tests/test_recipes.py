"""The paper recipes in scripts/recipes compose: every prefkit command in them is a valid command
(the recipes themselves need GPUs and the Hub; here only their configs are checked)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from prefkit.config import validate
from prefkit.errors import UserError

RECIPES = sorted((Path(__file__).parent.parent / "scripts/recipes").glob("*.sh"))
SEP = "\x1f"


def _commands(script: Path) -> list[list[str]]:
    """Run the script with `prefkit` and `accelerate` replaced by recorders of their arguments."""
    shim = (f'prefkit() {{ local IFS="{SEP}"; echo "$*" >> "$RECORD"; }}\n'
            f'accelerate() {{ while [ "$1" != "prefkit.cli" ]; do shift; done; shift; prefkit "$@"; }}\n'
            "export -f prefkit accelerate 2>/dev/null || true\n")
    record = script.with_suffix(".record")
    env = {**os.environ, "RECORD": str(record)}
    try:
        subprocess.run(["bash", "-c", shim + f"source {script}"], env=env, check=True, capture_output=True, text=True)
        return [line.split(SEP) for line in record.read_text().splitlines()]
    finally:
        record.unlink(missing_ok=True)


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.stem)
def test_every_command_of_a_recipe_composes(script):
    commands = _commands(script)
    assert commands, f"{script.name} runs no prefkit command"
    for stage, *args in commands:
        overrides = [a for a in args if not a.startswith("-")]
        try:
            validate(stage, overrides)
        except UserError as err:
            pytest.fail(f"{script.name}: prefkit {stage} {' '.join(args)}\n{err}")

"""Terminal output: one rich console, error lines, progress bars."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MirroredConsole(Console):
    """The terminal console, whose every printed line also goes to a job's `<stage>.log` (plain text)."""

    mirror: Console | None = None

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        if self.mirror is not None:
            self.mirror.print(*objects, **kwargs)


# Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables read better wider.
console = MirroredConsole(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
log = logging.getLogger("prefkit")


@contextlib.contextmanager
def mirrored_to(path: Path) -> Iterator[None]:
    """While the block runs, what the console prints is appended to `path` as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        console.mirror = Console(file=f, width=160, no_color=True, highlight=False, soft_wrap=True,
                                 force_terminal=False)
        try:
            yield
        finally:
            console.mirror = None


def print_error(stage: str, message: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]prefkit {stage}: error:[/] {escape(message)}", soft_wrap=True)


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) off the terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def progress(**fields: str) -> Progress:
    """A progress bar with extra live fields (e.g. loss=..., lr=..., tok/s=...)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{key}]}}") for key, name in fields.items()]
    return Progress(*columns, console=console, transient=False, disable=not sys.stderr.isatty()
                    and os.environ.get("PREFKIT_PROGRESS") != "1")

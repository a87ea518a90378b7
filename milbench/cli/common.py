"""What every command shares: the consoles, the one handling of errors a user can fix, config
overrides from options, and table printing."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from milbench.execution import ExecutionError

# Piped output (logs, CI) gets a wide fixed width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 150)
# Messages are never hard-wrapped: they name paths that must stay searchable.
error_console = Console(stderr=True, soft_wrap=True, highlight=False)
# Errors a user can fix from the message alone: shown without a traceback, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileExistsError, FileNotFoundError,
                                               KeyError, ExecutionError, yaml.YAMLError)

Backend = Annotated[str | None, typer.Option(
    help="Where fits run: local (worker processes) or ray (default: the config's execution.backend).")]
Jobs = Annotated[int | None, typer.Option(
    help="Fits at once (default: the config's execution.jobs).")]
DataOption = Annotated[Path | None, typer.Option(
    help="Challenge folder; default: a generated cohort.")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
DEFAULT_CONFIG = Path("configs/pipeline.yaml")

Command = TypeVar("Command", bound=Callable[..., Any])


def fail(error: BaseException) -> None:
    """Print a user error's message (a KeyError's without its quotes) and exit with code 2."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    error_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=2)


def user_errors(command: Command) -> Command:
    """The one handling of user errors: the command's ``USER_ERRORS`` become a one-line message
    and exit code 2 instead of a traceback."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            fail(error)

    return guarded  # type: ignore[return-value]


def overrides(set_: list[str] | None, data: Path | None, backend: str | None = None,
              jobs: int | None = None) -> list[str]:
    """``--set`` items, then ``--data`` and ``--backend`` / ``--jobs`` as config overrides."""
    items = list(set_ or [])
    if data is not None:
        items.append(f"data.root={data}")
    return items + [f"execution.{key}={value}" for key, value in
                    (("backend", backend), ("jobs", jobs)) if value is not None]


def comma_list(text: str | None) -> list[str] | None:
    """``"a, b,"`` → ``["a", "b"]``; None stays None."""
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def print_table(frame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column))
    for row in frame.itertuples(index=False):
        table.add_row(*[("–" if v != v else f"{v:.3f}") if isinstance(v, float) else str(v)
                        for v in row])
    console.print(table)


def print_figures(figures: dict, title: str) -> None:
    """A nested dict of figures as one two-column table, keys joined by dots."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value")
    for key, value in _flatten(figures, ""):
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def _flatten(value: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value

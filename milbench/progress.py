"""The project's one progress bar (rich): items done, throughput, elapsed and remaining time.

``progress_bar`` yields an ``advance(n)`` function; with ``enabled=False`` (tests, logs) it is a
no-op, so call sites stay the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ThroughputColumn(ProgressColumn):
    """Items per second in the bar's own unit (rich's speed column counts bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"-- {self.unit}/s" if speed is None else f"{speed:,.1f} {self.unit}/s",
                    style="cyan")


@contextmanager
def progress_bar(description: str, total: int, *, completed: int = 0, enabled: bool = True,
                 unit: str = "it") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for a bar of ``total`` items, ``completed`` of them already done."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               ThroughputColumn(unit), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield lambda n=1: progress.advance(task, n)

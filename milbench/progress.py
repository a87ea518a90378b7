"""The project's one progress bar (rich): items done, throughput, elapsed and remaining time.

``progress_bar`` yields an ``advance(n)`` function; with ``enabled=False`` (tests) it is a
no-op, so call sites stay the same either way. Where the output is not a terminal (CI logs,
``nohup``, a pipe) a live bar would print nothing until the end, so the same progress goes to the
log instead: one line every ``LOG_EVERY_SECONDS`` and one when the work ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
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

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0


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
    if not Console().is_terminal:
        with _logged_progress(description, total, completed, unit) as advance:
            yield advance
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               ThroughputColumn(unit), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield lambda n=1: progress.advance(task, n)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def progress_line(description: str, done: int, total: int, elapsed: float, unit: str,
                  first: int = 0) -> str:
    """``description: done/total unit (pct), rate unit/s, elapsed h:mm:ss, ~h:mm:ss left``;
    the rate counts only what this session did (``first`` items were already done)."""
    rate = (done - first) / elapsed if elapsed > 0 else 0.0
    line = f"{description}: {done:,}/{total:,} {unit} ({100 * done / max(total, 1):.0f}%)"
    line += f", {rate:,.1f} {unit}/s, elapsed {_clock(elapsed)}"
    if 0 < rate and done < total:
        line += f", ~{_clock((total - done) / rate)} left"
    return line


@contextmanager
def _logged_progress(description: str, total: int, completed: int,
                     unit: str) -> Iterator[Callable[[int], None]]:
    started = last = time.monotonic()
    done = completed

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= LOG_EVERY_SECONDS:
            last = now
            log.info(progress_line(description, done, total, now - started, unit, completed))

    try:
        yield advance
    finally:  # also on an interruption: the log then says how far it got
        log.info(progress_line(description, done, total, time.monotonic() - started, unit,
                               completed))


class StageTimer:
    """Wall time of each named stage of a run, in order."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float]] = []

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append((name, time.perf_counter() - started))

    def table(self):
        """A ``stage, seconds`` DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.stages, columns=["stage", "seconds"])

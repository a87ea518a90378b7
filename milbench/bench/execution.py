"""``milbench bench execution``: what each execution backend costs per task, so a team knows the
task size below which a worker pool or Ray does not pay.

Each backend runs a grid of no-op tasks (``time.sleep(0)``), then a grid of tasks that sleep a
known time; the table gives the start-up time, the wall time per no-op task, and the parallel
efficiency on the sleeping grid (ideal wall time / measured; 1.0 is perfect). A fit should last
well above the per-task overhead times the number of jobs for the backend to pay.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from milbench.execution import ExecutionConfig, Executor
from milbench.io import atomic_write_text


def _grid(executor: Executor, tasks: int, seconds: float) -> float:
    started = time.perf_counter()
    for _ in executor.map(time.sleep, [(seconds,)] * tasks):
        pass
    return time.perf_counter() - started


def measure(backend: str, jobs: int, tasks: int, task_seconds: float) -> dict:
    config = ExecutionConfig(backend=backend, jobs=jobs)
    started = time.perf_counter()
    with Executor(config) as executor:
        _grid(executor, min(jobs, tasks), 0.0)  # workers up before anything is timed
        startup = time.perf_counter() - started
        no_op = _grid(executor, tasks, 0.0)
        sleeping = _grid(executor, tasks, task_seconds)
    ideal = tasks * task_seconds / (jobs if config.parallel else 1)
    return {"backend": backend, "jobs": jobs, "startup_s": startup,
            "no_op_ms_per_task": 1000 * no_op / tasks, "no_op_tasks_per_s": tasks / no_op,
            "task_s": task_seconds, "efficiency": ideal / sleeping}


def bench_execution_command(tasks: int = 200, jobs: int = 2, task_seconds: float = 0.05,
                            backends: tuple[str, ...] = ("local", "ray"),
                            out: Path | None = None) -> pd.DataFrame:
    """One row per backend (this process, then each of ``backends`` with ``jobs``); with ``out``,
    ``execution.md`` holds the table and the command."""
    rows = [measure("local", 1, tasks, task_seconds)]
    rows += [measure(backend, jobs, tasks, task_seconds) for backend in backends]
    frame = pd.DataFrame(rows)
    if out is not None:
        command = (f"milbench bench execution --tasks {tasks} --jobs {jobs} "
                   f"--task-seconds {task_seconds}")
        atomic_write_text(Path(out) / "execution.md",
                          f"`{command}`\n\n{frame.to_markdown(index=False, floatfmt='.3f')}\n")
    return frame

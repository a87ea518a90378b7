"""Where fits run: ``local`` (this process, or a pool of worker processes) or ``ray`` (a local
Ray instance, or an existing cluster). The same config and seed give the same results on either.

Orchestration (run, ablate, bench mil, tune) hands an :class:`Executor` a picklable function and
one argument tuple per task; ``map`` yields ``(index, result)`` as tasks finish and the caller
(the driver) alone writes the run directory. Each task runs with one thread per CPU it declares
(torch, BLAS and OpenMP), here, in the pool and on Ray alike, so a result does not depend on
where it ran.

On a cluster every worker must see the paths the tasks read (the workdir with its feature
stores, the data folder): ``shared_paths`` are checked on the worker before the task runs, and a
worker that cannot see one fails with an error naming the host and the path.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

RAY_INSTALL = 'pip install "milbench[ray]"'
# Testing hook: a file path; the first Ray task to create it kills its own worker (a crash Ray
# must retry). Read in the driver and handed to the tasks, so it reaches remote workers too.
FAIL_ONCE_VARIABLE = "MILBENCH_TEST_FAIL_ONCE"


class ExecutionError(RuntimeError):
    """The execution backend cannot run the tasks (Ray missing, unreachable, a worker that
    cannot see the shared paths)."""


class ExecutionConfig(BaseModel):
    """``execution:`` in a run config (``--backend`` / ``--jobs`` on the command line)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster address (host:port, ray://host:port or "
                                "'auto'); null: RAY_ADDRESS, else a local Ray instance")
    jobs: int = Field(1, ge=1, description="tasks at once: worker processes (local) or the CPUs of a "
                      "local Ray instance; on a cluster, Ray schedules by the declared resources")
    cpus_per_task: int = Field(1, ge=1)
    gpus_per_task: float = Field(0, ge=0, description="GPUs a Ray task declares (fractions share one)")
    max_retries: int = Field(3, ge=0, description="Ray retries of a task whose worker died")

    @property
    def parallel(self) -> bool:
        """Whether tasks leave this process (a worker pool or Ray)."""
        return self.backend == "ray" or self.jobs > 1


def with_overrides(config: ExecutionConfig, backend: str | None = None,
                   jobs: int | None = None) -> ExecutionConfig:
    """``config`` with the command line's ``--backend`` / ``--jobs`` applied."""
    update = {k: v for k, v in {"backend": backend, "jobs": jobs}.items() if v is not None}
    return ExecutionConfig.model_validate({**config.model_dump(), **update})


def require_ray(config: ExecutionConfig) -> None:
    """Before any work: the ray backend needs Ray installed."""
    if config.backend != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ExecutionError(f"execution.backend is 'ray' but Ray is not installed; install it "
                             f"with: {RAY_INSTALL}") from None


def _run_task(function: Callable, threads: int, shared_paths: Sequence[str], fail_once: str | None,
              *arguments) -> Any:
    """A task as a worker runs it: shared paths checked, ``threads`` torch threads."""
    missing = [path for path in shared_paths if not Path(path).exists()]
    if missing:
        raise ExecutionError(f"worker {socket.gethostname()} cannot see {missing[0]}: on a cluster "
                             "the workdir (feature stores) and the data folder must be on storage "
                             "every node mounts at the same path")
    if fail_once is not None:
        try:
            os.close(os.open(fail_once, os.O_CREAT | os.O_EXCL))
            os._exit(1)  # the injected fault: this worker dies mid-task
        except FileExistsError:
            pass
    from threadpoolctl import threadpool_limits

    from milbench.training import torch_threads

    # BLAS and OpenMP pools too: two workers with two BLAS threads each oversubscribed 2 cores
    # (the pool ran a D-MIL grid 24 % slower than Ray, whose workers get one OpenMP thread) and
    # a thread count can change a sum's order, hence a score.
    with threadpool_limits(limits=threads), torch_threads(threads):
        return function(*arguments)


class Executor:
    """Runs tasks for one command; a context manager that owns its pool or Ray connection."""

    def __init__(self, config: ExecutionConfig, shared_paths: Sequence[str | Path] = ()):
        self.config = config
        self.shared_paths = [str(Path(p).resolve()) for p in shared_paths]
        self._pool: ProcessPoolExecutor | None = None
        self._started_ray = False

    @property
    def parallel(self) -> bool:
        return self.config.parallel

    def __enter__(self) -> Executor:
        if self.config.backend == "ray":
            self._started_ray = connect_ray(self.config)
        elif self.config.jobs > 1:
            # spawn, not fork: forking a process that already runs OpenMP/torch threads can hang.
            self._pool = ProcessPoolExecutor(max_workers=self.config.jobs,
                                             mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def map(self, function: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """``(index, function(*tasks[index]))`` for every task, in the order they finish.

        ``function`` must be importable by name in the workers (a module-level function) when
        the tasks leave this process. Without a pool or Ray, tasks run here one after another (with
        the same torch threads as in a worker)."""
        if self.config.backend == "ray":
            yield from self._map_ray(function, tasks)
        elif self._pool is not None:
            threads = self.config.cpus_per_task
            pending = {self._pool.submit(_run_task, function, threads, self.shared_paths, None, *task):
                       index for index, task in enumerate(tasks)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield pending.pop(future), future.result()
            finally:
                for future in pending:
                    future.cancel()
        else:
            for index, task in enumerate(tasks):
                yield index, _run_task(function, self.config.cpus_per_task, (), None, *task)

    def _map_ray(self, function: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        import ray

        config = self.config
        remote = ray.remote(num_cpus=config.cpus_per_task, num_gpus=config.gpus_per_task,
                            max_retries=config.max_retries)(_run_task)
        function_ref = ray.put(function)
        # An argument shared by many tasks (a dataset) goes to the object store once.
        shared: dict[int, Any] = {}

        def stored(argument):
            if isinstance(argument, str | int | float | bool | type(None)):
                return argument
            key = id(argument)
            if key not in shared:
                shared[key] = ray.put(argument)
            return shared[key]

        fail_once = os.environ.get(FAIL_ONCE_VARIABLE)
        pending = {}
        for index, task in enumerate(tasks):
            arguments = [stored(argument) for argument in task]
            # Top-level arguments, so that Ray resolves their object-store references.
            reference = remote.remote(function_ref, config.cpus_per_task, self.shared_paths,
                                      fail_once, *arguments)
            pending[reference] = index
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for reference in done:
                    index = pending.pop(reference)
                    try:
                        yield index, ray.get(reference)
                    except ray.exceptions.RayTaskError as error:
                        cause = error.cause if error.cause is not None else error
                        raise cause from None
        finally:
            # Tasks still queued after an error or an interrupt are left to end with the job (a
            # local instance this executor started stops on exit), not cancelled: ray.cancel
            # racing with a task that is completing aborts the driver process (a Ray bug, seen in
            # CI: "Check failed: it != submissible_tasks_.end()" in task_manager.cc).
            if pending:
                log.info("%d queued Ray task(s) left to end with the job", len(pending))


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray address (ray.init would retry for minutes)."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutionError(f"execution.address {address!r} must look like host:port or "
                             "ray://host:port (or be 'auto')")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ExecutionError(f"cannot reach the Ray cluster at {address} ({error}); start one "
                             "with `ray start --head` there, or fix execution.address / "
                             "RAY_ADDRESS") from None


def connect_ray(config: ExecutionConfig) -> bool:
    """Connect to the configured cluster, or start a local Ray instance with ``jobs`` CPUs.
    Returns whether this call started the connection (and so must shut it down)."""
    require_ray(config)
    import ray

    address = config.address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        _reachable(address)
    if ray.is_initialized():  # a session the caller (or a test) already opened
        return False
    started = time.perf_counter()
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=config.jobs * config.cpus_per_task, include_dashboard=False,
                     log_to_driver=False)
    except (ConnectionError, RuntimeError) as error:
        raise ExecutionError(f"cannot connect to Ray at {address or 'a new local instance'}: "
                             f"{error}") from None
    log.info("Ray %s in %.1f s: %s", "connected" if address else "started",
             time.perf_counter() - started, ray.cluster_resources())
    return True

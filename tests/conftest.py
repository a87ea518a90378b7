"""Shared test settings and fixtures.

Under pytest-xdist (the quick loop's ``-n 2``) each worker computes on one thread: two workers
with a thread per core each would fight over the cores (80 s instead of 160 s on 2 cores).
"""

import contextlib
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def progress_bars(monkeypatch):
    """Every progress bar opened from here on, as ``(total, completed)``; the bars show nothing."""
    from milbench import progress

    opened = []

    @contextlib.contextmanager
    def recorded(description, total, *, completed=0, enabled=True, unit="it"):
        opened.append((total, completed))
        yield lambda n=1: None

    monkeypatch.setattr(progress, "progress_bar", recorded)
    return opened

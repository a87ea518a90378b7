"""Shared test settings.

Under pytest-xdist (the quick loop's ``-n 2``) each worker computes on one thread: two workers
with a thread per core each would fight over the cores (80 s instead of 160 s on 2 cores).
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    import torch

    torch.set_num_threads(1)

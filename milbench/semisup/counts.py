"""Per-patient counts of images predicted 0 and 1, and the matrix the patient classifier reads.

The seed classified a patient from ``[count 0, count 1, lymphocyte count, age]``: raw counts, not
rates, because tumoral patients also have more images (a larger lymphocyte population).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COUNT_MATRIX_COLUMNS: tuple[str, ...] = ("count_0", "count_1", "lymph_count", "age")


def predicted_counts(instance_probabilities: Sequence[np.ndarray], threshold: float = 0.5
                     ) -> np.ndarray:
    """``(n_bags, 2)`` integer array: images with P(1) below / at or above ``threshold``."""
    rows = []
    for index, probabilities in enumerate(instance_probabilities):
        probabilities = np.asarray(probabilities, dtype=float)
        if probabilities.ndim != 1:
            raise ValueError(f"bag {index}: instance probabilities must be 1-D, "
                             f"got shape {probabilities.shape}")
        positive = int((probabilities >= threshold).sum())
        rows.append((len(probabilities) - positive, positive))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def count_matrix(counts: np.ndarray, clinical: np.ndarray) -> np.ndarray:
    """``[count 0, count 1, lymphocyte count, age]`` per patient.

    ``clinical`` is the ``(n, 3)`` array of ``milbench.core.clinical.CLINICAL_COLUMNS``
    (age, lymph_count, male), as :func:`milbench.models.base.check_clinical` returns it.
    """
    counts = np.asarray(counts, dtype=float)
    clinical = np.asarray(clinical, dtype=float)
    if counts.ndim != 2 or counts.shape[1] != 2:
        raise ValueError(f"counts must be (n, 2), got {counts.shape}")
    if clinical.ndim != 2 or clinical.shape[0] != counts.shape[0] or clinical.shape[1] < 2:
        raise ValueError(f"clinical must be (n={counts.shape[0]}, 3), got {clinical.shape}")
    age, lymph_count = clinical[:, 0], clinical[:, 1]
    return np.column_stack([counts, lymph_count, age])

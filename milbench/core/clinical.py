"""The clinical attributes every layer agrees on: their column order and their design matrix."""

from __future__ import annotations

import numpy as np

CLINICAL_COLUMNS: tuple[str, ...] = ("age", "lymph_count", "male")


def clinical_design_matrix(clinical: np.ndarray) -> np.ndarray:
    """Age, log lymphocyte count (counts span two decades), male indicator."""
    age, count, male = clinical[:, 0], clinical[:, 1], clinical[:, 2]
    return np.column_stack([age, np.log(np.clip(count, 1e-3, None)), male])

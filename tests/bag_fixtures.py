"""Tiny seeded bag fixtures for the model tests (kept out of conftest.py to avoid conflicts).

``make_tiny_bags`` builds a dozen bags of 2-7 instances whose label follows from the
instances: a positive bag holds exactly one *witness* instance far out along feature 0, a
negative bag none. The clinical table (columns ``CLINICAL_COLUMNS``) is informative too
(higher lymphocyte counts in positive bags) so that clinical-only models can learn it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from milbench.models.base import CLINICAL_COLUMNS

WITNESS_SHIFT = 4.0


def make_tiny_bags(
    n_bags: int = 12, n_features: int = 4, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray, pd.DataFrame, list[int]]:
    """Return ``bags, labels, clinical, witness_rows`` (witness row per bag, -1 if negative)."""
    rng = np.random.default_rng(seed)
    labels = np.array([1, 0] * (n_bags // 2) + [1] * (n_bags % 2))
    bags, witness_rows = [], []
    for label in labels:
        size = int(rng.integers(2, 8))
        bag = rng.normal(0.0, 1.0, size=(size, n_features))
        bag[:, 0] = np.clip(bag[:, 0], -1.5, 1.5)  # keep ordinary instances off the witness side
        if label:
            row = int(rng.integers(size))
            bag[row, 0] = WITNESS_SHIFT + rng.normal(0.0, 0.3)
            witness_rows.append(row)
        else:
            witness_rows.append(-1)
        bags.append(bag)
    clinical = pd.DataFrame(
        {
            "age": rng.normal(65, 10, n_bags).round(),
            "lymph_count": np.exp(rng.normal(2.0 + 1.5 * labels, 0.3)),
            "male": rng.integers(0, 2, n_bags).astype(float),
        },
        columns=list(CLINICAL_COLUMNS),
    )
    return bags, labels, clinical, witness_rows


def make_tiny_image_bags(side: int = 32) -> tuple[list[np.ndarray], np.ndarray, pd.DataFrame, list[int]]:
    """The ``tiny`` synthetic preset's training patients as pixels-store bags: ``(n_i, 3 * side
    * side)`` uint8 rows (models tagged ``images``). Witness rows are unknown: -1."""
    import tempfile
    from datetime import date
    from pathlib import Path

    from milbench.data.challenge import load_challenge
    from milbench.synth import generate_cohort
    from preprocessing.extract import extract_features

    work = Path(tempfile.mkdtemp(prefix="milbench-images-"))
    root = generate_cohort(work / "tiny", "tiny", seed=0)
    cohort = load_challenge(root, reference_date=date(2021, 1, 1)).train()
    store = extract_features(cohort, {"kind": "pixels", "input_size": side}, work / "cache",
                             progress=False, num_workers=0)
    bags = store.bags(cohort)
    return bags, cohort.labels(), cohort.clinical_table(), [-1] * len(bags)

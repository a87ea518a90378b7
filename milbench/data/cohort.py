"""The cohort data model: patients with their split, label, clinical attributes and images."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.core.clinical import CLINICAL_COLUMNS

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Patient:
    """One bag: a patient's images plus clinical attributes. ``label`` is None for test patients."""

    id: str
    split: str
    label: int | None
    gender: str  # "M" or "F"
    dob: date
    age: float  # years at the cohort's reference date
    lymph_count: float
    image_paths: tuple[Path, ...]

    @property
    def n_images(self) -> int:
        return len(self.image_paths)


@dataclass(frozen=True)
class SkipRecord:
    """Something the loader left out on purpose, with the reason (written into every run)."""

    path: str
    reason: str


@dataclass
class Cohort:
    """Patients in a fixed order (train first, then test, each sorted by ID)."""

    root: Path
    patients: list[Patient]
    reference_date: date
    skipped: list[SkipRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.patients]

    def by_split(self, split: str) -> Cohort:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return replace(self, patients=[p for p in self.patients if p.split == split])

    def train(self) -> Cohort:
        return self.by_split("train")

    def test(self) -> Cohort:
        return self.by_split("test")

    def subset(self, ids) -> Cohort:
        """Patients with the given IDs, in the order given; unknown IDs raise KeyError."""
        index = {p.id: p for p in self.patients}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"patients not in cohort: {missing[:10]}")
        return replace(self, patients=[index[i] for i in ids])

    def labels(self) -> np.ndarray:
        """0/1 labels; raises if any patient is unlabelled (a test patient)."""
        unlabelled = [p.id for p in self.patients if p.label is None]
        if unlabelled:
            raise ValueError(f"patients without label (test split?): {unlabelled[:10]}")
        return np.array([p.label for p in self.patients], dtype=int)

    def clinical_table(self) -> pd.DataFrame:
        """Numeric clinical attributes in the column order models expect (``CLINICAL_COLUMNS``)."""
        table = pd.DataFrame(
            {
                "age": [p.age for p in self.patients],
                "lymph_count": [p.lymph_count for p in self.patients],
                "male": [1.0 if p.gender == "M" else 0.0 for p in self.patients],
            },
            index=pd.Index(self.ids, name="patient_id"),
        )
        return table.loc[:, list(CLINICAL_COLUMNS)]

    def frame(self) -> pd.DataFrame:
        """One row per patient, for summaries and reports."""
        return pd.DataFrame(
            {
                "patient_id": self.ids,
                "split": [p.split for p in self.patients],
                "label": pd.array([p.label for p in self.patients], dtype="Int64"),
                "gender": [p.gender for p in self.patients],
                "dob": [p.dob.isoformat() for p in self.patients],
                "age": [p.age for p in self.patients],
                "lymph_count": [p.lymph_count for p in self.patients],
                "n_images": [p.n_images for p in self.patients],
            }
        )

    def image_table(self) -> pd.DataFrame:
        """One row per image: patient, position within the bag, path."""
        rows = [
            (p.id, position, str(path))
            for p in self.patients
            for position, path in enumerate(p.image_paths)
        ]
        return pd.DataFrame(rows, columns=["patient_id", "position", "path"])

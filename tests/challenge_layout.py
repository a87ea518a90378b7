"""Writes small challenge-layout folders for loader and CLI tests (independent of milbench.synth)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Row:
    id: str
    label: int
    gender: str = "M"
    dob: str = "11/3/1933"
    count: str = "11.2"
    n_images: int = 3
    extra: dict = field(default_factory=dict)


def write_jpeg(path: Path, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def default_rows(n_train: int = 12, n_test: int = 4, seed: int = 0) -> list[Row]:
    """Labels follow the lymphocyte count so a clinical model has something to learn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        label = i % 3 != 0 if i < n_train else -1
        tumoral = label == 1 or (label == -1 and i % 2 == 0)
        count = rng.uniform(9, 60) if tumoral else rng.uniform(2.5, 7)
        year = int(rng.integers(1925, 1945) if tumoral else rng.integers(1950, 1990))
        dob = f"{int(rng.integers(1, 13))}/{int(rng.integers(1, 29))}/{year}"
        if i % 5 == 4:
            dob = f"{int(rng.integers(1, 29)):02d}-{int(rng.integers(1, 13)):02d}-{year}"
        gender = "MFf"[i % 3]
        rows.append(Row(f"P{i + 1}", int(label), gender, dob, f"{count:.2f}", 2 + i % 4))
    return rows


def write_challenge(
    root: Path, rows: list[Row], combined: bool = True, index_column: bool = True, split_csvs: bool = True
) -> Path:
    """Write the challenge layout: CSVs and one folder of JPEGs per row (test rows: label -1)."""
    root.mkdir(parents=True, exist_ok=True)
    header = "ID,LABEL,GENDER,DOB,LYMPH_COUNT"

    def line(r: Row) -> str:
        return f"{r.id},{r.label},{r.gender},{r.dob},{r.count}"

    if combined:
        lines = [("," if index_column else "") + header]
        lines += [(f"{i}," if index_column else "") + line(r) for i, r in enumerate(rows)]
        (root / "clinical_annotation.csv").write_text("\n".join(lines) + "\n")
    for split, folder, name in (("train", "trainset", "trainset_true.csv"),
                                ("test", "testset", "testset_data.csv")):
        (root / folder).mkdir(exist_ok=True)
        members = [r for r in rows if (r.label == -1) == (split == "test")]
        if split_csvs:
            (root / folder / name).write_text("\n".join([header] + [line(r) for r in members]) + "\n")
        for r in members:
            patient_dir = root / folder / r.id
            patient_dir.mkdir(exist_ok=True)
            for k in range(r.n_images):
                write_jpeg(patient_dir / f"{k:06d}.jpg", seed=hash((r.id, k)) % 2**32)
    return root

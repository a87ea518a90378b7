"""Small drawn blood smears for tests and demos (no real data needed).

A pale background, pink red cells, and one lymphocyte at the centre: a dark purple nucleus in
a thin pale-blue cytoplasm rim. Returns the truth cell mask with each image, so segmentation
can be scored. The full synthetic cohort generator lives in ``milbench.synth``; this module
only serves the preprocessing tests and benchmarks that must run without it.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import cv2
import numpy as np

from milbench.data.cohort import Cohort, Patient
from preprocessing.images import write_mask, write_rgb


def draw_smear(rng: np.random.Generator, size: int = 224, n_red: int = 7
               ) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 smear and the boolean mask of its central white cell."""
    background = np.array([232, 222, 226]) + rng.integers(-8, 8, 3)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    scale = size / 224
    offset = (rng.integers(-6, 7, 2) * scale).astype(int)
    centre = (size // 2 + int(offset[0]), size // 2 + int(offset[1]))
    cell_radius = int(rng.integers(26, 36) * scale)
    # Red cells away from the centre so they never hide the lymphocyte.
    for _ in range(n_red):
        while True:
            x, y = rng.integers(0, size, 2)
            if np.hypot(x - centre[0], y - centre[1]) > cell_radius + 30 * scale:
                break
        colour = tuple(int(v) for v in rng.integers((200, 120, 140), (225, 150, 170)))
        cv2.circle(image, (int(x), int(y)), int(rng.integers(18, 26) * scale), colour, -1)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, cell_radius, 1, -1)
    cv2.circle(image, centre, cell_radius, (175, 180, 215), -1)  # cytoplasm
    axes = (int(cell_radius * 0.8), int(cell_radius * rng.uniform(0.65, 0.8)))
    cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, (95, 45, 140), -1)
    noise = rng.normal(0, 4, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    return image, mask.astype(bool)


def write_toy_cohort(out_dir: str | os.PathLike, n_patients: int = 4, images_per_patient: int = 3,
                     *, size: int = 224, seed: int = 0, n_test: int = 1) -> Cohort:
    """A tiny challenge-like cohort on disk (JPEGs + truth masks), returned as a ``Cohort``."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    patients = []
    for index in range(n_patients):
        split = "test" if index >= n_patients - n_test else "train"
        patient_id = f"P{index + 1}"
        folder = out_dir / ("testset" if split == "test" else "trainset") / patient_id
        paths = []
        for position in range(images_per_patient):
            image, mask = draw_smear(rng, size)
            path = folder / f"{position:06d}.jpg"
            write_rgb(path, image)
            write_mask(out_dir / "truth" / "masks" / patient_id / f"{position:06d}_cell.png", mask)
            paths.append(path)
        patients.append(Patient(
            id=patient_id, split=split, label=None if split == "test" else index % 2,
            gender="M" if index % 2 else "F", dob=date(1950, 1, 1), age=70.0,
            lymph_count=10.0 + index, image_paths=tuple(paths)))
    return Cohort(root=out_dir, patients=patients, reference_date=date(2020, 1, 1))

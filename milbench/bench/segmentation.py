"""Segmentation quality: mean IoU of the cell mask per variant against synthetic truth masks.

Needs a cohort with ``truth/masks/P<id>/<stem>_cell.png`` (the ``tiny`` and ``small``
synthetic presets write them). Also saves a PNG grid (image, truth, then each variant's
overlay) for a person to look at.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.io import atomic_write, atomic_write_json, atomic_write_text
from preprocessing.images import read_mask, read_rgb
from preprocessing.segmentation import iou, list_variants, segment


def truth_mask_path(root: Path, image_path: Path, part: str = "cell") -> Path:
    return root / "truth" / "masks" / image_path.parent.name / f"{image_path.stem}_{part}.png"


def labelled_images(root: str | os.PathLike, limit: int | None = None) -> list[tuple[Path, Path]]:
    """``(image, truth cell mask)`` pairs of a challenge-layout folder with truth masks."""
    from milbench.data import load_challenge

    root = Path(root)
    cohort = load_challenge(root)
    pairs = [(Path(p), truth_mask_path(root, Path(p)))
             for patient in cohort.patients for p in patient.image_paths]
    pairs = [pair for pair in pairs if pair[1].is_file()]
    if not pairs:
        raise FileNotFoundError(f"no truth masks under {root / 'truth' / 'masks'}; generate a "
                                "synthetic cohort with the tiny or small preset")
    return pairs[:limit]


def overlay(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """Predicted mask tinted green; truth outline in yellow where given."""
    import cv2

    out = image.astype(np.float32)
    out[mask] = 0.55 * out[mask] + 0.45 * np.array([0, 255, 0])
    out = out.astype(np.uint8)
    if truth is not None:
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 220, 0), 1)
    return out


def save_grid(rows: list[dict], variants: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 + 2 * len(variants)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 1.8 * len(rows)),
                                squeeze=False)
    for r, row in enumerate(rows):
        panels = [("image", row["image"]), ("truth", row["truth"])]
        for variant in variants:
            panels.append((f"{variant}\nmask", row["masks"][variant]))
            panels.append((f"IoU {row['iou'][variant]:.2f}",
                           overlay(row["image"], row["masks"][variant], row["truth"])))
        for c, (title, panel) in enumerate(panels):
            axis = axes[r, c]
            axis.imshow(panel, cmap="gray" if panel.ndim == 2 else None)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(title, fontsize=6)
        axes[r, 0].set_ylabel(row["name"], fontsize=6)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return path


def bench_segmentation_command(root: str | os.PathLike | None = None,
                               variants: list[str] | None = None, *,
                               out: str | os.PathLike = "bench-segmentation",
                               limit: int | None = None, grid_rows: int = 6,
                               preset: str = "tiny", seed: int = 0,
                               print_table: bool = True) -> pd.DataFrame:
    """Mean IoU (and spread, seconds per image) per variant; writes CSV, JSON and grid PNG.

    Without ``root`` a synthetic cohort of ``preset`` is generated in a temporary folder.
    """
    variants = variants or list_variants()
    unknown = sorted(set(variants) - set(list_variants()))
    if unknown:
        raise ValueError(f"unknown segmentation variants {unknown}; choose from "
                         f"{list_variants()}")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="milbench-seg-") as scratch:
        if root is None:
            from milbench.synth import generate_cohort

            root = generate_cohort(Path(scratch) / "cohort", preset=preset, seed=seed)
        pairs = labelled_images(root, limit)
        scores = {v: [] for v in variants}
        seconds = {v: 0.0 for v in variants}
        # Grid rows spread over the set rather than the first patient only.
        shown = set(np.linspace(0, len(pairs) - 1, min(grid_rows, len(pairs))).astype(int))
        grid = []
        for index, (image_path, truth_path) in enumerate(pairs):
            image, truth = read_rgb(image_path), read_mask(truth_path)
            row = {"name": f"{image_path.parent.name}/{image_path.name}", "image": image,
                   "truth": truth, "masks": {}, "iou": {}}
            for variant in variants:
                started = time.perf_counter()
                mask = segment(image, variant, seed=seed)
                seconds[variant] += time.perf_counter() - started
                scores[variant].append(iou(mask, truth))
                row["masks"][variant], row["iou"][variant] = mask, scores[variant][-1]
            if index in shown:
                grid.append(row)
        table = pd.DataFrame([
            {"variant": v, "images": len(scores[v]), "mean_iou": float(np.mean(scores[v])),
             "min_iou": float(np.min(scores[v])), "p10_iou": float(np.percentile(scores[v], 10)),
             "ms_per_image": 1000 * seconds[v] / len(scores[v])}
            for v in variants])
        save_grid(grid, variants, out / "segmentation_grid.png")
    atomic_write_text(out / "segmentation_bench.csv", table.to_csv(index=False))
    atomic_write_json(out / "segmentation_bench.json", {"root": str(root),
                                                         "rows": table.to_dict("records")})
    if print_table:
        from rich.console import Console
        from rich.table import Table

        view = Table(title=f"segmentation IoU of the cell mask ({len(pairs)} images)")
        for column in table.columns:
            view.add_column(column)
        for record in table.itertuples(index=False):
            view.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in record])
        Console().print(view)
    return table

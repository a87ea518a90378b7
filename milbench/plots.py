"""Figures for run reports and cohort summaries (matplotlib, headless)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

CLASS_NAMES = {0: "reactive (0)", 1: "tumoral (1)"}


def clinical_by_class(patients: pd.DataFrame):
    """Histograms of age and lymphocyte count (log scale) for each class of labelled patients."""
    labelled = patients[patients["label"].notna()]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    count_bins = np.logspace(np.log10(max(labelled["lymph_count"].min(), 0.1)),
                             np.log10(labelled["lymph_count"].max() + 1), 25)
    for label, group in labelled.groupby("label"):
        name = CLASS_NAMES.get(int(label), str(label))
        axes[0].hist(group["age"], bins=20, alpha=0.6, label=name)
        axes[1].hist(group["lymph_count"], bins=count_bins, alpha=0.6, label=name)
    axes[0].set(xlabel="age (years)", ylabel="patients", title="Age by class")
    axes[1].set(xlabel="lymphocyte count (log scale)", ylabel="patients", title="Lymphocyte count by class")
    axes[1].set_xscale("log")
    for axis in axes:
        axis.legend()
    figure.tight_layout()
    return figure


def roc_curves(oof_by_model: dict[str, pd.DataFrame]):
    """ROC of the out-of-fold scores of each model (first repeat)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    for name, oof in oof_by_model.items():
        first = oof[oof["repeat"] == oof["repeat"].min()]
        if first["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(first["label"], first["score"])
        axis.plot(fpr, tpr, label=name)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="Out-of-fold ROC")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def confusion_matrices(cells_by_model: dict[str, dict[str, int]]):
    """One 2x2 confusion matrix per model (counts summed over repeats)."""
    n = len(cells_by_model)
    figure, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for axis, (name, c) in zip(axes[0], cells_by_model.items(), strict=True):
        matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        axis.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > matrix.max() / 2 else "black"
            axis.text(j, i, str(value), ha="center", va="center", color=colour)
        axis.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="true", title=name)
    figure.tight_layout()
    return figure


def bag_sizes_by_class(patients: pd.DataFrame):
    """Histogram of images per patient for each class of training patients, and the test patients."""
    groups = [(f"train, {CLASS_NAMES[label]}", patients[(patients["split"] == "train")
                                                        & (patients["label"] == label)])
              for label in (0, 1)]
    groups.append(("test (unlabelled)", patients[patients["split"] == "test"]))
    groups = [(name, group["n_images"]) for name, group in groups if len(group)]
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(patients["n_images"], bins=min(25, max(5, len(patients) // 4)))
    for name, sizes in groups:
        axis.hist(sizes, bins=bins, histtype="step", linewidth=2,
                  label=f"{name}: n={len(sizes)}, median {np.median(sizes):g}")
    axis.set(xlabel="images per patient (bag size)", ylabel="patients", title="Bag size by class")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def oof_scores_by_class(oof_by_model: dict[str, pd.DataFrame]):
    """Per model, each training patient's out-of-fold score (mean over repeats) by true class:
    a jittered strip per class with its median."""
    n = len(oof_by_model)
    columns = min(n, 4)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    jitter = np.random.default_rng(0)
    for axis, (name, oof) in zip(axes.flat, oof_by_model.items(), strict=False):
        per_patient = oof.groupby("patient_id", sort=False).agg(label=("label", "first"),
                                                                score=("score", "mean"))
        for label, group in per_patient.groupby("label"):
            x = int(label) + jitter.uniform(-0.15, 0.15, len(group))
            axis.scatter(x, group["score"], s=12, alpha=0.6, color=f"C{int(label)}")
            median = group["score"].median()
            axis.plot([int(label) - 0.3, int(label) + 0.3], [median, median], color="black", linewidth=2)
        axis.set(xticks=[0, 1], xticklabels=[CLASS_NAMES[0], CLASS_NAMES[1]], xlim=(-0.6, 1.6),
                 ylabel="out-of-fold score", title=name)
    for axis in list(axes.flat)[n:]:
        axis.set_axis_off()
    figure.suptitle("Out-of-fold scores by true class (mean over repeats; bar: median)", fontsize=10)
    figure.tight_layout()
    return figure


@dataclass
class MontageCell:
    image: np.ndarray  # RGB uint8
    score: float
    atypical: bool | None  # synthetic truth; None when unknown


@dataclass
class MontageRow:
    caption: str
    cells: list[MontageCell]


def instance_montage(rows: list[MontageRow], title: str, n_columns: int):
    """A grid of images, one row per patient (caption at the left), each titled with its score;
    truly atypical images get a red frame."""
    n_rows = max(len(rows), 1)
    title_inches = 0.16 * (title.count("\n") + 1) + 0.18
    # Inches: a caption column, then ~0.8-inch images with their scores above, in 1-inch rows.
    width, height = 1.4 + 0.85 * n_columns + 0.1, title_inches + 1.0 * n_rows + 0.1
    figure, axes = plt.subplots(n_rows, n_columns, figsize=(width, height), squeeze=False)
    figure.subplots_adjust(left=1.4 / width, right=1 - 0.1 / width, top=1 - title_inches / height,
                           bottom=0.1 / height, wspace=0.08, hspace=0.25)
    for axis_row, row in zip(axes, rows, strict=False):
        for column, axis in enumerate(axis_row):
            if column >= len(row.cells):
                axis.set_axis_off()
                continue
            cell = row.cells[column]
            axis.imshow(cell.image)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"{cell.score:.3g}", fontsize=7, pad=2)
            for spine in axis.spines.values():
                spine.set_visible(bool(cell.atypical))
                spine.set_color("red")
                spine.set_linewidth(3)
        axis_row[0].set_ylabel(row.caption, rotation=0, ha="right", va="center", fontsize=7, labelpad=6)
    for axis in axes.flat[len(rows) * n_columns:]:
        axis.set_axis_off()
    figure.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    return figure

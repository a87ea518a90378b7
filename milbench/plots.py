"""Figures for run reports and cohort summaries (matplotlib, headless)."""

from __future__ import annotations

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


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

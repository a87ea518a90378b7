"""Classification metrics for bag predictions and their aggregation over repeats."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

METRICS = ("balanced_accuracy", "f1", "precision", "recall", "roc_auc")


def binary_metrics(y_true, y_pred, y_score=None) -> dict[str, float]:
    """Balanced accuracy, F1, precision, recall, ROC AUC (NaN with one class or no scores) and
    the confusion-matrix cells ``tn, fp, fn, tp``."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape}, y_pred {y_pred.shape}")
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    auc = float(roc_auc_score(y_true, y_score)) if y_score is not None and both_classes else np.nan
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if both_classes else np.nan,
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "roc_auc": auc,
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


def aggregate(per_repeat: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one repeat) and max of each metric over rows."""
    rows = {}
    for name in metrics:
        values = per_repeat[name].astype(float)
        rows[name] = {
            "mean": values.mean(),
            "std": values.std(ddof=1) if len(values) > 1 else 0.0,
            "max": values.max(),
            "n": int(values.notna().sum()),
        }
    return pd.DataFrame(rows).T


def format_mean_std_max(summary: pd.DataFrame, metric: str) -> str:
    row = summary.loc[metric]
    return f"{row['mean']:.3f} ± {row['std']:.3f} ({row['max']:.3f})"


def format_interval(value: float, low: float, high: float, signed: bool = False) -> str:
    """``value [low, high]`` to 3 decimals; ``signed`` for differences (``+0.044 [-0.054, …]``)."""
    spec = "+.3f" if signed else ".3f"
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def format_intervals(values, lows, highs, signed: bool = False) -> list[str]:
    """``format_interval`` over aligned columns."""
    return [format_interval(v, lo, hi, signed) for v, lo, hi in zip(values, lows, highs, strict=True)]

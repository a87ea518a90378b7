"""Repeated cross-validation of a bag model with out-of-fold predictions.

Each fold trains a fresh clone seeded from (seed, repeat, fold), so a fold's result does not depend
on which folds ran before it. Only the training patients' labels reach ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from milbench.core.metrics import aggregate, binary_metrics
from milbench.evaluation.splits import Fold
from milbench.models.base import FoldFit, fit_fold
from milbench.progress import progress_bar


@dataclass
class CVResult:
    """Out-of-fold predictions (one row per repeat and patient) and metrics per repeat."""

    oof: pd.DataFrame
    per_repeat: pd.DataFrame
    fit_seconds: list[float]
    histories: list[list[dict] | None]  # per fold, the model's ``history_`` where it keeps one

    @property
    def summary(self) -> pd.DataFrame:
        return aggregate(self.per_repeat)


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    return seed * 1_000_003 + repeat * 1_000 + fold


def cross_validate(
    model,
    bags: list[np.ndarray],
    labels: np.ndarray,
    ids: list[str],
    folds: list[Fold],
    clinical: pd.DataFrame | None = None,
    seed: int = 0,
    description: str = "cross-validation",
    progress: bool = True,
    on_fold: Callable[[Fold, FoldFit, list[int], list[int]], None] | None = None,
) -> CVResult:
    """Fit ``clone(model)`` on each fold's training patients and predict its validation ones;
    ``on_fold(fold, fitted, train_rows, val_rows)`` sees each fitted fold (a benchmark reads
    the fitted model's logs there)."""
    position = {pid: i for i, pid in enumerate(ids)}
    labels = np.asarray(labels, dtype=int)
    rows, fit_seconds, histories = [], [], []
    with progress_bar(description, total=len(folds), enabled=progress, unit="fold") as advance:
        for fold in folds:
            train = [position[pid] for pid in fold.train_ids]
            val = [position[pid] for pid in fold.val_ids]
            fitted = fit_fold(model, bags, labels, train, val, clinical,
                              fold_seed(seed, fold.repeat, fold.fold))
            fit_seconds.append(fitted.fit_seconds)
            histories.append(fitted.history)
            if on_fold is not None:
                on_fold(fold, fitted, train, val)
            for i, score, predicted in zip(val, fitted.scores, fitted.predictions, strict=True):
                rows.append((fold.repeat, fold.fold, ids[i], int(labels[i]), float(score), int(predicted)))
            advance()
    oof = pd.DataFrame(rows, columns=["repeat", "fold", "patient_id", "label", "score", "predicted"])
    per_repeat = []
    for repeat, group in oof.groupby("repeat", sort=True):
        metrics = binary_metrics(group["label"], group["predicted"], group["score"])
        per_repeat.append({"repeat": int(repeat), **metrics})
    return CVResult(oof=oof, per_repeat=pd.DataFrame(per_repeat), fit_seconds=fit_seconds,
                    histories=histories)

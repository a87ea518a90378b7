"""Training options and helpers the bag networks share (D-MIL, the end-to-end image models, the
instance CNN): parameter checks, the early-stopping validation split, class weights."""

from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit


def check_training_params(model) -> None:
    """The training options the bag networks share (D-MIL and the image models): batches,
    epochs, the validation split, class weights, threads and the clinical switch."""
    if model.use_clinical not in ("auto", True, False):
        raise ValueError(f"use_clinical must be 'auto', True or False, got {model.use_clinical!r}")
    if int(model.batch_size) < 2:
        raise ValueError(f"batch_size must be at least 2 (real batches), got {model.batch_size}")
    if int(model.max_epochs) < 1:
        raise ValueError(f"max_epochs must be at least 1, got {model.max_epochs}")
    if not 0 <= model.validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {model.validation_fraction}")
    if model.class_weight not in ("balanced", None):
        raise ValueError(f"class_weight must be 'balanced' or None, got {model.class_weight!r}")
    if model.torch_threads is not None and int(model.torch_threads) < 1:
        raise ValueError(f"torch_threads must be None or at least 1, got {model.torch_threads}")


def check_weight_averaging(model) -> None:
    """``swa_epochs`` (average the weights of the last epochs) needs a fixed number of epochs
    (no early stopping) and no batch norm (averaged weights would need fresh batch statistics)."""
    swa_epochs = int(model.swa_epochs)
    if swa_epochs == 0:
        return
    if not 1 <= swa_epochs <= int(model.max_epochs):
        raise ValueError(f"swa_epochs must lie in [0, max_epochs={model.max_epochs}], "
                         f"got {model.swa_epochs}")
    if model.validation_fraction:
        raise ValueError("swa_epochs needs validation_fraction 0: weight averaging trains a fixed "
                         "number of epochs, early stopping would pick one epoch instead")
    if model.norm == "batch":
        raise ValueError("swa_epochs does not go with norm 'batch': the averaged weights' batch "
                         "statistics would need recomputing")


def validation_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified (train rows, validation rows) split of the training bags for early stopping;
    everything trains (no validation rows) when ``fraction`` is 0 or a class is too rare for
    both parts to hold it."""
    rows = np.arange(len(labels))
    n_val = math.ceil(fraction * len(labels))
    counts = np.bincount(labels, minlength=2)
    if fraction == 0 or n_val < 2 or counts.min() < 2 or len(labels) - n_val < 2:
        return rows, rows[:0]
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train_rows, val_rows = next(splitter.split(rows.reshape(-1, 1), labels))
    return np.sort(train_rows), np.sort(val_rows)


def balanced_class_weights(labels: np.ndarray, class_weight: str | None) -> np.ndarray:
    """Per-class loss weights (index = label): ``"balanced"`` from the training prevalence,
    None → ones."""
    if class_weight is None:
        return np.ones(2)
    counts = np.bincount(labels, minlength=2).astype(float)
    return len(labels) / (2.0 * np.maximum(counts, 1.0))

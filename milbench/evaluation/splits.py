"""Patient-level stratified splits (train/validation and repeated K-fold), saved as files.

Patients are stratified on the label together with quantized clinical attributes (gender, age and
lymphocyte count split at thresholds, the training median by default), so that every fold sees a
similar clinical mix. Strata too small for the requested split are merged into coarser ones
(dropping lymphocyte count, then age, then gender) and the merge is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from milbench.io import atomic_write

log = logging.getLogger(__name__)

STRATIFY_ATTRIBUTES = ("gender", "age", "lymph_count")


@dataclass(frozen=True)
class Fold:
    """One train/validation partition of patient IDs."""

    repeat: int
    fold: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]


def stratification_keys(
    patients: pd.DataFrame,
    attributes: tuple[str, ...] = STRATIFY_ATTRIBUTES,
    age_threshold: float | None = None,
    count_threshold: float | None = None,
    min_size: int = 2,
) -> np.ndarray:
    """One stratum key per patient row: label plus the quantized ``attributes``.

    ``patients`` needs columns ``label``, ``gender``, ``age``, ``lymph_count`` (``Cohort.frame()``).
    Thresholds default to the medians of these patients. Keys of strata with fewer than
    ``min_size`` patients fall back to coarser keys, ending at the label alone.
    """
    unknown = set(attributes) - set(STRATIFY_ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown stratification attributes {sorted(unknown)}; use {STRATIFY_ATTRIBUTES}")
    if patients["label"].isna().any():
        raise ValueError("cannot stratify patients without labels (test patients?)")
    age_cut = float(patients["age"].median()) if age_threshold is None else age_threshold
    count_cut = float(patients["lymph_count"].median()) if count_threshold is None else count_threshold
    parts = {
        "gender": patients["gender"].astype(str).to_numpy(),
        "age": np.where(patients["age"].to_numpy() >= age_cut, "old", "young"),
        "lymph_count": np.where(patients["lymph_count"].to_numpy() >= count_cut, "high", "low"),
    }
    labels = patients["label"].astype(int).astype(str).to_numpy()
    # From finest to coarsest: drop attributes from the end of the list one at a time.
    levels = [attributes[:k] for k in range(len(attributes), -1, -1)]
    candidates = []
    for level in levels:
        keys = labels.copy()
        for name in level:
            keys = np.char.add(np.char.add(keys, "|"), parts[name])
        candidates.append(keys)
    final = candidates[0].copy()
    for coarser in candidates[1:]:
        values, counts = np.unique(final, return_counts=True)
        small = np.isin(final, values[counts < min_size])
        if not small.any():
            break
        final[small] = coarser[small]
    # A label-only stratum still too small joins the largest stratum of the same label.
    values, counts = np.unique(final, return_counts=True)
    for value in values[counts < min_size]:
        members = final == value
        label = value.split("|")[0]
        peers = [(c, v) for v, c in zip(values, counts, strict=True)
                 if v != value and v.split("|")[0] == label and c >= min_size]
        if peers:
            final[members] = max(peers)[1]
    merged = int((final != candidates[0]).sum())
    if merged:
        log.info("stratification: %d patients moved to coarser strata (min size %d)", merged, min_size)
    return final


def kfold_splits(
    ids: list[str], keys: np.ndarray, n_splits: int = 5, n_repeats: int = 1, seed: int = 0,
    first_repeat: int = 0,
) -> list[Fold]:
    """Repeated stratified K-fold, repeats ``first_repeat`` onwards; repeat ``r`` shuffles with
    ``seed + r``, so repeat ``r`` is the same partition whichever repeats are asked for."""
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    if len(ids) != len(keys):
        raise ValueError(f"{len(ids)} ids but {len(keys)} stratification keys")
    ids_array = np.asarray(ids)
    folds = []
    for repeat in range(first_repeat, first_repeat + n_repeats):
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed + repeat)
        for fold, (train, val) in enumerate(splitter.split(ids_array, keys)):
            folds.append(Fold(repeat, fold, tuple(ids_array[train]), tuple(ids_array[val])))
    return folds


def train_val_split(
    ids: list[str], keys: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> Fold:
    """A single stratified train/validation split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids_array = np.asarray(ids)
    keys = np.asarray(keys)
    n_val = int(np.ceil(val_fraction * len(ids)))
    if len(np.unique(keys)) > min(n_val, len(ids) - n_val):
        # More strata than validation patients: a stratified split is impossible, keep the label.
        log.info("train/val split: %d strata for %d validation patients; stratifying on the label",
                 len(np.unique(keys)), n_val)
        keys = np.array([key.split("|")[0] for key in keys])
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train, val = next(splitter.split(ids_array, keys))
    return Fold(0, 0, tuple(ids_array[train]), tuple(ids_array[val]))


def save_folds(folds: list[Fold], path: str | Path) -> Path:
    """One row per (repeat, fold, patient) with its role, atomically written as CSV."""
    rows = [
        (f.repeat, f.fold, pid, role)
        for f in folds
        for role, members in (("train", f.train_ids), ("val", f.val_ids))
        for pid in members
    ]
    table = pd.DataFrame(rows, columns=["repeat", "fold", "patient_id", "role"])
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def load_folds(path: str | Path) -> list[Fold]:
    table = pd.read_csv(path, dtype={"patient_id": str})
    expected = {"repeat", "fold", "patient_id", "role"}
    if set(table.columns) != expected:
        raise ValueError(f"{path}: columns must be {sorted(expected)}, got {list(table.columns)}")
    bad_roles = set(table["role"]) - {"train", "val"}
    if bad_roles:
        raise ValueError(f"{path}: role must be train or val, got {sorted(bad_roles)}")
    folds = []
    for (repeat, fold), group in table.groupby(["repeat", "fold"], sort=True):
        train = tuple(group.loc[group["role"] == "train", "patient_id"])
        val = tuple(group.loc[group["role"] == "val", "patient_id"])
        if set(train) & set(val):
            raise ValueError(f"{path}: repeat {repeat} fold {fold} has patients in train and val")
        folds.append(Fold(int(repeat), int(fold), train, val))
    return folds

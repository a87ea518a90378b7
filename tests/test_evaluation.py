"""Stratified patient splits, metric values on known cases, and cross-validation bookkeeping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milbench.core.metrics import aggregate, binary_metrics, format_mean_std_max
from milbench.evaluation.cv import cross_validate
from milbench.evaluation.splits import (
    kfold_splits,
    load_folds,
    save_folds,
    stratification_keys,
    train_val_split,
)
from milbench.models import create_model


def patients(n=60, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.7).astype(int)
    return pd.DataFrame({
        "patient_id": [f"P{i}" for i in range(n)],
        "label": label,
        "gender": rng.choice(["M", "F"], n),
        "age": rng.normal(65, 12, n) + 8 * label,
        "lymph_count": rng.lognormal(1.5, 0.8, n) * (1 + 3 * label),
    })


def test_kfold_partitions_patients_and_balances_strata():
    frame = patients()
    keys = stratification_keys(frame, min_size=5)
    folds = kfold_splits(list(frame["patient_id"]), keys, n_splits=5, n_repeats=3, seed=1)
    assert len(folds) == 15
    for repeat in range(3):
        in_repeat = [f for f in folds if f.repeat == repeat]
        validated = [pid for f in in_repeat for pid in f.val_ids]
        assert sorted(validated) == sorted(frame["patient_id"])  # each patient validated once
        for fold in in_repeat:
            assert not set(fold.train_ids) & set(fold.val_ids)
            assert len(fold.train_ids) + len(fold.val_ids) == len(frame)
            val_labels = frame.set_index("patient_id").loc[list(fold.val_ids), "label"]
            assert abs(val_labels.mean() - frame["label"].mean()) < 0.15
    # repeats differ, same seed reproduces
    assert folds[0].val_ids != folds[5].val_ids
    again = kfold_splits(list(frame["patient_id"]), keys, n_splits=5, n_repeats=3, seed=1)
    assert again == folds


def test_stratification_keys_use_thresholds_and_merge_small_strata():
    frame = pd.DataFrame({
        "label": [1, 1, 1, 1, 0, 0, 0, 0],
        "gender": ["M", "M", "F", "F", "M", "M", "M", "F"],
        "age": [80, 81, 60, 61, 50, 51, 52, 53],
        "lymph_count": [10, 11, 12, 13, 3, 3, 3, 3],
    })
    keys = stratification_keys(frame, ("gender", "age"), age_threshold=77, min_size=2)
    assert list(keys[:4]) == ["1|M|old", "1|M|old", "1|F|young", "1|F|young"]
    assert list(keys[4:7]) == ["0|M|young"] * 3
    assert keys[7] == "0|M|young"  # alone even by label: joins the largest stratum of its label
    with pytest.raises(ValueError, match="unknown stratification attributes"):
        stratification_keys(frame, ("height",))


def test_train_val_split_disjoint_and_stratified():
    frame = patients(100)
    keys = stratification_keys(frame, ("gender",), min_size=2)
    split = train_val_split(list(frame["patient_id"]), keys, val_fraction=0.2, seed=3)
    assert len(split.val_ids) == 20 and not set(split.val_ids) & set(split.train_ids)


def test_folds_round_trip_through_file(tmp_path):
    frame = patients(30)
    folds = kfold_splits(list(frame["patient_id"]), frame["label"].astype(str).to_numpy(), 3, 2, 0)
    path = save_folds(folds, tmp_path / "splits" / "folds.csv")
    assert load_folds(path) == folds
    table = pd.read_csv(path)
    table.loc[0, "role"] = "val"
    duplicated = pd.concat([table, table.iloc[[0]].assign(role="train")])
    duplicated.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="in train and val"):
        load_folds(tmp_path / "bad.csv")


def test_binary_metrics_known_values():
    y_true = [1, 1, 1, 1, 0, 0]
    y_pred = [1, 1, 1, 0, 0, 1]
    scores = [0.9, 0.8, 0.7, 0.4, 0.1, 0.6]
    m = binary_metrics(y_true, y_pred, scores)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["roc_auc"] == pytest.approx(7 / 8)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 1, 3)
    assert np.isnan(binary_metrics([1, 1], [1, 0], [0.2, 0.3])["roc_auc"])


def test_aggregate_mean_std_max():
    per_repeat = pd.DataFrame({m: [0.6, 0.8, 0.7] for m in
                               ("balanced_accuracy", "f1", "precision", "recall", "roc_auc")})
    summary = aggregate(per_repeat)
    assert summary.loc["balanced_accuracy", "mean"] == pytest.approx(0.7)
    assert summary.loc["balanced_accuracy", "std"] == pytest.approx(0.1)
    assert summary.loc["balanced_accuracy", "max"] == pytest.approx(0.8)
    assert format_mean_std_max(summary, "f1") == "0.700 ± 0.100 (0.800)"


class RecordingModel(create_model("clinical_logreg").__class__):
    """Records which labels each fit saw, to prove validation labels never reach training."""

    seen: list = []

    def fit(self, bags, y, clinical=None):
        RecordingModel.seen.append(set(clinical.index))
        return super().fit(bags, y, clinical)


def test_cross_validation_out_of_fold_and_no_leakage():
    frame = patients(40)
    ids = list(frame["patient_id"])
    clinical = frame.set_index("patient_id")[["age", "lymph_count"]].assign(
        male=(frame["gender"] == "M").astype(float).to_numpy())
    folds = kfold_splits(ids, frame["label"].astype(str).to_numpy(), 4, 2, 0)
    bags = [np.zeros((2, 0))] * len(ids)
    RecordingModel.seen = []
    result = cross_validate(RecordingModel(), bags, frame["label"].to_numpy(), ids, folds, clinical,
                            progress=False)
    for fold, seen in zip(folds, RecordingModel.seen, strict=True):
        assert seen == set(fold.train_ids)
    assert len(result.oof) == 2 * len(ids)
    assert result.oof.groupby("repeat")["patient_id"].apply(lambda s: sorted(s) == sorted(ids)).all()
    assert result.per_repeat["balanced_accuracy"].between(0.5, 1).all()
    again = cross_validate(RecordingModel(), bags, frame["label"].to_numpy(), ids, folds, clinical,
                           progress=False)
    pd.testing.assert_frame_equal(result.oof, again.oof)


def test_train_val_split_with_more_strata_than_validation_patients():
    frame = patients(40, seed=2)
    keys = stratification_keys(frame, min_size=2)
    assert len(np.unique(keys)) > 8
    split = train_val_split(list(frame["patient_id"]), keys, val_fraction=0.2, seed=0)
    assert len(split.val_ids) == 8 and not set(split.val_ids) & set(split.train_ids)
    val_labels = frame.set_index("patient_id").loc[list(split.val_ids), "label"]
    assert abs(val_labels.mean() - frame["label"].mean()) <= 0.15  # still label-stratified

"""Paired comparisons and bootstrap intervals against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milbench.evaluation.compare import (
    bootstrap_interval,
    corrected_resampled_ttest,
    fold_metric,
    paired_comparison,
)


def test_corrected_ttest_matches_hand_computation() -> None:
    # d = [0.1, 0.2, 0.0, 0.1]: mean 0.1, s² = 0.02 / 3; with n_test/n_train = 1/4 the corrected
    # standard error is sqrt((1/4 + 1/4) * 0.02 / 3) = 0.0577350, so t = sqrt(3) on 3 df.
    result = corrected_resampled_ttest([0.1, 0.2, 0.0, 0.1], test_train_ratio=0.25)
    assert result["mean_difference"] == pytest.approx(0.1)
    assert result["t"] == pytest.approx(np.sqrt(3))
    assert result["p_value"] == pytest.approx(0.181690, abs=1e-5)  # t table, 3 df
    half_width = 3.182446 * 0.0577350  # t(0.975, 3) × standard error
    assert result["ci_low"] == pytest.approx(0.1 - half_width, abs=1e-5)
    assert result["ci_high"] == pytest.approx(0.1 + half_width, abs=1e-5)
    assert result["n"] == 4


def test_correction_widens_the_interval() -> None:
    d = np.random.default_rng(0).normal(0.02, 0.05, 25)
    naive = corrected_resampled_ttest(d, test_train_ratio=0.0)
    corrected = corrected_resampled_ttest(d, test_train_ratio=0.25)
    assert corrected["ci_high"] - corrected["ci_low"] > 2 * (naive["ci_high"] - naive["ci_low"])
    assert corrected["p_value"] > naive["p_value"]


def test_ttest_errors_and_constant_differences() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        corrected_resampled_ttest([0.1], 0.25)
    constant = corrected_resampled_ttest([0.0, 0.0, 0.0], 0.25)
    assert constant["p_value"] == 1.0 and constant["ci_low"] == constant["ci_high"] == 0.0


def _oof(predictions: dict[str, int], labels: dict[str, int], folds: list[list[str]],
         repeats: int = 2) -> pd.DataFrame:
    rows = [(r, f, pid, labels[pid], float(predictions[pid]), predictions[pid])
            for r in range(repeats) for f, fold in enumerate(folds) for pid in fold]
    return pd.DataFrame(rows, columns=["repeat", "fold", "patient_id", "label", "score", "predicted"])


LABELS = {f"P{i}": i % 2 for i in range(8)}
FOLDS = [["P0", "P1", "P2", "P3"], ["P4", "P5", "P6", "P7"]]


def test_fold_metric_and_paired_comparison() -> None:
    perfect = _oof(LABELS, LABELS, FOLDS)
    # Wrong on P1 only: fold 0 has balanced accuracy 0.75, fold 1 stays 1.
    one_wrong = _oof({**LABELS, "P1": 0}, LABELS, FOLDS)
    assert fold_metric(one_wrong).tolist() == [0.75, 1.0, 0.75, 1.0]
    result = paired_comparison(perfect, one_wrong)
    assert result["mean_difference"] == pytest.approx(0.125)
    assert result["balanced_accuracy_a"] == 1.0 and result["balanced_accuracy_b"] == 0.875
    # Folds of 4 out of 8 patients: n_test / n_train = 1; s² = 1/48, se = sqrt((1/4 + 1) / 48).
    assert result["t"] == pytest.approx(0.125 / np.sqrt(1.25 / 48))
    same = paired_comparison(perfect, perfect)
    assert same["mean_difference"] == 0 and same["p_value"] == 1.0


def test_paired_comparison_refuses_different_folds() -> None:
    a = _oof(LABELS, LABELS, FOLDS)
    b = _oof(LABELS, LABELS, [["P0", "P1", "P2", "P4"], ["P3", "P5", "P6", "P7"]])
    with pytest.raises(ValueError, match="different patients"):
        paired_comparison(a, b)
    with pytest.raises(ValueError, match="same repeats and folds"):
        paired_comparison(a, _oof(LABELS, LABELS, FOLDS, repeats=3))


def test_bootstrap_interval_hand_cases() -> None:
    perfect = bootstrap_interval([0, 1, 0, 1], [0, 1, 0, 1], n_boot=200)
    assert perfect["value"] == 1.0 and perfect["ci_low"] == perfect["ci_high"] == 1.0
    # Always predicting reactive: every resample with both classes scores exactly 0.5. With two
    # patients, half the resamples hold one class and are left out.
    constant = bootstrap_interval([0, 1], [0, 0], n_boot=2000, seed=1)
    assert constant["value"] == 0.5 and constant["ci_low"] == constant["ci_high"] == 0.5
    assert 900 < constant["n_boot"] < 1100


def test_bootstrap_interval_contains_value_and_narrows_with_patients() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 40)
    predicted = np.where(rng.uniform(size=40) < 0.8, truth, 1 - truth)
    small = bootstrap_interval(truth, predicted, seed=0)
    large = bootstrap_interval(np.tile(truth, 16), np.tile(predicted, 16), seed=0)
    assert small["ci_low"] <= small["value"] <= small["ci_high"]
    assert large["value"] == pytest.approx(small["value"])
    assert (large["ci_high"] - large["ci_low"]) < 0.5 * (small["ci_high"] - small["ci_low"])
    assert bootstrap_interval(truth, predicted, seed=0) == small  # seeded
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_interval([1, 1], [1, 0])

"""Honest comparisons: paired differences over the same folds, and bootstrap intervals.

- ``corrected_resampled_ttest``: Nadeau & Bengio (2003). Folds of repeated K-fold CV share
  training patients, so their differences are correlated and the plain t-test is far too sure
  of itself; the corrected variance is ``(1/n + n_test/n_train) * s²`` over the n differences.
- ``paired_comparison``: two models' out-of-fold tables (same folds and repeats) → the per-fold
  metric difference, its mean, 95 % interval and p-value under that test.
- ``bootstrap_interval``: a single test set's metric with a percentile interval over patients
  resampled with replacement (with 42 test patients one patient moves balanced accuracy by
  several points).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from milbench.core.metrics import binary_metrics


def corrected_resampled_ttest(differences, test_train_ratio: float,
                              level: float = 0.95) -> dict[str, float]:
    """Mean of ``differences`` (one per fold and repeat), its ``level`` interval and two-sided p
    under the corrected resampled t-test; ``test_train_ratio`` is n_test / n_train of a fold."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    n = d.size
    if n < 2:
        raise ValueError(f"a paired comparison needs at least 2 finite differences, got {n}")
    if test_train_ratio < 0:
        raise ValueError(f"test_train_ratio must be >= 0, got {test_train_ratio}")
    mean = float(d.mean())
    variance = float(d.var(ddof=1))
    scale = np.sqrt((1.0 / n + test_train_ratio) * variance)
    quantile = float(stats.t.ppf(0.5 + level / 2, df=n - 1))
    if scale == 0:
        # Identical differences everywhere: no spread to test against.
        p = 1.0 if mean == 0 else 0.0
        return {"mean_difference": mean, "ci_low": mean, "ci_high": mean, "t": np.nan,
                "p_value": p, "n": n}
    t = mean / scale
    return {"mean_difference": mean, "ci_low": mean - quantile * scale,
            "ci_high": mean + quantile * scale, "t": float(t),
            "p_value": float(2 * stats.t.sf(abs(t), df=n - 1)), "n": n}


def fold_metric(oof: pd.DataFrame, metric: str = "balanced_accuracy") -> pd.Series:
    """``metric`` on each (repeat, fold) of an out-of-fold table."""
    values = {
        key: binary_metrics(group["label"], group["predicted"], group["score"])[metric]
        for key, group in oof.groupby(["repeat", "fold"], sort=True)
    }
    return pd.Series(values, name=metric).rename_axis(["repeat", "fold"])


def test_train_ratio(oof: pd.DataFrame, n_patients: int) -> float:
    """n_test / n_train of the folds of ``oof`` (validation patients per fold, on average)."""
    per_fold = oof.groupby(["repeat", "fold"]).size().mean()
    return float(per_fold / (n_patients - per_fold))


def paired_comparison(oof_a: pd.DataFrame, oof_b: pd.DataFrame,
                      metric: str = "balanced_accuracy", level: float = 0.95) -> dict[str, float]:
    """``metric`` of model a minus model b over the folds they share (same repeats and folds,
    same patients), under the corrected resampled t-test."""
    for name, oof in (("a", oof_a), ("b", oof_b)):
        if oof.empty:
            raise ValueError(f"out-of-fold table of model {name} is empty")
    a, b = fold_metric(oof_a, metric), fold_metric(oof_b, metric)
    if not a.index.equals(b.index):
        raise ValueError("the two models were not evaluated on the same repeats and folds")
    keys = ["repeat", "fold", "patient_id"]
    if not oof_a[keys].sort_values(keys).reset_index(drop=True).equals(
            oof_b[keys].sort_values(keys).reset_index(drop=True)):
        raise ValueError("the two models' folds hold different patients")
    n_patients = oof_a["patient_id"].nunique()
    result = corrected_resampled_ttest(a - b, test_train_ratio(oof_a, n_patients), level)
    return {f"{metric}_a": float(a.mean()), f"{metric}_b": float(b.mean()), **result}


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # The mean of the two recalls, without sklearn's per-call checks (thousands of resamples).
    return 0.5 * float(np.mean(y_pred[y_true == 1] == 1) + np.mean(y_pred[y_true == 0] == 0))


def bootstrap_interval(y_true, y_pred, y_score=None, metric: str = "balanced_accuracy",
                       n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """``metric`` on the whole set and its percentile ``level`` interval over ``n_boot``
    resamples of the patients (resamples holding one class only are left out: they have no
    balanced accuracy; ``n_boot`` in the result counts those kept)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    y_score = None if y_score is None else np.asarray(y_score, dtype=float)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty")

    def value(rows: np.ndarray) -> float:
        if metric == "balanced_accuracy":
            return _balanced_accuracy(y_true[rows], y_pred[rows])
        scores = None if y_score is None else y_score[rows]
        return float(binary_metrics(y_true[rows], y_pred[rows], scores)[metric])

    rng = np.random.default_rng(seed)
    n = y_true.size
    draws = []
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        if np.unique(y_true[rows]).size == 2:
            draws.append(value(rows))
    if np.unique(y_true).size < 2 or not draws:
        raise ValueError("a bootstrap interval needs both classes among the patients")
    low, high = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return {"value": value(np.arange(n)), "ci_low": float(low), "ci_high": float(high),
            "n_boot": len(draws)}

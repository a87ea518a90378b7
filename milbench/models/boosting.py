"""The one gradient-boosted-trees factory (XGBoost or LightGBM) behind every model that boosts:
the clinical XGBoost baseline, the stacker's meta-classifier and the semi-supervised model's
count classifier. Same settings everywhere: one thread and fixed seeds (results identical across
machines), the positive class weighted by the training prevalence when asked."""

from __future__ import annotations

import numpy as np

BOOSTERS = ("xgboost", "lightgbm")


def positive_weight(labels: np.ndarray) -> float:
    """``scale_pos_weight`` that balances the classes: negatives / positives."""
    positives = max(int(np.sum(labels)), 1)
    return (len(labels) - positives) / positives


def boosted_trees(kind: str, *, n_estimators: int, learning_rate: float, max_depth: int,
                  scale_pos_weight: float = 1.0, random_state: int | None = None):
    """An unfitted XGBoost or LightGBM binary classifier."""
    seed = 0 if random_state is None else int(random_state) % 2**31
    if kind == "xgboost":
        from xgboost import XGBClassifier

        return XGBClassifier(n_estimators=n_estimators, learning_rate=learning_rate,
                             max_depth=max_depth, scale_pos_weight=scale_pos_weight,
                             random_state=seed, n_jobs=1, tree_method="hist", eval_metric="logloss")
    if kind == "lightgbm":
        from lightgbm import LGBMClassifier

        return LGBMClassifier(n_estimators=n_estimators, learning_rate=learning_rate,
                              max_depth=max_depth, num_leaves=2**max_depth,
                              scale_pos_weight=scale_pos_weight, min_child_samples=3,
                              random_state=seed, n_jobs=1, deterministic=True,
                              force_row_wise=True, verbose=-1)
    raise ValueError(f"booster must be one of {BOOSTERS}, got {kind!r}")

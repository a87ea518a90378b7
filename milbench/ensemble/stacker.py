"""XGBoost clinical stacker: a meta-classifier over bag-model outputs plus clinical attributes.

The meta-classifier is trained only on out-of-fold outputs of the members: inside ``fit``, each
member is cross-validated on the training bags (inner folds) and the meta-classifier learns from
the predictions each member made for bags it did not train on. Members are then refitted on all
training bags for prediction. Evaluated through the outer cross-validation of ``milbench run``,
this is nested CV: no member's training labels reach the stacker's evaluation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from lightgbm import LGBMClassifier
from sklearn.utils.validation import check_is_fitted
from xgboost import XGBClassifier

from milbench.ensemble.members import check_members, fit_member, member_label, member_outputs
from milbench.models.base import (
    BagClassifier,
    check_binary_labels,
    check_clinical,
    inner_folds,
    take_bags,
    take_clinical,
)
from milbench.models.clinical import clinical_design_matrix
from milbench.models.registry import register_model

CLINICAL_FEATURES = ("age", "log_lymph_count", "male")


@register_model("stacker", tags=("ensemble", "clinical"))
class ClinicalStacker(BagClassifier):
    """Gradient-boosted meta-classifier over member outputs (probability and bag features) and,
    with ``use_clinical``, age, log lymphocyte count and gender. ``meta``: xgboost or lightgbm;
    defaults follow the seed (learning rate 0.1, 100 trees, ``scale_pos_weight`` from prevalence).
    """

    def __init__(
        self,
        members=("clinical_logreg",),
        meta: str = "xgboost",
        use_clinical: bool = True,
        inner_splits: int = 5,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        max_depth: int = 3,
        random_state=None,
    ):
        self.members = members
        self.meta = meta
        self.use_clinical = use_clinical
        self.inner_splits = inner_splits
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.random_state = random_state

    def _meta_estimator(self, y: np.ndarray):
        positives = max(int(y.sum()), 1)
        balance = (len(y) - positives) / positives
        seed = 0 if self.random_state is None else int(self.random_state) % 2**31
        if self.meta == "xgboost":
            return XGBClassifier(
                n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                max_depth=self.max_depth, scale_pos_weight=balance, random_state=seed, n_jobs=1,
                tree_method="hist", eval_metric="logloss",
            )
        if self.meta == "lightgbm":
            return LGBMClassifier(
                n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                max_depth=self.max_depth, num_leaves=2**self.max_depth, scale_pos_weight=balance,
                min_child_samples=3, random_state=seed, n_jobs=1, deterministic=True, verbose=-1,
            )
        raise ValueError(f"meta must be 'xgboost' or 'lightgbm', got {self.meta!r}")

    def _design(self, outputs: list[pd.DataFrame], clinical, n_bags: int) -> pd.DataFrame:
        design = pd.concat([o.reset_index(drop=True) for o in outputs], axis=1)
        if self.use_clinical:
            matrix = clinical_design_matrix(check_clinical(clinical, n_bags))
            for index, name in enumerate(CLINICAL_FEATURES):
                design[f"clinical:{name}"] = matrix[:, index]
        return design

    def fit(self, bags, y, clinical=None):
        labels = check_binary_labels(y)
        members = check_members(self.members)
        if len(bags) != len(labels):
            raise ValueError(f"{len(bags)} bags but {len(labels)} labels")
        seed = None if self.random_state is None else int(self.random_state)
        folds = inner_folds(labels, self.inner_splits, seed or 0, "the stacker")
        out_of_fold: list[list[pd.DataFrame | None]] = [[None] * len(folds) for _ in members]
        validation_positions = []
        for fold, (train, val) in enumerate(folds):
            validation_positions.append(val)
            for m, member in enumerate(members):
                model = fit_member(member, seed, take_bags(bags, train), labels[train],
                                   take_clinical(clinical, train))
                out_of_fold[m][fold] = member_outputs(
                    member_label(member), model, take_bags(bags, val), take_clinical(clinical, val))
        order = np.argsort(np.concatenate(validation_positions))
        outputs = [pd.concat(parts, ignore_index=True).iloc[order] for parts in out_of_fold]
        design = self._design(outputs, clinical, len(labels))
        self.feature_names_ = list(design.columns)
        self.oof_design_ = design  # kept for inspection and the leakage test
        self.meta_ = self._meta_estimator(labels).fit(design.to_numpy(), labels)
        self.members_ = [fit_member(m, seed, bags, labels, clinical) for m in members]
        self.classes_ = np.array([0, 1])
        return self

    def meta_features(self, bags, clinical=None) -> pd.DataFrame:
        """The meta-classifier's inputs for new bags (members refitted on all training bags)."""
        check_is_fitted(self)
        outputs = [
            member_outputs(member_label(m), model, bags, clinical)
            for m, model in zip(check_members(self.members), self.members_, strict=True)
        ]
        return self._design(outputs, clinical, len(bags))

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        return self.meta_.predict_proba(self.meta_features(bags, clinical).to_numpy())

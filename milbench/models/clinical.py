"""Clinical-only baseline: classifies a patient from age, lymphocyte count and gender alone.

It ignores the instances of each bag; every bag model is compared against it.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from milbench.core.clinical import clinical_design_matrix
from milbench.models.base import BagClassifier, check_clinical, store_params
from milbench.models.boosting import boosted_trees, positive_weight
from milbench.models.registry import Tag


class _ClinicalClassifier(BagClassifier):
    def _make_estimator(self, y: np.ndarray):
        raise NotImplementedError

    def _check_fit_bags(self, bags):
        return bags  # only their number matters: the instances are never read

    def _fit(self, bags, labels, clinical) -> None:
        features = clinical_design_matrix(check_clinical(clinical, len(labels)))
        self.estimator_ = self._make_estimator(labels).fit(features, labels)

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        features = clinical_design_matrix(check_clinical(clinical, len(bags)))
        return self.estimator_.predict_proba(features)


class ClinicalLogistic(_ClinicalClassifier):
    """Standardised logistic regression with balanced class weights."""

    mil_tags = frozenset({Tag.CLINICAL})

    def __init__(self, C: float = 1.0, class_weight: str | None = "balanced", random_state=None):
        self.C = C
        self.class_weight = class_weight
        self.random_state = random_state

    def _make_estimator(self, y):
        return make_pipeline(
            StandardScaler(),
            LogisticRegression(C=self.C, class_weight=self.class_weight, random_state=self.random_state),
        )


class ClinicalXGBoost(_ClinicalClassifier):
    """Gradient-boosted trees; ``scale_pos_weight`` balances the classes from training prevalence."""

    mil_tags = frozenset({Tag.CLINICAL})

    def __init__(
        self,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        max_depth: int = 3,
        balance_classes: bool = True,
        random_state=None,
    ):
        store_params(self, locals())

    def _make_estimator(self, y):
        return boosted_trees(
            "xgboost", n_estimators=self.n_estimators, learning_rate=self.learning_rate,
            max_depth=self.max_depth,
            scale_pos_weight=positive_weight(y) if self.balance_classes else 1.0,
            random_state=self.random_state)

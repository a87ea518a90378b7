"""Bag models made of an instance stage and a logistic layer (the one-class SVM, single-instance
learning): the stage scores every instance and summarises each bag in a few bag features; a
logistic regression (standardised, balanced classes) learns the bag label from them, with the
clinical attributes beside them when ``use_clinical`` allows.

The logistic layer's training rows are out-of-fold (``oof_folds``): the stage that computes a
training bag's features never saw that bag, otherwise training bags would look more typical
of their class than unseen patients do. The final stage, fitted on every training bag, gives
the features and instance scores at prediction. A subclass fits its stage (``_fit_stage``,
returning an object with ``features(bags)`` and ``instance_scores(bags)``) and names its bag
features (``BAG_FEATURES``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from milbench.core.clinical import clinical_design_matrix
from milbench.models.base import BagClassifier, check_clinical, inner_folds, out_of_fold, take_bags
from preprocessing.transforms import BagTransform


def scores_per_bag(transform: BagTransform, score, bags: list[np.ndarray]) -> list[np.ndarray]:
    """``score`` (a decision function) on every instance of ``bags`` after ``transform``, in one
    call, split back into one array per bag."""
    transformed = transform.transform(bags)
    sizes = np.cumsum([len(bag) for bag in transformed])[:-1]
    return np.split(score(np.vstack(transformed)), sizes)


class InstanceStageMIL(BagClassifier):
    """An instance stage, bag features and a logistic layer (see the module docstring). The
    subclass's constructor takes ``pca_components``, ``quantile``, ``max_instances``,
    ``oof_folds``, ``use_clinical``, ``C`` (the logistic layer's) and ``random_state``."""

    BAG_FEATURES: ClassVar[tuple[str, ...]] = ()
    NAME: ClassVar[str] = ""  # the registry name, for error messages

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _validate_params(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must lie in (0, 1), got {self.quantile}")
        if int(self.max_instances) < 2:
            raise ValueError(f"max_instances must be at least 2, got {self.max_instances}")
        if self.pca_components is not None and int(self.pca_components) < 1:
            raise ValueError(f"pca_components must be None or >= 1, got {self.pca_components}")
        if int(self.oof_folds) < 2:
            raise ValueError(f"oof_folds must be at least 2, got {self.oof_folds}")
        if self.use_clinical not in ("auto", True, False):
            raise ValueError(f"use_clinical must be 'auto', True or False, got {self.use_clinical!r}")

    def _fit_stage(self, bags: list[np.ndarray], labels: np.ndarray, seed: int) -> Any:
        raise NotImplementedError

    def _at_most_max_instances(self, n_rows: int, seed: int) -> np.ndarray | None:
        """Sorted rows of a seeded draw of ``max_instances`` of ``n_rows`` (None: keep all)."""
        if n_rows <= int(self.max_instances):
            return None
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n_rows, int(self.max_instances), replace=False))

    def _fit_transform(self, bags: list[np.ndarray]) -> BagTransform:
        """Scaler (and PCA with ``pca_components``) on the stage's training instances."""
        components = None if self.pca_components is None else int(self.pca_components)
        return BagTransform(n_components=components, random_state=0).fit(bags)

    def _design(self, features: pd.DataFrame, clinical, n_bags: int) -> np.ndarray:
        design = features.loc[:, list(self.BAG_FEATURES)].to_numpy(dtype=float)
        if self.uses_clinical_:
            design = np.hstack([design, clinical_design_matrix(check_clinical(clinical, n_bags))])
        return design

    def _fit(self, bags, labels, clinical) -> None:
        if self.use_clinical is True and clinical is None:
            raise ValueError("use_clinical=True but fit got no clinical table")
        self.uses_clinical_ = self.use_clinical is not False and clinical is not None
        seed = self._seed()
        folds = inner_folds(labels, self.oof_folds, seed, self.NAME)

        def held_out_features(fold, train, held_out):
            stage = self._fit_stage(take_bags(bags, train), labels[train], seed + 1 + fold)
            return stage.features([bags[i] for i in held_out])

        features = out_of_fold(folds, held_out_features)
        self.stage_ = self._fit_stage(bags, labels, seed)
        self.estimator_ = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=self.C, class_weight="balanced", random_state=seed),
        ).fit(self._design(features, clinical, len(bags)), labels)

    def bag_features(self, bags) -> pd.DataFrame:
        """Per bag, the final stage's ``BAG_FEATURES``."""
        bags = self._check_predict_bags(bags)
        return self.stage_.features(bags)

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        features = self.bag_features(bags)
        return self.estimator_.predict_proba(self._design(features, clinical, len(features)))

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """The final stage's instance scores (higher: more like a tumoral bag's witness)."""
        bags = self._check_predict_bags(bags)
        return self.stage_.instance_scores(bags)

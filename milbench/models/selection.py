"""Parameter selection by an inner cross-validation on the training bags only.

``inner_cv`` wraps a registered bag model: for every candidate of ``grid`` it runs a stratified
``inner_splits``-fold CV inside the bags given to ``fit``, keeps the candidate with the best mean
``metric`` (ties: the first in grid order), and refits it on all those bags. Placed inside an
outer cross-validation this is nested CV: the outer test folds never take part in the choice, so
the outer figure is an honest estimate of "this model, tuned on the data at hand", unlike a
setting picked by looking at the outer folds.

``grid`` is a mapping of parameter name to a list of values (every combination is a candidate)
or a list of such mappings, as scikit-learn's ``ParameterGrid`` reads it; ``params`` are fixed
parameters applied to every candidate. ``cv_results_`` keeps each candidate's inner scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import ParameterGrid
from sklearn.utils.validation import check_is_fitted

from milbench.core.metrics import METRICS, binary_metrics
from milbench.models.base import (
    BagClassifier,
    check_bags,
    fit_fold,
    has_capability,
    inner_folds,
    store_params,
    with_seed,
)
from milbench.models.registry import Tag
from milbench.models.spec import ModelSpec


class InnerCVSelection(BagClassifier):
    """The wrapped model with the parameters an inner CV on the training bags chose."""

    def __init__(
        self,
        model: str = "meanpool_svm",
        params: dict | None = None,
        grid: dict | list | None = None,
        inner_splits: int = 3,
        metric: str = "balanced_accuracy",
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _candidates(self) -> list[dict]:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if int(self.inner_splits) < 2:
            raise ValueError(f"inner_splits must be at least 2, got {self.inner_splits}")
        candidates = list(ParameterGrid(self.grid or {}))
        for candidate in candidates:  # unknown names or bad values fail before any training
            self._build(candidate)
        return candidates

    def _build(self, candidate: dict):
        try:
            spec = ModelSpec(name=self.model, params={**(self.params or {}), **candidate})
        except ValueError as error:
            raise ValueError(f"inner_cv: parameters {candidate} do not fit model {self.model!r}: "
                             f"{error}") from error
        return with_seed(spec.build(), self.random_state)

    def _inner_score(self, candidate: dict, bags, labels, clinical, folds) -> list[float]:
        scores = []
        for train, val in folds:
            fitted = fit_fold(self._build(candidate), bags, labels, train, val, clinical)
            metrics = binary_metrics(labels[val], fitted.predictions, fitted.scores)
            scores.append(metrics[self.metric])
        return scores

    def _check_fit_bags(self, bags):
        return check_bags(bags, allow_empty_features=True)  # the wrapped model checks its own

    def _fit(self, bags, labels, clinical) -> None:
        candidates = self._candidates()
        rows = []
        if len(candidates) > 1:
            folds = inner_folds(labels, self.inner_splits, self.random_state, "inner_cv")
            for candidate in candidates:
                scores = self._inner_score(candidate, bags, labels, clinical, folds)
                rows.append({"params": candidate, "mean": float(np.nanmean(scores)),
                             "std": float(np.nanstd(scores)), "scores": scores})
            best = int(np.nanargmax([row["mean"] for row in rows]))  # first of equal means
        else:
            best = 0
        self.cv_results_ = pd.DataFrame(rows, columns=["params", "mean", "std", "scores"])
        self.best_params_ = candidates[best]
        self.best_estimator_ = self._build(self.best_params_).fit(bags, labels, clinical)
        if hasattr(self.best_estimator_, "n_features_in_"):
            self.n_features_in_ = self.best_estimator_.n_features_in_

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        return self.best_estimator_.predict_proba(bags, clinical)

    def predict(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        return self.best_estimator_.predict(bags, clinical)

    # The chosen model's optional outputs, with the capabilities of the chosen model.
    @property
    def capabilities(self) -> frozenset[Tag]:
        check_is_fitted(self)
        return getattr(self.best_estimator_, "capabilities", frozenset())

    def _chosen_with(self, tag: Tag):
        if not has_capability(self, tag):
            raise AttributeError(f"inner_cv's chosen {self.model!r} has no {tag.value}")
        return self.best_estimator_

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        return self._chosen_with(Tag.INSTANCE_SCORES).instance_scores(bags, clinical)

    def bag_features(self, bags) -> pd.DataFrame:
        return self._chosen_with(Tag.BAG_FEATURES).bag_features(bags)

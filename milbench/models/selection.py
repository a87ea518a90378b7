"""Parameter selection by an inner cross-validation on the training bags only.

``inner_cv`` wraps a registered bag model: for every candidate of ``grid`` it runs a stratified
``inner_splits``-fold CV inside the bags given to ``fit``, keeps the candidate with the best mean
``metric`` (ties: the first in grid order), and refits it on all those bags. Placed inside an
outer cross-validation this is nested CV: the outer test folds never take part in the choice, so
the outer figure is an honest estimate of "this model, tuned on the data at hand", unlike a
setting picked by looking at the outer folds.

``model`` is a spec like any other (a name, or ``{name, params}`` whose parameters every
candidate keeps). ``grid`` is a mapping of parameter name to a list of values (every combination
is a candidate) or a list of such mappings, as scikit-learn's ``ParameterGrid`` reads it.
``cv_results_`` keeps each candidate's inner scores.

With ``search: optuna`` the candidates are ``n_trials`` points of ``space`` (ranges, see
``milbench.core.search``) drawn by Optuna's ``sampler`` (TPE or Gaussian process, seeded with
``random_state``), each scored by the same inner CV; the best is refitted as above.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import ParameterGrid
from sklearn.utils.validation import check_is_fitted

from milbench.core.metrics import METRICS, binary_metrics
from milbench.core.search import check_space, suggest
from milbench.core.search import sampler as optuna_sampler
from milbench.models.base import (
    BagClassifier,
    check_bags,
    fit_fold,
    has_capability,
    inner_folds,
    store_params,
    tags_of,
    with_seed,
)
from milbench.models.registry import Tag
from milbench.models.spec import ModelSpec, constructor_parameters

SEARCHES = ("grid", "optuna")


class InnerCVSelection(BagClassifier):
    """The wrapped model with the parameters an inner CV on the training bags chose."""

    mil_tags = frozenset({Tag.SELECTION, Tag.CLINICAL_OPTIONAL})

    def __init__(
        self,
        model: str | dict = "meanpool_svm",
        grid: dict | list | None = None,
        inner_splits: int = 3,
        metric: str = "balanced_accuracy",
        search: str = "grid",
        space: dict | None = None,
        n_trials: int = 20,
        sampler: str = "tpe",
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _check(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if int(self.inner_splits) < 2:
            raise ValueError(f"inner_splits must be at least 2, got {self.inner_splits}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.search == "optuna":
            if self.grid:
                raise ValueError("inner_cv: search 'optuna' draws from space; grid must be empty")
            name = self._wrapped().name
            check_space(self.space, name, constructor_parameters(name), "space")
            if int(self.n_trials) < 1:
                raise ValueError(f"n_trials must be at least 1, got {self.n_trials}")
            optuna_sampler(self.sampler, 0)  # a bad sampler name fails before any training
        elif self.space:
            raise ValueError("inner_cv: space is read by search 'optuna' only; use grid")

    def _candidates(self) -> list[dict]:
        candidates = list(ParameterGrid(self.grid or {}))
        for candidate in candidates:  # unknown names or bad values fail before any training
            self._build(candidate)
        return candidates

    def _wrapped(self) -> ModelSpec:
        return ModelSpec.coerce(self.model)

    def _build(self, candidate: dict):
        wrapped = self._wrapped()
        try:
            spec = ModelSpec(name=wrapped.name, params={**wrapped.params, **candidate})
        except ValueError as error:
            raise ValueError(f"inner_cv: parameters {candidate} do not fit model "
                             f"{wrapped.name!r}: {error}") from error
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
        self._check()
        if self.search == "optuna":
            return self._fit_optuna(bags, labels, clinical)
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
        self._refit_best(rows, candidates[best], bags, labels, clinical)

    def _fit_optuna(self, bags, labels, clinical) -> None:
        import optuna

        folds = inner_folds(labels, self.inner_splits, self.random_state, "inner_cv")
        rows = []

        def objective(trial) -> float:
            candidate = suggest(trial, self.space)
            scores = self._inner_score(candidate, bags, labels, clinical, folds)
            rows.append({"params": candidate, "mean": float(np.nanmean(scores)),
                         "std": float(np.nanstd(scores)), "scores": scores})
            return rows[-1]["mean"]

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not one line per trial
        seed = None if self.random_state is None else int(self.random_state)
        study = optuna.create_study(direction="maximize", sampler=optuna_sampler(self.sampler, seed))
        study.optimize(objective, n_trials=int(self.n_trials))
        best = int(np.nanargmax([row["mean"] for row in rows]))  # first of equal means
        self._refit_best(rows, rows[best]["params"], bags, labels, clinical)

    def _refit_best(self, rows: list[dict], best_params: dict, bags, labels, clinical) -> None:
        self.cv_results_ = pd.DataFrame(rows, columns=["params", "mean", "std", "scores"])
        self.best_params_ = best_params
        self.best_estimator_ = self._build(self.best_params_).fit(bags, labels, clinical)
        if hasattr(self.best_estimator_, "n_features_in_"):
            self.n_features_in_ = self.best_estimator_.n_features_in_

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        return self.best_estimator_.predict_proba(bags, clinical)

    def predict(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        return self.best_estimator_.predict(bags, clinical)

    # The chosen model's optional outputs, once it is chosen.
    def _instance_tags(self) -> frozenset[Tag]:
        chosen = self.__dict__.get("best_estimator_")
        outputs = {Tag.INSTANCE_SCORES, Tag.BAG_FEATURES, Tag.FUSION_GATE}
        return frozenset() if chosen is None else tags_of(chosen) & outputs

    def _chosen_with(self, tag: Tag):
        if not has_capability(self, tag):
            raise AttributeError(f"inner_cv's chosen {self._wrapped().name!r} has no {tag.value}")
        return self.best_estimator_

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        return self._chosen_with(Tag.INSTANCE_SCORES).instance_scores(bags, clinical)

    def bag_features(self, bags) -> pd.DataFrame:
        return self._chosen_with(Tag.BAG_FEATURES).bag_features(bags)

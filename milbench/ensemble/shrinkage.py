"""Shrinkage towards the clinical model: an image model is allowed to move the clinical model's
probability only as far as it helps out of fold, so that when the images say little the result
falls back to the clinical attributes instead of below them ("do no harm").

    P(tumoral) = (1 − w) · P_clinical + w · P_image

``members`` are the clinical model first, then the image model. ``w`` is the value of ``grid``
whose mixed out-of-fold probabilities give the best balanced accuracy on the training bags,
averaged over ``inner_repeats`` stratified ``inner_splits``-fold inner CVs (several repeats, so
that the choice is stable, not the luck of one split); ties go to the smaller ``w`` (towards the
clinical model). Both members are then refitted on all training bags. Evaluated in the outer CV
of a run, this is nested: no outer validation label reaches the choice. The chosen weight and
the inner scores are kept in ``weight_`` and ``weight_scores_``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.validation import check_is_fitted

from milbench.ensemble.members import check_members, fit_member, member_bags
from milbench.models.base import (
    BagClassifier,
    inner_folds,
    out_of_fold,
    store_params,
    take_bags,
    take_clinical,
)
from milbench.models.registry import Tag


class ShrinkageEnsemble(BagClassifier):

    mil_tags = frozenset({Tag.ENSEMBLE, Tag.CLINICAL})

    def __init__(self, members=("clinical_logreg", "meanpool_svm"),
                 grid=(0.0, 0.25, 0.5, 0.75, 1.0), inner_splits: int = 5, inner_repeats: int = 2,
                 random_state=None):
        store_params(self, locals())

    def _validate_params(self) -> None:
        if len(check_members(self.members)) != 2:
            raise ValueError(f"members must be two models, the clinical one first, then the "
                             f"image model; got {len(self.members)}")
        grid = np.asarray(self.grid, dtype=float)
        if grid.ndim != 1 or grid.size == 0 or ((grid < 0) | (grid > 1)).any():
            raise ValueError(f"grid must be weights in [0, 1], got {self.grid}")
        if isinstance(self.inner_repeats, bool) or not isinstance(self.inner_repeats, int) \
                or self.inner_repeats < 1:
            raise ValueError(f"inner_repeats must be a positive integer, got {self.inner_repeats!r}")

    def _check_fit_bags(self, bags):
        return bags  # passed on unchanged: each member checks its own (and fits stay shareable)

    def _fit(self, bags, labels, clinical) -> None:
        members = check_members(self.members)
        seed = None if self.random_state is None else int(self.random_state)
        grid = np.sort(np.asarray(self.grid, dtype=float))
        scores = np.zeros(len(grid))
        for repeat in range(self.inner_repeats):
            folds = inner_folds(labels, self.inner_splits, (seed or 0) + repeat, "shrinkage")
            clinical_p, image_p = (out_of_fold(folds, self._member_fold(m, seed, bags, labels, clinical))
                                   for m in members)
            for index, weight in enumerate(grid):
                mixed = (1 - weight) * clinical_p + weight * image_p
                scores[index] += balanced_accuracy_score(labels, (mixed >= 0.5).astype(int))
        self.weight_scores_ = dict(zip(grid.tolist(), (scores / self.inner_repeats).tolist(),
                                       strict=True))
        self.weight_ = float(grid[int(np.argmax(scores))])  # the first maximum: the smaller w
        self.members_ = [fit_member(m, seed, bags, labels, clinical) for m in members]

    @staticmethod
    def _member_fold(member, seed, bags, labels, clinical):
        def predict_fold(_, train, val):
            model = fit_member(member, seed, take_bags(bags, train), labels[train],
                               take_clinical(clinical, train))
            return model.predict_proba(member_bags(member, take_bags(bags, val)),
                                       take_clinical(clinical, val))[:, 1]
        return predict_fold

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        clinical_p, image_p = (model.predict_proba(member_bags(spec, bags), clinical)[:, 1]
                               for spec, model in zip(check_members(self.members), self.members_,
                                                      strict=True))
        tumoral = (1 - self.weight_) * clinical_p + self.weight_ * image_p
        return np.column_stack([1 - tumoral, tumoral])

"""XGBoost clinical stacker: a meta-classifier over bag-model outputs plus clinical attributes.

The meta-classifier is trained only on out-of-fold outputs of the members: inside ``fit``, each
member is cross-validated on the training bags (inner folds) and the meta-classifier learns from
the predictions each member made for bags it did not train on. Members are then refitted on all
training bags for prediction. Evaluated through the outer cross-validation of ``milbench run``,
this is nested CV: no member's training labels reach the stacker's evaluation.

``meta="auto"`` chooses the meta-classifier by a stratified CV over those out-of-fold rows among
a clinical-only logistic regression, a logistic regression over every input and the gradient-
boosted trees (ties go to the simpler, in that order). On 163 patients boosted trees over-fit
easily; when the members add nothing the clinical-only option wins, and the stacker then scores
as the clinical baseline instead of below it. The choice and its scores are kept in
``meta_choice_`` and ``meta_scores_``.

``inputs`` chooses what each member gives the meta-classifier, by member label: ``proba`` (its
bag score) and any of its bag features (MI-SVM's ``positive_rate``, the semi-supervised model's
``count_0`` / ``count_1`` ...); members not named give all of theirs. The seed report's stackers
(docs/data.md): the MI-SVM positive-instance rate plus count and age, the semi-supervised counts
plus count and age.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from milbench.core.clinical import clinical_design_matrix
from milbench.ensemble.members import check_members, fit_member, member_outputs
from milbench.models.base import (
    BagClassifier,
    check_clinical,
    inner_folds,
    out_of_fold,
    store_params,
    take_bags,
    take_clinical,
)
from milbench.models.boosting import BOOSTERS, boosted_trees, positive_weight
from milbench.models.registry import Tag

CLINICAL_FEATURES = ("age", "log_lymph_count", "male")
META_KINDS = ("xgboost", "lightgbm", "logistic", "auto")
# Candidates of meta="auto", simplest first (ties keep the first): (name, kind, clinical only).
AUTO_CANDIDATES = (("clinical_logistic", "logistic", True), ("logistic", "logistic", False),
                   ("xgboost", "xgboost", False))


class ClinicalStacker(BagClassifier):
    """Meta-classifier over member outputs (probability and bag features) and, with
    ``use_clinical``, age, log lymphocyte count and gender. ``meta``: xgboost or lightgbm
    (defaults follow the seed: learning rate 0.1, 100 trees, ``scale_pos_weight`` from
    prevalence), logistic (standardised, class-balanced L2 logistic regression with ``C``), or
    auto (chosen by inner CV, see the module docstring). ``inputs``: member label → the outputs
    it contributes (see the module docstring).
    """

    mil_tags = frozenset({Tag.ENSEMBLE, Tag.CLINICAL})

    def __init__(
        self,
        members=("clinical_logreg",),
        inputs: dict[str, list[str]] | None = None,
        meta: str = "xgboost",
        use_clinical: bool = True,
        inner_splits: int = 5,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        max_depth: int = 3,
        C: float = 1.0,
        random_state=None,
    ):
        store_params(self, locals())

    def _meta_estimator(self, y: np.ndarray, kind: str):
        if kind == "logistic":
            return make_pipeline(StandardScaler(), LogisticRegression(
                C=self.C, class_weight="balanced", max_iter=1000))
        if kind not in BOOSTERS:
            raise ValueError(f"meta must be one of {META_KINDS}, got {kind!r}")
        return boosted_trees(kind, n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                             max_depth=self.max_depth, scale_pos_weight=positive_weight(y),
                             random_state=self.random_state)

    def _chosen_outputs(self, member, outputs: pd.DataFrame) -> pd.DataFrame:
        """The member's outputs that ``inputs`` asks for (all where it names none)."""
        label = member.display_name
        wanted = (self.inputs or {}).get(label)
        if wanted is None:
            return outputs
        available = [column.split(":", 1)[1] for column in outputs.columns]
        unknown = [name for name in wanted if name not in available]
        if unknown or not wanted:
            raise ValueError(f"stacker inputs for {label!r}: {unknown or 'nothing'} asked; the "
                             f"member gives {available}")
        return outputs[[f"{label}:{name}" for name in wanted]]

    def _design(self, outputs: list[pd.DataFrame], clinical, n_bags: int) -> pd.DataFrame:
        design = pd.concat([o.reset_index(drop=True) for o in outputs], axis=1)
        if self.use_clinical:
            matrix = clinical_design_matrix(check_clinical(clinical, n_bags))
            for index, name in enumerate(CLINICAL_FEATURES):
                design[f"clinical:{name}"] = matrix[:, index]
        return design

    def _validate_params(self) -> None:
        if self.meta not in META_KINDS:
            raise ValueError(f"meta must be one of {META_KINDS}, got {self.meta!r}")
        if self.meta == "auto" and not self.use_clinical:
            raise ValueError("meta='auto' offers a clinical-only option: it needs use_clinical=True")
        labels = [member.display_name for member in check_members(self.members)]
        unknown = sorted(set(self.inputs or {}) - set(labels))
        if unknown:
            raise ValueError(f"stacker inputs name {unknown}, which are not members; members: "
                             f"{labels}")

    def _check_fit_bags(self, bags):
        return bags  # passed on unchanged: each member checks its own (and fits stay shareable)

    def _fit(self, bags, labels, clinical) -> None:
        members = check_members(self.members)
        seed = None if self.random_state is None else int(self.random_state)
        folds = inner_folds(labels, self.inner_splits, seed or 0, "the stacker")

        def member_fold(member):
            def predict_fold(_, train, val):
                model = fit_member(member, seed, take_bags(bags, train), labels[train],
                                   take_clinical(clinical, train))
                return self._chosen_outputs(member, member_outputs(
                    member, model, take_bags(bags, val), take_clinical(clinical, val)))
            return predict_fold

        outputs = [out_of_fold(folds, member_fold(member)) for member in members]
        design = self._design(outputs, clinical, len(labels))
        self.feature_names_ = list(design.columns)
        self.oof_design_ = design  # kept for inspection and the leakage test
        self.meta_choice_, self.meta_scores_ = self._choose_meta(design, labels, folds)
        kind, columns = self._candidate(self.meta_choice_)
        self.meta_columns_ = columns
        self.meta_ = self._meta_estimator(labels, kind).fit(design[columns].to_numpy(), labels)
        self.members_ = [fit_member(m, seed, bags, labels, clinical) for m in members]

    def meta_features(self, bags, clinical=None) -> pd.DataFrame:
        """The meta-classifier's inputs for new bags (members refitted on all training bags)."""
        check_is_fitted(self)
        outputs = [
            self._chosen_outputs(m, member_outputs(m, model, bags, clinical))
            for m, model in zip(check_members(self.members), self.members_, strict=True)
        ]
        return self._design(outputs, clinical, len(bags))

    def _candidate(self, name: str) -> tuple[str, list[str]]:
        """The meta kind of a candidate and the design columns it reads."""
        if self.meta != "auto":
            return self.meta, list(self.feature_names_)
        _, kind, clinical_only = next(c for c in AUTO_CANDIDATES if c[0] == name)
        columns = [c for c in self.feature_names_ if c.startswith("clinical:") or not clinical_only]
        return kind, columns

    def _choose_meta(self, design: pd.DataFrame, labels: np.ndarray,
                     folds) -> tuple[str, dict[str, float]]:
        """With meta='auto', the candidate with the best balanced accuracy over ``folds`` of the
        out-of-fold design (the inner folds the members were fitted on)."""
        if self.meta != "auto":
            return self.meta, {}
        scores = {}
        for name, _, _ in AUTO_CANDIDATES:
            kind, columns = self._candidate(name)
            predicted = np.empty(len(labels), dtype=int)
            for train, val in folds:
                model = self._meta_estimator(labels[train], kind)
                model.fit(design[columns].to_numpy()[train], labels[train])
                predicted[val] = model.predict(design[columns].to_numpy()[val])
            scores[name] = float(balanced_accuracy_score(labels, predicted))
        return max(scores, key=lambda n: (scores[n], -list(scores).index(n))), scores

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        return self.meta_.predict_proba(self.meta_features(bags, clinical)[self.meta_columns_].to_numpy())

"""One-class SVM over reactive patients' instances: tumoral bags as outlier bags (seed appendix).

The idea: reactive lymphocytes are the "normal" population; a tumoral patient's bag holds cells
that lie outside it. A one-class SVM (RBF kernel, ``nu``) is fitted on the instances of the
*reactive* training patients only (after a scaler and PCA fitted on every training instance,
label-free), at most ``max_instances`` of them drawn at random. Each instance gets a margin
(the SVM's decision function: negative outside the learned support). The bag's distribution of
margins becomes three bag features:

* ``outlier_fraction``: the share of the bag's instances below the ``quantile`` of the reactive
  training instances' own margins (the threshold τ; by construction about ``quantile`` of a
  reactive bag's cells fall below it);
* ``mean_margin`` and ``low_margin`` (the bag's 10th-percentile margin).

A logistic regression (standardised, balanced classes) learns the threshold on these features,
with the clinical attributes beside them when ``use_clinical`` allows. Its training rows are
out-of-fold (``oof_folds``): the SVM that scores a training bag never saw that bag's instances,
otherwise reactive training bags would look more normal than unseen reactive patients do.

Instance scores are the negated margins (higher: more outlying). The model reads any instance
vectors, pixels-store rows included (cast to float before the scaler).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from milbench.core.clinical import clinical_design_matrix
from milbench.models.base import (
    BagClassifier,
    check_clinical,
    inner_folds,
    out_of_fold,
    store_params,
    take_bags,
)
from milbench.models.registry import Tag
from preprocessing.transforms import BagTransform

BAG_FEATURES = ("outlier_fraction", "mean_margin", "low_margin")
LOW_MARGIN_PERCENTILE = 10


@dataclass
class _OutlierStage:
    """A fitted instance stage: transform, one-class SVM and the margin threshold τ."""

    transform: BagTransform
    svm: OneClassSVM
    threshold: float

    def margins(self, bags: list[np.ndarray]) -> list[np.ndarray]:
        transformed = self.transform.transform(bags)
        sizes = np.cumsum([len(bag) for bag in transformed])[:-1]
        return np.split(self.svm.decision_function(np.vstack(transformed)), sizes)

    def features(self, bags: list[np.ndarray]) -> pd.DataFrame:
        rows = [(float(np.mean(m < self.threshold)), float(np.mean(m)),
                 float(np.percentile(m, LOW_MARGIN_PERCENTILE))) for m in self.margins(bags)]
        return pd.DataFrame(rows, columns=list(BAG_FEATURES))


class OneClassMIL(BagClassifier):
    """One-class SVM on reactive instances, a bag score from the margins, a logistic threshold
    (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.CLINICAL_OPTIONAL, Tag.INSTANCE_SCORES,
                          Tag.BAG_FEATURES})


    def __init__(
        self,
        nu: float = 0.1,
        gamma: str | float = "scale",
        pca_components: int | None = 64,
        quantile: float = 0.1,
        max_instances: int = 3000,
        oof_folds: int = 3,
        use_clinical: bool | str = "auto",
        C: float = 1.0,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _validate_params(self) -> None:
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must lie in (0, 1], got {self.nu}")
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

    def _fit_stage(self, bags: list[np.ndarray], labels: np.ndarray, seed: int) -> _OutlierStage:
        components = None if self.pca_components is None else int(self.pca_components)
        transform = BagTransform(n_components=components, random_state=0).fit(bags)
        reactive = np.vstack(transform.transform([bag for bag, label in zip(bags, labels,
                                                                            strict=True) if not label]))
        if len(reactive) > int(self.max_instances):
            rng = np.random.default_rng(seed)
            reactive = reactive[np.sort(rng.choice(len(reactive), int(self.max_instances),
                                                   replace=False))]
        svm = OneClassSVM(nu=self.nu, gamma=self.gamma).fit(reactive)
        threshold = float(np.quantile(svm.decision_function(reactive), self.quantile))
        return _OutlierStage(transform, svm, threshold)

    def _design(self, features: pd.DataFrame, clinical, n_bags: int) -> np.ndarray:
        design = features.loc[:, list(BAG_FEATURES)].to_numpy(dtype=float)
        if self.uses_clinical_:
            design = np.hstack([design, clinical_design_matrix(check_clinical(clinical, n_bags))])
        return design

    def _fit(self, bags, labels, clinical) -> None:
        if self.use_clinical is True and clinical is None:
            raise ValueError("use_clinical=True but fit got no clinical table")
        self.uses_clinical_ = self.use_clinical is not False and clinical is not None
        seed = self._seed()
        folds = inner_folds(labels, self.oof_folds, seed, "oneclass_svm")

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
        """Per bag: ``outlier_fraction``, ``mean_margin``, ``low_margin`` (final stage)."""
        bags = self._check_predict_bags(bags)
        return self.stage_.features(bags)

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        features = self.bag_features(bags)
        return self.estimator_.predict_proba(self._design(features, clinical, len(features)))

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """Negated one-class margins: higher means further outside the reactive population."""
        bags = self._check_predict_bags(bags)
        return [-margins for margins in self.stage_.margins(bags)]

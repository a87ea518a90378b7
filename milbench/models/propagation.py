"""Single-instance learning (SIL; Ray & Craven 2005): bag labels propagated to the instances.

Every instance takes its bag's label, and one instance classifier (a standardised, class-balanced
logistic regression) learns from all of them. Atypical cells occur almost only in tumoral bags,
so a classifier that fits these noisy labels ranks them above the cells both kinds of bag share:
the simplest MIL baseline, and on good instance vectors a witness finder. Each bag is then
summarised by its instances' scores:

* ``mean_score``: the mean instance logit;
* ``high_score``: the ``quantile`` (default 0.9) of the bag's logits, its most suspicious cells;
* ``positive_fraction``: the share of its instances above the ``quantile`` of the reactive
  training instances' own logits (an estimate of the witness fraction).

A logistic regression (standardised, balanced classes) learns the bag label from these
features, with the clinical attributes beside them when ``use_clinical`` allows. Its training
rows are out-of-fold (``oof_folds``): the instance classifier that scores a training bag never
saw that bag, otherwise training bags would score more confidently than unseen patients do.

Instance scores are the instance classifier's logits (final stage, fitted on every training
bag). At most ``max_instances`` training instances are drawn (at random, seeded) for each
instance classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

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

BAG_FEATURES = ("mean_score", "high_score", "positive_fraction")


@dataclass
class _PropagatedStage:
    """A fitted instance stage: transform, instance classifier and the reactive threshold τ."""

    transform: BagTransform
    classifier: LogisticRegression
    threshold: float
    quantile: float

    def scores(self, bags: list[np.ndarray]) -> list[np.ndarray]:
        transformed = self.transform.transform(bags)
        sizes = np.cumsum([len(bag) for bag in transformed])[:-1]
        return np.split(self.classifier.decision_function(np.vstack(transformed)), sizes)

    def features(self, bags: list[np.ndarray]) -> pd.DataFrame:
        rows = [(float(np.mean(s)), float(np.quantile(s, self.quantile)),
                 float(np.mean(s > self.threshold))) for s in self.scores(bags)]
        return pd.DataFrame(rows, columns=list(BAG_FEATURES))


class PropagatedInstanceMIL(BagClassifier):
    """SIL: an instance classifier on bag labels, bag features from its scores, a logistic
    regression on them and the clinical attributes (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.CLINICAL_OPTIONAL, Tag.INSTANCE_SCORES,
                          Tag.BAG_FEATURES})

    def __init__(
        self,
        instance_C: float = 1.0,
        quantile: float = 0.9,
        pca_components: int | None = None,
        max_instances: int = 20000,
        oof_folds: int = 3,
        use_clinical: bool | str = "auto",
        C: float = 1.0,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _validate_params(self) -> None:
        if not self.instance_C > 0:
            raise ValueError(f"instance_C must be positive, got {self.instance_C}")
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C}")
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

    def _fit_stage(self, bags: list[np.ndarray], labels: np.ndarray, seed: int) -> _PropagatedStage:
        components = None if self.pca_components is None else int(self.pca_components)
        transform = BagTransform(n_components=components, random_state=0).fit(bags)
        instances = np.vstack(transform.transform(bags))
        instance_labels = np.repeat(labels, [len(bag) for bag in bags])
        if len(instances) > int(self.max_instances):
            rng = np.random.default_rng(seed)
            kept = np.sort(rng.choice(len(instances), int(self.max_instances), replace=False))
            instances, instance_labels = instances[kept], instance_labels[kept]
        classifier = LogisticRegression(C=self.instance_C, class_weight="balanced", max_iter=1000,
                                        random_state=seed).fit(instances, instance_labels)
        reactive = classifier.decision_function(instances[instance_labels == 0])
        return _PropagatedStage(transform, classifier, float(np.quantile(reactive, self.quantile)),
                                float(self.quantile))

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
        folds = inner_folds(labels, self.oof_folds, seed, "sil")

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
        """Per bag: ``mean_score``, ``high_score``, ``positive_fraction`` (final stage)."""
        bags = self._check_predict_bags(bags)
        return self.stage_.features(bags)

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        features = self.bag_features(bags)
        return self.estimator_.predict_proba(self._design(features, clinical, len(features)))

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """The instance classifier's logits: higher means more like the tumoral bags' cells."""
        bags = self._check_predict_bags(bags)
        return self.stage_.scores(bags)

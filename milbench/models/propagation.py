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

from milbench.models.base import store_params
from milbench.models.registry import Tag
from milbench.models.staged import InstanceStageMIL, scores_per_bag
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
        return scores_per_bag(self.transform, self.classifier.decision_function, bags)

    def features(self, bags: list[np.ndarray]) -> pd.DataFrame:
        rows = [(float(np.mean(s)), float(np.quantile(s, self.quantile)),
                 float(np.mean(s > self.threshold))) for s in self.scores(bags)]
        return pd.DataFrame(rows, columns=list(BAG_FEATURES))

    def instance_scores(self, bags: list[np.ndarray]) -> list[np.ndarray]:
        """The instance classifier's logits: higher means more like the tumoral bags' cells."""
        return self.scores(bags)


class PropagatedInstanceMIL(InstanceStageMIL):
    """SIL: an instance classifier on bag labels, bag features from its scores, a logistic
    regression on them and the clinical attributes (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.CLINICAL_OPTIONAL, Tag.INSTANCE_SCORES,
                          Tag.BAG_FEATURES})
    BAG_FEATURES = BAG_FEATURES
    NAME = "sil"

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

    def _validate_params(self) -> None:
        if not self.instance_C > 0:
            raise ValueError(f"instance_C must be positive, got {self.instance_C}")
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C}")
        super()._validate_params()

    def _fit_stage(self, bags: list[np.ndarray], labels: np.ndarray, seed: int) -> _PropagatedStage:
        transform = self._fit_transform(bags)
        instances = np.vstack(transform.transform(bags))
        instance_labels = np.repeat(labels, [len(bag) for bag in bags])
        kept = self._at_most_max_instances(len(instances), seed)
        if kept is not None:
            instances, instance_labels = instances[kept], instance_labels[kept]
        classifier = LogisticRegression(C=self.instance_C, class_weight="balanced", max_iter=1000,
                                        random_state=seed).fit(instances, instance_labels)
        reactive = classifier.decision_function(instances[instance_labels == 0])
        return _PropagatedStage(transform, classifier, float(np.quantile(reactive, self.quantile)),
                                float(self.quantile))

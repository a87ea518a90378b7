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
from sklearn.svm import OneClassSVM

from milbench.models.base import store_params
from milbench.models.registry import Tag
from milbench.models.staged import InstanceStageMIL, scores_per_bag
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
        return scores_per_bag(self.transform, self.svm.decision_function, bags)

    def features(self, bags: list[np.ndarray]) -> pd.DataFrame:
        rows = [(float(np.mean(m < self.threshold)), float(np.mean(m)),
                 float(np.percentile(m, LOW_MARGIN_PERCENTILE))) for m in self.margins(bags)]
        return pd.DataFrame(rows, columns=list(BAG_FEATURES))

    def instance_scores(self, bags: list[np.ndarray]) -> list[np.ndarray]:
        """Negated margins: higher means further outside the reactive population."""
        return [-margins for margins in self.margins(bags)]


class OneClassMIL(InstanceStageMIL):
    """One-class SVM on reactive instances, a bag score from the margins, a logistic threshold
    (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.CLINICAL_OPTIONAL, Tag.INSTANCE_SCORES,
                          Tag.BAG_FEATURES})
    BAG_FEATURES = BAG_FEATURES
    NAME = "oneclass_svm"

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

    def _validate_params(self) -> None:
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must lie in (0, 1], got {self.nu}")
        super()._validate_params()

    def _fit_stage(self, bags: list[np.ndarray], labels: np.ndarray, seed: int) -> _OutlierStage:
        transform = self._fit_transform(bags)
        reactive = np.vstack(transform.transform([bag for bag, label in zip(bags, labels,
                                                                            strict=True) if not label]))
        kept = self._at_most_max_instances(len(reactive), seed)
        if kept is not None:
            reactive = reactive[kept]
        svm = OneClassSVM(nu=self.nu, gamma=self.gamma).fit(reactive)
        threshold = float(np.quantile(svm.decision_function(reactive), self.quantile))
        return _OutlierStage(transform, svm, threshold)

"""MI-SVM and mi-SVM (Andrews, Tsochantaridis & Hofmann, NIPS 2002) on scikit-learn's solvers,
plus the mean-pooled-bag SVM baseline.

Both MI models alternate between an SVM on instances and a re-labelling of the instances of
positive bags:

* MI-SVM represents each positive bag by one *witness*: it starts from the bag's mean instance,
  then repeatedly trains and picks each positive bag's highest-scoring instance, until the
  witnesses stop changing or ``max_iters`` SVMs have been trained.
* mi-SVM labels every instance: instances of negative bags are negative, those of positive bags
  are re-labelled by the sign of the decision each round, with at least the best instance of
  each positive bag kept positive.

The bag score is the largest instance decision value; the instance decisions are the instance
scores. ``predict_proba`` is a Platt-style calibration of the bag score: a class-balanced
logistic regression of the bag label on *out-of-fold* bag scores (``calibration_folds`` refits on
parts of the training bags; ``None`` calibrates on the training bags' own scores, which is
faster but optimistic). Thresholding that probability at 0.5 places the decision threshold where
held-out bags separate instead of at the SVM's zero, which is what made the reference ``misvm``
RBF predictions collapse to a single class while its AUC stayed high. The class balance in the
calibration makes the threshold aim at balanced accuracy (the challenge metric).

Speed: both kernels use libsvm (``SVC``), which caches kernel rows instead of holding the dense
n x n QP matrix the reference ``misvm`` builds (>200 s per fit and 3.3 GB on MUSK2).

Defaults (RBF, C=10, gamma="scale", standardised instances) are the benchmark settings; note
that scikit-learn's C is not divided by the number of QP variables as ``misvm``'s
``scale_C=True`` does, so ``misvm``'s "C=1" is a much weaker penalty than ours. ``scale_C=True``
here applies the reference's convention: each SVM of the alternation gets ``C / n`` with ``n`` its
number of training examples (MI-SVM: negative instances plus one witness per positive bag;
mi-SVM: all instances), so ``misvm[kernel=linear;C=1;scale_C=true]`` is the reference's setting.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from milbench.models.base import (
    BagClassifier,
    out_of_fold,
    store_params,
    take_bags,
)
from milbench.models.collate import split_by_bag, stack_instances
from milbench.models.registry import Tag
from preprocessing.transforms import BagTransform

log = logging.getLogger(__name__)

_KERNELS = ("linear", "rbf")


def _fit_score_calibration(scores: np.ndarray, labels: np.ndarray) -> Pipeline:
    """Class-balanced logistic regression of bag labels on one bag score (Platt scaling).

    The score is standardised first so the logistic's L2 penalty does not depend on the scale of
    the SVM's decision values (a weak C gives values spread over 1e-4, not over 1).
    """
    calibration = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
    return calibration.fit(scores.reshape(-1, 1), labels)


class _ScoreCalibrated(BagClassifier):
    """``predict_proba`` from ``decision_function`` through the fitted calibration."""

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        scores = self.decision_function(bags)
        return self.calibration_.predict_proba(scores.reshape(-1, 1))


class _InstanceSVM(_ScoreCalibrated):
    """Shared machinery of MI-SVM and mi-SVM: preprocessing, solver choice, scoring."""


    def __init__(
        self,
        kernel: str = "rbf",
        C: float = 10.0,
        gamma: str | float = "scale",
        class_weight: str | dict | None = None,
        max_iters: int = 50,
        scale: bool = True,
        pca_components: int | None = None,
        calibration_folds: int | None = 3,
        scale_C: bool = False,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    # -- training ------------------------------------------------------------------------
    def _validate_params(self) -> None:
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, got {self.kernel!r}")
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C}")
        if int(self.max_iters) < 1:
            raise ValueError(f"max_iters must be at least 1, got {self.max_iters}")
        if self.pca_components is not None and int(self.pca_components) < 1:
            raise ValueError(f"pca_components must be None or >= 1, got {self.pca_components}")
        if self.calibration_folds is not None and int(self.calibration_folds) < 2:
            raise ValueError(
                f"calibration_folds must be None or >= 2, got {self.calibration_folds}"
            )

    def _make_svm(self, n_examples: int) -> SVC:
        # libsvm for both kernels: exact hinge loss with a free (unpenalised) bias, as in
        # Andrews et al.; fast here because only instances, never an n x n matrix, are stored.
        return SVC(
            kernel=self.kernel,
            C=self.C / n_examples if self.scale_C else self.C,
            gamma=self.gamma,
            class_weight=self.class_weight,
            cache_size=500,
            random_state=self.random_state,
        )

    def _make_transform(self) -> BagTransform | None:
        if not self.scale and self.pca_components is None:
            return None
        return BagTransform(n_components=self.pca_components, scale=self.scale, random_state=0)

    def _train_svm(self, features: np.ndarray, targets: np.ndarray) -> SVC:
        """One SVM of the alternation; with ``scale_C``, C is divided by ``len(features)``."""
        return self._make_svm(len(features)).fit(features, targets)

    def _fit(self, bags, labels, clinical) -> None:
        """``clinical`` is ignored."""
        instances, bag_index = stack_instances(bags)
        # Canonical instance order (lexicographic, bag index breaking ties): the solvers'
        # results then do not depend on the order of instances inside a bag.
        keys = [bag_index] + [instances[:, j] for j in range(instances.shape[1] - 1, -1, -1)]
        order = np.lexsort(keys)
        instances, bag_index = instances[order], bag_index[order]

        # The instances, stacked in canonical order, form one "bag" for the transform.
        self.transform_ = self._make_transform()
        features = (
            instances if self.transform_ is None else self.transform_.fit_transform([instances])[0]
        )
        members = [np.flatnonzero(bag_index == b) for b in range(len(bags))]
        self.svm_, self.n_iter_, self.converged_ = self._alternate(features, labels, members)
        train_scores = np.array([d.max() for d in _bag_decisions(self.svm_, features, members)])
        held_out = self._held_out_scores(bags, labels)
        self.calibration_ = None
        if held_out is not None:
            self.calibration_ = _fit_score_calibration(held_out, labels)
            if self.calibration_[-1].coef_[0, 0] <= 0:
                # Held-out scores that do not rank the bags would reverse the bag score; the
                # calibration must stay increasing, so fall back to the training scores.
                log.info("%s: out-of-fold bag scores do not rank the bags; calibrating on "
                         "training scores", type(self).__name__)
                self.calibration_ = None
        self.calibrated_on_ = "out_of_fold" if self.calibration_ is not None else "training"
        if self.calibration_ is None:
            self.calibration_ = _fit_score_calibration(train_scores, labels)

    def _alternate(self, features, labels, members):
        raise NotImplementedError

    def _held_out_scores(self, bags, labels) -> np.ndarray | None:
        """Out-of-fold bag scores from ``calibration_folds`` refits on parts of the training bags.

        Training bags score optimistically (their witnesses were fitted), and on small or
        high-dimensional sets (UCSB, RBF) every held-out bag then falls below the threshold
        learned from them. Returns None (calibrate on training scores) when a class is too small.
        """
        if self.calibration_folds is None:
            return None
        folds = min(int(self.calibration_folds), int(np.bincount(labels).min()))
        if folds < 2:
            return None
        splitter = StratifiedKFold(folds, shuffle=True, random_state=self.random_state or 0)

        def held_out(_, train, test):
            part = clone(self).set_params(calibration_folds=None)
            return part.fit(take_bags(bags, train), labels[train]).decision_function(
                take_bags(bags, test))

        return out_of_fold(splitter.split(np.zeros(len(labels)), labels), held_out)

    # -- prediction ----------------------------------------------------------------------
    def _instance_decisions(self, bags) -> list[np.ndarray]:
        bags = self._check_predict_bags(bags)
        instances = np.concatenate(bags, axis=0)
        if self.transform_ is not None:
            instances = self.transform_.transform([instances])[0]
        decisions = self.svm_.decision_function(instances)
        return split_by_bag(decisions, [len(bag) for bag in bags])

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """SVM decision value of every instance (the witness has the bag's largest)."""
        return self._instance_decisions(bags)

    def decision_function(self, bags, clinical=None) -> np.ndarray:
        """Bag score: the largest instance decision value."""
        return np.array([scores.max() for scores in self._instance_decisions(bags)])

    def bag_features(self, bags) -> pd.DataFrame:
        """``positive_rate`` per bag: the fraction of its instances on the positive side of the
        SVM (the seed's MI-SVM input to the XGBoost stacker)."""
        return pd.DataFrame({"positive_rate": [float((scores > 0).mean())
                                               for scores in self._instance_decisions(bags)]})


def _bag_decisions(svm: SVC, features: np.ndarray, members: list[np.ndarray]) -> list[np.ndarray]:
    """SVM decision values of each bag's rows, from one call over all of them (a call per bag
    costs more in input checks than in the kernel)."""
    rows = np.concatenate(members)
    return split_by_bag(svm.decision_function(features[rows]), [len(m) for m in members])


class MISVM(_InstanceSVM):
    """MI-SVM: one witness instance per positive bag, all instances of negative bags."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.INSTANCE_SCORES, Tag.BAG_FEATURES})

    def _alternate(self, features, labels, members):
        negative_rows = np.concatenate([members[b] for b in np.flatnonzero(labels == 0)])
        positive_members = [members[b] for b in np.flatnonzero(labels == 1)]
        negatives = features[negative_rows]
        # Start: each positive bag is represented by its mean instance.
        representatives = np.stack([features[rows].mean(axis=0) for rows in positive_members])
        targets = np.r_[np.zeros(len(negatives), int), np.ones(len(representatives), int)]
        witnesses = None
        for iteration in range(1, int(self.max_iters) + 1):
            svm = self._train_svm(np.vstack([negatives, representatives]), targets)
            chosen = np.array([rows[np.argmax(d)] for rows, d in
                               zip(positive_members, _bag_decisions(svm, features, positive_members),
                                   strict=True)])
            if witnesses is not None and np.array_equal(chosen, witnesses):
                self.witness_rows_ = witnesses
                return svm, iteration, True
            witnesses = chosen
            representatives = features[witnesses]
        self.witness_rows_ = witnesses
        return svm, int(self.max_iters), False


class MiSVM(_InstanceSVM):
    """mi-SVM: instance labels inside positive bags are re-estimated every round."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.INSTANCE_SCORES, Tag.BAG_FEATURES})

    def _alternate(self, features, labels, members):
        instance_labels = np.zeros(len(features), dtype=int)
        positive_members = [members[b] for b in np.flatnonzero(labels == 1)]
        for rows in positive_members:
            instance_labels[rows] = 1  # start: every instance of a positive bag is positive
        for iteration in range(1, int(self.max_iters) + 1):
            svm = self._train_svm(features, instance_labels)
            updated = instance_labels.copy()
            for rows, decisions in zip(positive_members,
                                       _bag_decisions(svm, features, positive_members), strict=True):
                bag_labels = (decisions > 0).astype(int)
                if not bag_labels.any():
                    bag_labels[np.argmax(decisions)] = 1  # a positive bag keeps a positive
                updated[rows] = bag_labels
            if np.array_equal(updated, instance_labels):
                return svm, iteration, True
            instance_labels = updated
        return svm, int(self.max_iters), False


class MeanPoolSVM(_ScoreCalibrated):
    """Baseline: each bag is its mean instance (optionally ‖ std), scaled, then an SVC."""

    mil_tags = frozenset({Tag.INSTANCES})

    def __init__(
        self,
        C: float = 10.0,
        kernel: str = "rbf",
        gamma: str | float = "scale",
        pooling: str = "mean",
        scale: bool = True,
        class_weight: str | dict | None = None,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _pool(self, bags: list[np.ndarray]) -> np.ndarray:
        means = np.stack([bag.mean(axis=0) for bag in bags])
        if self.pooling == "mean":
            return means
        return np.hstack([means, np.stack([bag.std(axis=0) for bag in bags])])

    def _validate_params(self) -> None:
        if self.pooling not in ("mean", "mean_std"):
            raise ValueError(f"pooling must be 'mean' or 'mean_std', got {self.pooling!r}")

    def _fit(self, bags, labels, clinical) -> None:
        """``clinical`` is ignored."""
        pooled = self._pool(bags)
        self.scaler_ = StandardScaler(with_mean=self.scale, with_std=self.scale).fit(pooled)
        self.svm_ = SVC(
            C=self.C,
            kernel=self.kernel,
            gamma=self.gamma,
            class_weight=self.class_weight,
            random_state=self.random_state,
        ).fit(self.scaler_.transform(pooled), labels)
        self.calibration_ = _fit_score_calibration(
            self.svm_.decision_function(self.scaler_.transform(pooled)), labels
        )

    def decision_function(self, bags, clinical=None) -> np.ndarray:
        """SVM decision value of each mean-pooled bag."""
        bags = self._check_predict_bags(bags)
        return self.svm_.decision_function(self.scaler_.transform(self._pool(bags)))

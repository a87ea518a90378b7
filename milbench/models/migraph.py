"""Set-kernel SVMs: miGraph (Zhou, Sun & Li, ICML 2009) and MI-Kernel (Gärtner et al. 2002).

Both are an SVC on a precomputed bag kernel, a weighted sum of an RBF kernel over instance pairs
(``WeightedSetKernelSVM``); they differ in how a bag weighs its instances and in the
normalisation. MI-Kernel weighs every instance alike and normalises in feature space.

miGraph: bags as graphs.

Instances of a bag are not independent samples: miGraph links two instances of a bag when they
lie closer than ``delta`` times the bag's mean pairwise distance (an ε-graph), and weighs each
instance by the inverse of its degree (self included), so a clique of near-duplicates counts
about as much as one instance. The bag kernel is the normalised, weighted sum of an RBF kernel
over instance pairs:

    k(X, Y) = Σ_a Σ_b W_a W_b exp(-γ ‖x_a − y_b‖²) / (Σ_a W_a · Σ_b W_b),  W_a = 1 / degree(a)

and scikit-learn's SVC learns on it as a precomputed kernel. ``predict_proba`` is the logistic
of the SVM margin: not calibrated, but its ranking and its 0.5 cut are the SVM's. Instances are
standardised first (scaler fitted on the training bags). ``gamma="scale"`` is 1 / (features ×
instance variance) after scaling, as scikit-learn's SVC would choose. The paper chose C and γ
by cross-validation; ``inner_cv`` does that here (``configs/bench/mil.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import sparse
from scipy.spatial.distance import pdist, squareform
from scipy.special import expit
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.svm import SVC

from milbench.models.base import BagClassifier, store_params
from milbench.models.registry import Tag
from preprocessing.transforms import BagTransform


def instance_weights(bag: np.ndarray, delta: float) -> np.ndarray:
    """miGraph's per-instance weights: 1 / degree in the bag's ε-graph (self loop included),
    the threshold ``delta`` times the bag's mean pairwise distance."""
    if len(bag) == 1:
        return np.ones(1)
    distances = squareform(pdist(bag))
    threshold = delta * distances[np.triu_indices(len(bag), 1)].mean()
    degree = (distances <= threshold).sum(axis=1)  # the diagonal (0) counts: the self loop
    return 1.0 / degree


def _weight_matrix(bags: list[np.ndarray], weigh: Callable[[np.ndarray], np.ndarray]
                   ) -> sparse.csr_matrix:
    """(instances × bags): column i holds bag i's normalised weights on its rows."""
    columns = [weigh(bag) for bag in bags]
    values = np.concatenate([w / w.sum() for w in columns])
    rows = np.arange(len(values))
    owners = np.repeat(np.arange(len(bags)), [len(bag) for bag in bags])
    return sparse.csr_matrix((values, (rows, owners)), shape=(len(values), len(bags)))


class WeightedSetKernelSVM(BagClassifier):
    """An SVC on the precomputed bag kernel ``Σ_a Σ_b W_a W_b exp(-γ ‖x_a − y_b‖²)``, each bag's
    weights summing to 1, optionally cosine-normalised (``k(X, Y) / sqrt(k(X, X) k(Y, Y))``).
    Subclasses say how a bag weighs its instances (``_weigh``) and whether to normalise."""

    cosine_normalised = False

    def _weigh(self, bag: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _validate_params(self) -> None:
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if not (self.gamma == "scale" or (isinstance(self.gamma, int | float) and self.gamma > 0)):
            raise ValueError(f"gamma must be 'scale' or a positive number, got {self.gamma!r}")

    def _raw_kernel(self, bags: list[np.ndarray], right_bags: list[np.ndarray],
                    right_weights: sparse.csr_matrix | None = None) -> np.ndarray:
        instance = rbf_kernel(np.vstack(bags), np.vstack(right_bags), gamma=self.gamma_)
        if right_weights is None:
            right_weights = _weight_matrix(right_bags, self._weigh)
        return np.asarray(_weight_matrix(bags, self._weigh).T @ instance @ right_weights)

    def _self_kernel(self, bags: list[np.ndarray]) -> np.ndarray:
        """k(X, X) of each bag alone (no bag-by-bag matrix)."""
        return np.array([self._raw_kernel([bag], [bag])[0, 0] for bag in bags])

    def _kernel(self, bags: list[np.ndarray], reference: list[np.ndarray] | None = None):
        """Bag kernel between ``bags`` and the training bags (or ``reference``)."""
        if reference is None:
            gram = self._raw_kernel(bags, self.train_bags_, self.train_weights_)
            right_self = self.train_self_
        else:
            gram = self._raw_kernel(bags, reference)
            right_self = self._self_kernel(reference) if self.cosine_normalised else None
        if self.cosine_normalised:
            gram = gram / np.sqrt(np.outer(self._self_kernel(bags), right_self))
        return gram

    def _fit(self, bags, labels, clinical) -> None:
        self.transform_ = BagTransform(n_components=None, random_state=0).fit(bags)
        self.train_bags_ = self.transform_.transform(bags)
        stacked = np.vstack(self.train_bags_)
        variance = stacked.var()
        self.gamma_ = (1.0 / (stacked.shape[1] * variance) if self.gamma == "scale" and variance > 0
                       else 1.0 if self.gamma == "scale" else float(self.gamma))
        self.train_weights_ = _weight_matrix(self.train_bags_, self._weigh)
        self.train_self_ = self._self_kernel(self.train_bags_) if self.cosine_normalised else None
        gram = self._kernel(self.train_bags_, self.train_bags_)
        self.svm_ = SVC(C=self.C, kernel="precomputed", class_weight=self.class_weight,
                        random_state=self.random_state).fit(gram, labels)

    def decision_function(self, bags, clinical=None) -> np.ndarray:
        bags = self._check_predict_bags(bags)
        return self.svm_.decision_function(self._kernel(self.transform_.transform(bags)))

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        positive = expit(self.decision_function(bags))
        return np.column_stack([1.0 - positive, positive])


class MIGraph(WeightedSetKernelSVM):
    """miGraph: ε-graph instance weights, a weighted RBF bag kernel, an SVC on it."""

    mil_tags = frozenset({Tag.INSTANCES})

    def __init__(self, C: float = 1.0, gamma: str | float = "scale", delta: float = 1.0,
                 class_weight: str | None = "balanced", random_state: int | None = None):
        store_params(self, locals())

    def _validate_params(self) -> None:
        super()._validate_params()
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")

    def _weigh(self, bag: np.ndarray) -> np.ndarray:
        return instance_weights(bag, self.delta)


class MIKernel(WeightedSetKernelSVM):
    """MI-Kernel (Gärtner, Flach, Kowalczyk & Smola, ICML 2002): the normalised set kernel. Every
    instance weighs the same, the bag kernel is the sum of the instance RBF kernels over all
    pairs, normalised in feature space (``k(X, Y) / sqrt(k(X, X) k(Y, Y))``, so a bag has kernel 1
    with itself whatever its size), and an SVC learns on it."""

    mil_tags = frozenset({Tag.INSTANCES})

    cosine_normalised = True

    def __init__(self, C: float = 1.0, gamma: str | float = "scale",
                 class_weight: str | None = "balanced", random_state: int | None = None):
        store_params(self, locals())

    def _weigh(self, bag: np.ndarray) -> np.ndarray:
        return np.ones(len(bag))

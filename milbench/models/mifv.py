"""miFV (Wei, Wu & Zhou, IEEE TNNLS 2017): each bag encoded as a Fisher vector, then a linear SVM.

A Gaussian mixture with diagonal covariances is fitted on the training instances (standardised,
optionally reduced by PCA, both fitted on the training bags). A bag X = {x_1 … x_N} is encoded by
the gradient of its instances' mean log-likelihood with respect to the mixture's parameters,
whitened by the Fisher information (the "improved" Fisher vector of Sánchez et al. 2013):

    γ_ik = P(component k | x_i)
    G_w(k)  = Σ_i (γ_ik − w_k) / (N √w_k)
    G_μ(k)  = Σ_i γ_ik (x_i − μ_k) / σ_k / (N √w_k)
    G_σ(k)  = Σ_i γ_ik ((x_i − μ_k)² / σ_k² − 1) / (N √(2 w_k))

then power-normalised (sign(z) √|z|) and L2-normalised, and a linear SVC separates the bags.
``predict_proba`` is the logistic of the SVM margin (its ranking and 0.5 cut are the SVM's).
The component count is fixed in advance (``n_components``) or chosen by ``inner_cv``.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.special import expit
from sklearn.mixture import GaussianMixture
from sklearn.svm import SVC

from milbench.models.base import BagClassifier, store_params
from milbench.models.registry import Tag
from preprocessing.transforms import BagTransform

log = logging.getLogger(__name__)


def fisher_vector(bag: np.ndarray, weights: np.ndarray, means: np.ndarray,
                  variances: np.ndarray, posteriors: np.ndarray) -> np.ndarray:
    """The power- and L2-normalised Fisher vector of one bag under a diagonal mixture
    (``weights`` (K,), ``means`` and ``variances`` (K, D)), given its instances' component
    ``posteriors`` (N, K): [G_w (K), G_μ (K·D), G_σ (K·D)]."""
    n = len(bag)
    sigma = np.sqrt(variances)
    standardised = (bag[:, None, :] - means[None]) / sigma[None]  # (N, K, D)
    g_weight = (posteriors - weights).sum(axis=0) / (n * np.sqrt(weights))
    g_mean = np.einsum("nk,nkd->kd", posteriors, standardised) / (n * np.sqrt(weights))[:, None]
    g_sigma = (np.einsum("nk,nkd->kd", posteriors, standardised ** 2 - 1.0)
               / (n * np.sqrt(2.0 * weights))[:, None])
    vector = np.concatenate([g_weight, g_mean.ravel(), g_sigma.ravel()])
    vector = np.sign(vector) * np.sqrt(np.abs(vector))
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


class MIFisherVector(BagClassifier):
    """miFV: a diagonal Gaussian mixture on the training instances, each bag as its Fisher
    vector (power and L2 normalised), a linear SVC on the vectors."""

    mil_tags = frozenset({Tag.INSTANCES})

    def __init__(self, n_components: int = 4, pca_components: int | None = None, C: float = 1.0,
                 reg_covar: float = 1e-3, class_weight: str | None = "balanced",
                 random_state: int | None = None):
        store_params(self, locals())

    def _validate_params(self) -> None:
        if not (isinstance(self.n_components, int | np.integer) and self.n_components >= 1):
            raise ValueError(f"n_components must be an integer >= 1, got {self.n_components!r}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if not self.reg_covar > 0:
            raise ValueError(f"reg_covar must be > 0, got {self.reg_covar}")

    def encode(self, bags) -> np.ndarray:
        """The Fisher vector of each bag (n_bags × (1 + 2·features)·components)."""
        bags = self.transform_.transform(bags)
        mixture = self.mixture_
        return np.stack([fisher_vector(bag, mixture.weights_, mixture.means_,
                                       mixture.covariances_, mixture.predict_proba(bag))
                         for bag in bags])

    def _fit(self, bags, labels, clinical) -> None:
        """``clinical`` is ignored."""
        self.transform_ = BagTransform(n_components=self.pca_components, random_state=0).fit(bags)
        stacked = np.vstack(self.transform_.transform(bags))
        components = int(min(self.n_components, len(stacked)))
        if components < self.n_components:  # more components than instances cannot be fitted
            log.warning("mifv: %d training instances, so %d mixture components instead of %d",
                        len(stacked), components, self.n_components)
        self.mixture_ = GaussianMixture(components, covariance_type="diag", reg_covar=self.reg_covar,
                                        random_state=self.random_state or 0).fit(stacked)
        self.svm_ = SVC(C=self.C, kernel="linear", class_weight=self.class_weight,
                        random_state=self.random_state).fit(self.encode(bags), labels)

    def decision_function(self, bags, clinical=None) -> np.ndarray:
        bags = self._check_predict_bags(bags)
        return self.svm_.decision_function(self.encode(bags))

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        positive = expit(self.decision_function(bags))
        return np.column_stack([1.0 - positive, positive])

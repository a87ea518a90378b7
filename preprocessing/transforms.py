"""Fold-fitted instance transforms: StandardScaler then PCA over the stacked instances of bags.

Fit on the training bags of a fold only (never on validation or test bags), then transform
any bags. The seed used 100 PCA dimensions for MI-SVM and 3000 for D-MIL; the number is
clipped to what the data allows (instances and features of the training fold).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted


class BagTransform(TransformerMixin, BaseEstimator):
    """Scaler (+ optional PCA) fitted on stacked training instances, applied bag by bag.

    ``n_components=None`` skips PCA. ``n_components_`` is the number actually used.
    """

    def __init__(self, n_components: int | None = 100, scale: bool = True,
                 whiten: bool = False, random_state: int | None = 0) -> None:
        self.n_components = n_components
        self.scale = scale
        self.whiten = whiten
        self.random_state = random_state

    def fit(self, bags: Sequence[np.ndarray], y=None) -> BagTransform:
        stacked = self._stack(bags)
        self.n_features_in_ = stacked.shape[1]
        self.scaler_ = StandardScaler(with_std=self.scale).fit(stacked)
        if self.n_components is None:
            self.pca_ = None
            self.n_components_ = stacked.shape[1]
            return self
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1 or None, got {self.n_components}")
        self.n_components_ = int(min(self.n_components, *stacked.shape))
        self.pca_ = PCA(n_components=self.n_components_, whiten=self.whiten,
                        random_state=self.random_state).fit(self.scaler_.transform(stacked))
        return self

    def transform(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        check_is_fitted(self, "scaler_")
        sizes = [len(b) for b in bags]
        stacked = self._stack(bags)
        if stacked.shape[1] != self.n_features_in_:
            raise ValueError(f"bags have {stacked.shape[1]} features, fitted on "
                             f"{self.n_features_in_}")
        out = self.scaler_.transform(stacked)
        if self.pca_ is not None:
            out = self.pca_.transform(out)
        return np.split(out, np.cumsum(sizes)[:-1])

    def fit_transform(self, bags: Sequence[np.ndarray], y=None) -> list[np.ndarray]:
        return self.fit(bags).transform(bags)

    @staticmethod
    def _stack(bags: Sequence[np.ndarray]) -> np.ndarray:
        if len(bags) == 0:
            raise ValueError("no bags given")
        arrays = [np.asarray(b, dtype=np.float64) for b in bags]
        for index, bag in enumerate(arrays):
            if bag.ndim != 2 or len(bag) == 0:
                raise ValueError(f"bag {index} must be a non-empty 2-D array, got {bag.shape}")
        return np.vstack(arrays)

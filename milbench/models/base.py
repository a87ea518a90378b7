"""The bag-classifier contract shared by every model (see docs/architecture.md).

A bag is a ``(n_i, d)`` float array of instance feature vectors; ``bags`` is a list of them
(sizes may differ). ``clinical`` is an optional table aligned with the bags whose columns are
``CLINICAL_COLUMNS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import StratifiedKFold
from sklearn.utils import Tags, get_tags
from sklearn.utils.validation import check_is_fitted

from milbench.core.clinical import CLINICAL_COLUMNS
from milbench.models.registry import Tag
from milbench.models.reuse import fit_model


def check_bags(bags: Sequence[np.ndarray], *, allow_empty_features: bool = False) -> list[np.ndarray]:
    """Validate and convert bags to a list of 2-D float64 arrays; clear errors name the bag."""
    if isinstance(bags, np.ndarray) and bags.ndim == 2:
        raise TypeError("bags must be a list of 2-D arrays (one per bag), not one 2-D array")
    checked = []
    width = None
    for index, bag in enumerate(bags):
        array = np.asarray(bag, dtype=np.float64)
        if array.ndim != 2:
            raise ValueError(f"bag {index} must be 2-D (instances x features), got shape {array.shape}")
        if array.shape[0] == 0:
            raise ValueError(f"bag {index} has no instances")
        if array.shape[1] == 0 and not allow_empty_features:
            raise ValueError(f"bag {index} has no features")
        if width is not None and array.shape[1] != width:
            raise ValueError(f"bag {index} has {array.shape[1]} features, earlier bags have {width}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"bag {index} contains NaN or infinite values")
        width = array.shape[1]
        checked.append(array)
    if not checked:
        raise ValueError("no bags given")
    return checked


def check_clinical(clinical, n_bags: int) -> np.ndarray:
    """Return the clinical table as an ``(n_bags, len(CLINICAL_COLUMNS))`` float array."""
    if clinical is None:
        raise ValueError(f"this model needs the clinical table (columns {list(CLINICAL_COLUMNS)})")
    if isinstance(clinical, pd.DataFrame):
        missing = [c for c in CLINICAL_COLUMNS if c not in clinical.columns]
        if missing:
            raise ValueError(f"clinical table lacks columns {missing}")
        clinical = clinical.loc[:, list(CLINICAL_COLUMNS)]
    array = np.asarray(clinical, dtype=np.float64)
    if array.ndim != 2 or array.shape != (n_bags, len(CLINICAL_COLUMNS)):
        raise ValueError(
            f"clinical table must have shape ({n_bags}, {len(CLINICAL_COLUMNS)}), got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("clinical table contains NaN or infinite values")
    return array


def check_binary_labels(y) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(labels.tolist()))}")
    if len(np.unique(labels)) < 2:
        raise ValueError("training labels contain a single class; need both 0 and 1")
    return labels.astype(int)


NO_FEATURES = "none"  # the view key of zero-width bags, for models that read no instances


class BagViews(Sequence):
    """The same patients' bags under several feature extractors, for ensembles whose members
    read different features. It behaves as the bag list of its ``default`` view (length,
    indexing, iteration); ``view(key)`` gives another extractor's list, and :func:`take_bags`
    keeps every view. ``views`` maps a features key (``models.spec.features_key``) to bags."""

    def __init__(self, views: dict[str, list[np.ndarray]], default: str):
        if default not in views:
            raise KeyError(f"no feature view {default!r}; have {sorted(views)}")
        self.views, self.default = views, default

    def view(self, key: str | None) -> list[np.ndarray]:
        """The bags of features ``key`` (None: the default view)."""
        key = self.default if key is None else key
        if key not in self.views:
            raise KeyError(f"no feature view {key!r}; have {sorted(self.views)}")
        return self.views[key]

    def rebased(self, key: str | None) -> BagViews:
        """The same views with ``key`` as the default (None: unchanged)."""
        return self if key is None else BagViews(self.views, key)

    def take(self, positions) -> BagViews:
        return BagViews({key: [bags[i] for i in positions] for key, bags in self.views.items()},
                        self.default)

    def __len__(self) -> int:
        return len(self.views[self.default])

    def __getitem__(self, index):
        return self.views[self.default][index]


def take_bags(bags: Sequence[np.ndarray], positions) -> list[np.ndarray] | BagViews:
    """The bags at ``positions`` (a fold's patients), in that order (every view of
    :class:`BagViews`)."""
    if isinstance(bags, BagViews):
        return bags.take(positions)
    return [bags[i] for i in positions]


def take_clinical(clinical, positions):
    """The clinical rows at ``positions`` (a table or an array; ``None`` stays ``None``)."""
    if clinical is None:
        return None
    if isinstance(clinical, pd.DataFrame):
        return clinical.iloc[positions]
    return np.asarray(clinical)[positions]


def store_params(estimator, arguments: dict[str, Any]) -> None:
    """Store a constructor's arguments unchanged under their own names, as scikit-learn's
    ``get_params`` and ``clone`` expect; called as ``store_params(self, locals())`` first thing in
    ``__init__``, so the signature alone declares the parameters."""
    for name, value in arguments.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


def with_seed(model, seed):
    """``model`` with ``random_state=seed`` where it takes one (returned for chaining)."""
    if "random_state" in model.get_params():
        model.set_params(random_state=seed)
    return model


def inner_folds(labels: np.ndarray, n_splits: int, random_state, owner: str):
    """Stratified inner folds over training bags (at most one per bag of the rarer class), for
    models that fit parts of their own training data; ``owner`` names the model in the error."""
    n_splits = min(int(n_splits), int(np.bincount(labels, minlength=2).min()))
    if n_splits < 2:
        raise ValueError(f"{owner} needs at least 2 bags of each class for its inner folds")
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(labels)), labels))


@dataclass
class FoldFit:
    """One fold: the fitted estimator and its predictions for the fold's held-out rows."""

    estimator: object
    scores: np.ndarray  # P(label 1)
    predictions: np.ndarray
    fit_seconds: float

    @property
    def history(self) -> list[dict] | None:
        return getattr(self.estimator, "history_", None)


def fit_fold(model, bags, labels: np.ndarray, train: list[int], val: list[int],
             clinical: pd.DataFrame | None = None, seed: int | None = None) -> FoldFit:
    """Fit a fresh clone of ``model`` (given ``random_state=seed`` where it takes one, unless
    ``seed`` is None) on rows ``train`` and predict rows ``val``. Only the training rows' labels
    reach ``fit``. This is the project's one fold runner: the run's, the ablation's and the
    benchmarks' cross-validation and ``inner_cv``'s inner folds all fit through it."""
    estimator = clone(model) if seed is None else with_seed(clone(model), seed)
    started = time.perf_counter()
    estimator = fit_model(estimator, take_bags(bags, train), np.asarray(labels)[train],
                          take_clinical(clinical, train))
    fit_seconds = time.perf_counter() - started
    val_bags, val_clinical = take_bags(bags, val), take_clinical(clinical, val)
    return FoldFit(estimator, estimator.predict_proba(val_bags, val_clinical)[:, 1],
                   estimator.predict(val_bags, val_clinical), fit_seconds)


def out_of_fold(folds, predict_fold: Callable[[int, np.ndarray, np.ndarray], Any]):
    """Each row's output from the fold that held it out, in row order. ``predict_fold(index,
    train, val)`` fits on the ``train`` rows and returns one output per ``val`` row (an array
    or a DataFrame). The one helper behind every model that fits parts of its own training
    data (the stacker's members, MI-SVM's calibration, cluster/EMD's bag features)."""
    parts, positions = [], []
    for index, (train, val) in enumerate(folds):
        parts.append(predict_fold(index, train, val))
        positions.append(val)
    order = np.argsort(np.concatenate(positions))
    if isinstance(parts[0], pd.DataFrame):
        return pd.concat(parts, ignore_index=True).iloc[order].reset_index(drop=True)
    return np.concatenate(parts)[order]


@dataclass
class BagTags(Tags):
    """scikit-learn's tags plus ``mil``: the ``Tag`` members a bag model reads and offers."""

    mil: frozenset[Tag] = frozenset()


def tags_of(model) -> frozenset[Tag]:
    """What ``model`` reads and offers (``Tag`` members), from its scikit-learn tags: its
    class's ``mil_tags``, plus the outputs that depend on its parameters or its fit. The one
    way the project asks a model what it can do."""
    tags = get_tags(model)
    return tags.mil if isinstance(tags, BagTags) else frozenset()


def has_capability(model, tag: Tag) -> bool:
    """Whether ``model`` carries ``tag`` (see :func:`tags_of`)."""
    return tag in tags_of(model)


class BagClassifier(ClassifierMixin, BaseEstimator):
    """Base for bag models, a template: ``fit`` checks the parameters (``_validate_params``),
    the labels and the bags (``_check_fit_bags``: instance-vector bags by default, which also
    sets ``n_features_in_``), then calls the model's ``_fit(bags, labels, clinical)`` and sets
    ``classes_``. ``predict`` thresholds ``predict_proba`` at 0.5 (models that need another cut
    calibrate their probabilities instead). Subclasses implement ``_fit`` and ``predict_proba``
    and declare ``mil_tags``: what they read (``Tag.CLINICAL``, ``Tag.INSTANCES``,
    ``Tag.IMAGES`` ...) and the optional outputs they implement (``Tag.INSTANCE_SCORES``,
    ``Tag.BAG_FEATURES``), as one literal in the class body, which the registry reads without
    importing the model. Outputs that depend on parameters or on the fit are added by
    overriding ``_instance_tags``."""

    mil_tags: frozenset[Tag] = frozenset()

    def fit(self, bags, y, clinical=None):
        """Fit on a list of bags, 0/1 labels and (where the model reads it) the clinical table."""
        self._validate_params()
        labels = check_binary_labels(y)
        bags = self._check_fit_bags(bags)
        if len(bags) != len(labels):
            raise ValueError(f"{len(bags)} bags but {len(labels)} labels")
        self._fit(bags, labels, clinical)
        self.classes_ = np.array([0, 1])
        return self

    def _validate_params(self) -> None:
        """Raise on a bad parameter value before any work (models override)."""

    def _check_fit_bags(self, bags):
        """Instance-vector bags, checked; models that read no instances, or other bags, override."""
        bags = check_bags(bags)
        self.n_features_in_ = bags[0].shape[1]
        return bags

    def _fit(self, bags, labels: np.ndarray, clinical) -> None:
        raise NotImplementedError

    def __sklearn_tags__(self) -> BagTags:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return BagTags(**{f.name: getattr(tags, f.name) for f in fields(tags)},
                       mil=frozenset(type(self).mil_tags) | self._instance_tags())

    def _instance_tags(self) -> frozenset[Tag]:
        """Tags this instance adds to its class's (never raises: scikit-learn asks the tags of
        unfitted estimators too)."""
        return frozenset()

    def _check_predict_bags(self, bags) -> list[np.ndarray]:
        """Bags to predict on: the model is fitted and they have its training feature width."""
        check_is_fitted(self)
        bags = check_bags(bags)
        if bags[0].shape[1] != self.n_features_in_:
            raise ValueError(
                f"bags have {bags[0].shape[1]} features, the model was fitted on {self.n_features_in_}"
            )
        return bags

    def predict(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        proba = self.predict_proba(bags, clinical)[:, 1]
        return (proba >= 0.5).astype(int)

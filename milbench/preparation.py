"""A run's data, ready for models: the cohort (a configured challenge folder or a generated,
cached synthetic cohort), its training and test bags from the feature store, labels, clinical
tables, the source set of models that bootstrap from one, and the hidden test labels of a
synthetic cohort. Used by every command that trains (run, ablate, the benches)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.config import ConfigError, RunConfig
from milbench.data import Cohort, load_challenge
from milbench.data_roots import resolve_data_root
from milbench.evaluation.splits import stratification_keys
from milbench.models.base import NO_FEATURES, BagViews
from milbench.models.registry import Tag, model_tags
from milbench.models.spec import ModelSpec
from milbench.preflight import PATHS, key_of, preflight, required_views
from milbench.progress import StageTimer
from milbench.source_set import attach_source_features

log = logging.getLogger(__name__)


def feature_store(cohort: Cohort, extractor: dict, config: RunConfig, progress: bool = True,
                  map_tasks=None):
    """The feature store of every cohort image (train and test) under ``extractor``, computed
    once and cached under the work directory. An autoencoder extractor trains on all images,
    test images included (unsupervised; its manifest records ``uses_test_images``)."""
    from preprocessing.extract import extract_features

    return extract_features(cohort, extractor, Path(config.workdir) / "cache", seed=config.seed,
                            progress=progress, batch_size=config.features.batch_size,
                            device=config.features.device, shards=config.features.shards,
                            map_tasks=map_tasks)


@dataclass
class FeatureView:
    """One extractor's bags of the run's patients."""

    key: str
    extractor: dict | str  # the mapping ("none": zero-width bags)
    manifest: dict  # the feature store manifest ({} for "none")
    train_bags: list[np.ndarray]
    test_bags: list[np.ndarray]
    models: list[str]  # the models (and members) that read it

    @property
    def name(self) -> str:
        if not isinstance(self.extractor, dict):
            return str(self.extractor)
        return str(self.extractor.get("name") or self.extractor.get("kind") or self.key)


@dataclass
class PreparedData:
    """A config's data, ready for models: bags under every extractor the models read, labels,
    clinical tables. ``train_bags`` / ``test_bags`` are the run's ``features.extractor`` view;
    :meth:`bags_for` gives the bags a given model reads."""

    root: Path
    cohort: Cohort
    train: Cohort
    test: Cohort
    train_bags: list[np.ndarray]
    test_bags: list[np.ndarray]
    labels: np.ndarray
    train_clinical: pd.DataFrame
    test_clinical: pd.DataFrame
    features: dict  # the run extractor's feature store manifest ({} without instance features)
    config: RunConfig  # the config prepared, source features attached (see source_set)
    views: dict[str, FeatureView] = field(default_factory=dict)
    default_key: str = NO_FEATURES

    def bags_for(self, spec: ModelSpec) -> tuple[list | BagViews, list | BagViews]:
        """(training bags, test bags) that ``spec`` reads: its own features' view, else the
        run's; an ensemble gets every view (:class:`BagViews`), its default its own."""
        key = self._key(spec)
        if Tag.ENSEMBLE in model_tags(spec.name):
            return tuple(BagViews({k: getattr(v, part) for k, v in self.views.items()}, key)
                         for part in ("train_bags", "test_bags"))
        view = self.views[key]
        return view.train_bags, view.test_bags

    def features_of(self, spec: ModelSpec) -> str:
        """The name of the features ``spec`` reads (ensembles: their default view's)."""
        return self.views[self._key(spec)].name

    def feature_records(self, spec: ModelSpec) -> dict[str, dict]:
        """What ``spec``'s fitted model read, per view key: the extractor settings and the
        feature store's key (ensembles: every view, as their bags hold every view)."""
        keys = (list(self.views) if Tag.ENSEMBLE in model_tags(spec.name)
                else [self._key(spec)])
        return {key: {"name": self.views[key].name, "extractor": self.views[key].extractor,
                      "store_key": self.views[key].manifest.get("key"),
                      "resolved": self.views[key].manifest.get("config"),
                      "default": key == self._key(spec)} for key in keys}

    def _key(self, spec: ModelSpec) -> str:
        if not spec.reads_instances:
            return NO_FEATURES  # zero-width bags, shared with ensembles' clinical members
        key = spec.features_key or self.default_key
        return key if key in self.views else NO_FEATURES


def image_path_bags(cohort: Cohort) -> list[np.ndarray]:
    """One bag per patient: its image paths (``features: {kind: paths}``)."""
    return [np.array([str(path) for path in p.image_paths], dtype=object) for p in cohort.patients]


def prepare_data(config: RunConfig, progress: bool = True,
                 timer: StageTimer | None = None, map_tasks=None) -> PreparedData:
    """Cohort, bags under every extractor a model reads (each computed once) and clinical
    tables for ``config``; ``.config`` is ``config`` with the source features attached
    (``config`` itself is left as it is). ``map_tasks`` (an executor's
    ``map``) runs the shards of a sharded extraction (``features.shards``)."""
    timer = timer or StageTimer()
    preflight(config)  # before any data is read
    with timer.stage("data"):
        root = resolve_data_root(config.data, config.workdir, progress)
        cohort = load_challenge(root, config.data.reference_date, config.data.strict_images)
    train, test = cohort.train(), cohort.test()
    if len(train) == 0:
        raise ConfigError(f"{root}: no training patients")
    with timer.stage("source features"):
        config = attach_source_features(config, progress)
    views = {}
    for key, (extractor, models) in required_views(config).items():
        if extractor == NO_FEATURES:
            views[key] = FeatureView(key, NO_FEATURES, {},
                                     [np.zeros((p.n_images, 0)) for p in train.patients],
                                     [np.zeros((p.n_images, 0)) for p in test.patients], models)
            continue
        if extractor.get("kind") == PATHS:  # the images themselves, for end-to-end models
            views[key] = FeatureView(key, extractor, {"config": dict(extractor), "dim": 0},
                                     image_path_bags(train), image_path_bags(test), models)
            continue
        name = extractor.get("name") or extractor.get("kind")
        with timer.stage(f"instance features {name}" if len(views) > 1 else "instance features"):
            try:
                store = feature_store(cohort, extractor, config, progress, map_tasks)
            except (ValueError, OSError, RuntimeError) as error:
                raise ConfigError(f"extractor {name!r} (models {models}) failed: {error}") from error
        views[key] = FeatureView(key, extractor, store.manifest, store.bags(train),
                                 store.bags(test), models)
    default = views.get(key_of(config.features.extractor), views[NO_FEATURES])
    return PreparedData(
        root=root, cohort=cohort, train=train, test=test, train_bags=default.train_bags,
        test_bags=default.test_bags, labels=train.labels(), train_clinical=train.clinical_table(),
        test_clinical=test.clinical_table(), features=default.manifest, config=config, views=views,
        default_key=default.key,
    )


def data_key(config: RunConfig) -> str:
    """What a config's data preparation depends on (its models only through what they read)."""
    return config.model_dump_json(include={"seed", "data", "features", "source", "workdir", "models"})


@lru_cache(maxsize=4)
def _prepared_from_key(key: str) -> PreparedData:
    return prepare_data(RunConfig.model_validate_json(key), progress=False)


def worker_data(config: RunConfig) -> PreparedData:
    """``config``'s prepared data where a task runs (a worker process or a Ray worker), prepared
    once per distinct data setting in each worker. The driver prepares first, so that workers
    only read finished feature stores (two extracting into one store would collide)."""
    return _prepared_from_key(data_key(config))


def stratification(config: RunConfig, train: Cohort, min_size: int) -> np.ndarray:
    return stratification_keys(
        train.frame(), tuple(config.evaluation.stratify), config.evaluation.age_threshold,
        config.evaluation.count_threshold, min_size=min_size,
    )

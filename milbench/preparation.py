"""A run's data, ready for models: the cohort (a configured challenge folder or a generated,
cached synthetic cohort), its training and test bags from the feature store, labels, clinical
tables, the source set of models that bootstrap from one, and the hidden test labels of a
synthetic cohort. Used by every command that trains (run, ablate, the benches)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.config import ConfigError, DataConfig, RunConfig
from milbench.data import Cohort, load_challenge
from milbench.evaluation.splits import stratification_keys
from milbench.models.spec import constructor_parameters
from milbench.progress import StageTimer

log = logging.getLogger(__name__)


def synthetic_cohort_path(data: DataConfig, workdir: str | Path) -> Path:
    """Where the configured synthetic cohort is cached: named by preset and seed, plus a hash of
    the knobs when any is overridden (every knob is part of the key)."""
    synthetic = data.synthetic
    name = f"synthetic-{synthetic.preset}-seed{synthetic.seed}"
    if synthetic.knobs:
        digest = hashlib.sha256(json.dumps(synthetic.knobs, sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:10]}"
    return Path(workdir) / "data" / name


def resolve_data_root(data: DataConfig, workdir: str | Path, progress: bool = True) -> Path:
    """The challenge folder to read: the configured one, or a generated synthetic cohort (cached
    under the work directory and reused when its manifest matches)."""
    if data.root is not None:
        return Path(data.root)
    from milbench.synth import GENERATOR_VERSION, generate_cohort, read_manifest

    synthetic = data.synthetic
    path = synthetic_cohort_path(data, workdir)
    if path.exists():
        manifest = read_manifest(path) or {}
        wanted = {"preset": synthetic.preset, "seed": synthetic.seed,
                  "knobs": json.loads(json.dumps(synthetic.knobs)),
                  "generator_version": GENERATOR_VERSION}
        found = {key: manifest.get(key) for key in wanted}
        if found != wanted:
            differing = sorted(k for k in wanted if found[k] != wanted[k])
            raise ConfigError(f"{path} exists but is not the synthetic cohort the config asks for "
                              f"(differs in {differing}); remove it to regenerate")
        log.info("reusing synthetic cohort %s", path)
        return path
    log.info("generating synthetic %s cohort in %s", synthetic.preset, path)
    generate_cohort(path, preset=synthetic.preset, seed=synthetic.seed, knobs=synthetic.knobs,
                    workers=2, progress=progress)
    return path


def feature_store(cohort: Cohort, config: RunConfig, progress: bool = True):
    """The feature store of every cohort image (train and test) under the configured extractor,
    computed once and cached under the work directory. An autoencoder extractor trains on all
    images, test images included (unsupervised; its manifest records ``uses_test_images``)."""
    from preprocessing.extract import extract_features

    return extract_features(cohort, config.features.extractor, Path(config.workdir) / "cache",
                            seed=config.seed, progress=progress, batch_size=config.features.batch_size,
                            device=config.features.device)


@dataclass
class PreparedData:
    """A config's data, ready for models: training and test bags, labels, clinical tables."""

    root: Path
    cohort: Cohort
    train: Cohort
    test: Cohort
    train_bags: list[np.ndarray]
    test_bags: list[np.ndarray]
    labels: np.ndarray
    train_clinical: pd.DataFrame
    test_clinical: pd.DataFrame
    features: dict  # the feature store manifest ({} without instance features)


def resolve_source_root(config: RunConfig, progress: bool = True) -> Path:
    """The ALL-IDB2-layout source set: the configured one, or a synthetic one generated once."""
    source = config.source
    if source.root is not None:
        return Path(source.root)
    from milbench.synth import generate_allidb2

    path = Path(config.workdir) / "data" / f"allidb2-seed{source.seed}-n{source.n_per_class}"
    if not path.exists():
        generate_allidb2(path, seed=source.seed, n_per_class=source.n_per_class, progress=progress)
    return path


def attach_source_features(config: RunConfig, progress: bool = True) -> None:
    """Give every model that learns from an instance-labelled source set (it has a
    ``source_features`` parameter left empty) the source's features, computed with the run's
    extractor. Cohort and source images are stain-matched to the source set (seed 001 §4), which
    changes the features of every model of the run; the resolved config records it."""
    needing = [e for e in config.models if "source_features" in constructor_parameters(e.name)
               and not e.params.get("source_features")]
    if not needing:
        return
    names = [e.display_name for e in needing]
    if config.source is None:
        raise ConfigError(f"models {names} learn from an instance-labelled source set: add a "
                          "`source:` section (root: null generates a synthetic ALL-IDB2 set)")
    if config.features.extractor == "none":
        raise ConfigError(f"models {names} need backbone features: set features.extractor")
    from milbench.semisup.source import prepare_source_features, source_stain

    root = resolve_source_root(config, progress)
    config.features.extractor = {**config.features.extractor,
                                 "stain": source_stain(root, config.source.stain_space)}
    path = prepare_source_features(root, config.features.extractor, Path(config.workdir) / "cache",
                                   seed=config.seed, progress=progress)
    for entry in needing:
        entry.params["source_features"] = str(path)


def prepare_data(config: RunConfig, progress: bool = True,
                 timer: StageTimer | None = None) -> PreparedData:
    """Cohort, bags and clinical tables for ``config`` (source features attached in place)."""
    timer = timer or StageTimer()
    for entry in config.models:  # before any data is read
        if entry.reads_instances and config.features.extractor == "none":
            raise ConfigError(f"model {entry.display_name!r} reads instance features; set "
                              "features.extractor")
    with timer.stage("data"):
        root = resolve_data_root(config.data, config.workdir, progress)
        cohort = load_challenge(root, config.data.reference_date, config.data.strict_images)
    train, test = cohort.train(), cohort.test()
    if len(train) == 0:
        raise ConfigError(f"{root}: no training patients")
    with timer.stage("source features"):
        attach_source_features(config, progress)
    if config.features.extractor == "none":
        # Zero-width bags (one row per image) for models that read only the clinical table.
        train_bags = [np.zeros((p.n_images, 0)) for p in train.patients]
        test_bags = [np.zeros((p.n_images, 0)) for p in test.patients]
        manifest = {}
    else:
        with timer.stage("instance features"):
            store = feature_store(cohort, config, progress)
            train_bags, test_bags, manifest = store.bags(train), store.bags(test), store.manifest
    return PreparedData(
        root=root, cohort=cohort, train=train, test=test, train_bags=train_bags, test_bags=test_bags,
        labels=train.labels(), train_clinical=train.clinical_table(),
        test_clinical=test.clinical_table(), features=manifest,
    )


def hidden_test_labels(root: Path, test_ids: list[str]) -> np.ndarray | None:
    """Test labels of a synthetic cohort (its hidden truth), for scoring after prediction only;
    None for real challenge folders, which have no truth."""
    if not (root / "truth" / "test_labels.csv").is_file() or not test_ids:
        return None
    from milbench.synth import load_truth

    labels = load_truth(root).test_labels
    missing = [pid for pid in test_ids if pid not in labels]
    if missing:
        raise ConfigError(f"{root}/truth/test_labels.csv lacks test patients {missing[:10]}")
    return np.array([labels[pid] for pid in test_ids])


def stratification(config: RunConfig, train: Cohort, min_size: int) -> np.ndarray:
    return stratification_keys(
        train.frame(), tuple(config.evaluation.stratify), config.evaluation.age_threshold,
        config.evaluation.count_threshold, min_size=min_size,
    )



"""A run's data, ready for models: the cohort (a configured challenge folder or a generated,
cached synthetic cohort), its training and test bags from the feature store, labels, clinical
tables, the source set of models that bootstrap from one, and the hidden test labels of a
synthetic cohort. Used by every command that trains (run, ablate, the benches)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.config import ConfigError, DataConfig, RunConfig
from milbench.data import Cohort, load_challenge
from milbench.evaluation.splits import stratification_keys
from milbench.models.base import NO_FEATURES, BagViews
from milbench.models.registry import Tag, model_class, model_tags
from milbench.models.spec import ModelSpec, constructor_parameters, features_key
from milbench.progress import StageTimer

log = logging.getLogger(__name__)


def check_generated(path: Path, what: str) -> None:
    """Refuse a generated directory whose files changed since it was written (naming them);
    one made before checksums were recorded is reused with a logged warning."""
    from milbench.synth.layout import verify_generated

    problems = verify_generated(path)
    if problems is None:
        log.warning("%s %s records no checksums (made by an older milbench); reusing it "
                    "unchecked", what, path)
    elif problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise ConfigError(f"{path}: the {what} was changed since it was written ({shown}); "
                          "remove it to regenerate")


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
        check_generated(path, "generated cohort")
        log.info("reusing synthetic cohort %s", path)
        return path
    log.info("generating synthetic %s cohort in %s", synthetic.preset, path)
    generate_cohort(path, preset=synthetic.preset, seed=synthetic.seed, knobs=synthetic.knobs,
                    workers=2, progress=progress)
    return path


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
    views: dict[str, FeatureView] = field(default_factory=dict)
    default_key: str = NO_FEATURES

    def bags_for(self, spec: ModelSpec) -> tuple[list | BagViews, list | BagViews]:
        """(training bags, test bags) that ``spec`` reads: its own features' view, else the
        run's; an ensemble gets every view (:class:`BagViews`), its default its own."""
        key = self._key(spec)
        if Tag.ENSEMBLE.value in model_tags(spec.name):
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
        keys = (list(self.views) if Tag.ENSEMBLE.value in model_tags(spec.name)
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


def _walk(spec: ModelSpec, inherited, visit, top: ModelSpec) -> ModelSpec:
    """Visit every model of ``spec`` with the features it reads (its own, else ``inherited``):
    ``visit(spec, features, top)`` returns the spec to keep. Ensembles' listed members are
    walked too, and rewritten when a visit changed one."""
    features = spec.features if spec.features is not None else inherited
    members = spec.params.get("members")
    if Tag.ENSEMBLE.value in model_tags(spec.name) and isinstance(members, list | tuple):
        coerced = [ModelSpec.coerce(m) for m in members]
        walked = [_walk(m, features, visit, top) for m in coerced]
        if walked != coerced:
            spec = spec.model_copy(update={"params": {**spec.params, "members": [
                m.model_dump(exclude_defaults=True) for m in walked]}})
    return visit(spec, features, top)


def walk_models(config: RunConfig, visit) -> None:
    """Apply :func:`_walk` to every model of the run (in place)."""
    config.models = [_walk(spec, config.features.extractor, visit, spec) for spec in config.models]


def _reads_own_instances(spec: ModelSpec) -> bool:
    """Reads instance features itself (not only through ensemble members)."""
    return spec.reads_instances and Tag.ENSEMBLE.value not in model_tags(spec.name)


def check_features(config: RunConfig) -> list[str]:
    """Problems of the models' features, naming the model: instance features read but none set,
    or an extractor setting that cannot work (unknown kind, backbone, segmentation ...)."""
    from preprocessing.extract import ExtractorConfig

    problems, checked = [], set()

    def visit(spec, features, top):
        through = "" if spec is top else f" (its member {spec.display_name!r})"
        if _reads_own_instances(spec) and features == NO_FEATURES:
            problems.append(f"model {top.display_name!r}{through} reads instance features; set "
                            "features.extractor or the model's features")
        elif (_reads_own_instances(spec) and getattr(model_class(spec.name), "bag_kind", None)
              == "pixels" and not (isinstance(features, dict) and features.get("kind") == "pixels")):
            problems.append(f"model {top.display_name!r}{through} trains on the images: set its "
                            "features to a pixels store, e.g. {kind: pixels, input_size: 64}")
        elif (_reads_own_instances(spec) and isinstance(features, dict)
              and features.get("kind") != PATHS and _key_of(features) not in checked):
            checked.add(_key_of(features))
            try:
                ExtractorConfig.from_dict(features)
            except (ValueError, TypeError, FileNotFoundError) as error:
                problems.append(f"model {top.display_name!r}{through}: features: {error}")
        return spec
    walk_models(config, visit)
    return problems


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot take new files (None when it can). Nothing is created: a probe
    file is written and removed in the folder, or in its nearest existing ancestor."""
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{folder}: cannot be created ({existing} is not a folder)"
    try:
        probe = existing / f".milbench-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return f"{folder}: cannot write there ({error.strerror or error})"
    return None


def _image_count(config: RunConfig) -> int | None:
    """Images of the configured data folder, or of an already generated synthetic cohort."""
    root = (Path(config.data.root) if config.data.root is not None
            else synthetic_cohort_path(config.data, config.workdir))
    if not root.is_dir():
        return None
    return sum(1 for path in root.rglob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _store_bytes(config: RunConfig, n_images: int) -> int:
    """What the feature stores this run would build take on disk: float32 matrices, plus the
    uint8 pixels store every extractor reads (one per distinct preprocessing)."""
    from preprocessing.backbones import SPECS
    from preprocessing.extract import ExtractorConfig

    stores: dict[str, int] = {}
    for key, (extractor, _) in _required_views(config).items():
        if key == NO_FEATURES or extractor.get("kind") == PATHS:
            continue
        settings = ExtractorConfig.from_dict(extractor)
        pixels = settings.pixels()  # every extractor reads the pixels store of its preprocessing
        stores[_key_of(pixels.to_dict())] = 3 * pixels.input_size ** 2
        if settings.kind == "backbone":
            stores[key] = SPECS[settings.name].dim * 4
        elif settings.kind == "autoencoder":
            stores[key] = settings.resolved_latent * 4
        elif settings.kind == "morphometry":
            from preprocessing.morphometry import DIM

            stores[key] = DIM * 4
    return n_images * sum(stores.values())


def preflight(config: RunConfig) -> None:
    """Everything that can be checked before the first expensive step, reported at once: the
    models' features and extractors, the data and source folders, write access to the work and
    submission folders, and free disk space for the feature stores (when the image count is
    known: a data folder, or a synthetic cohort generated earlier)."""
    problems = check_features(config)
    if config.data.root is not None:
        root = Path(config.data.root)
        if not root.is_dir():
            problems.append(f"data.root {root}: no such folder")
        elif not (root / "clinical_annotation.csv").is_file():
            problems.append(f"data.root {root}: no clinical_annotation.csv")
    if config.source is not None and config.source.root is not None:
        if not Path(config.source.root).is_dir():
            problems.append(f"source.root {config.source.root}: no such folder")
    folders = [("workdir", Path(config.workdir))]
    if config.submission.enabled:
        folders.append(("submission.dir", Path(config.submission.dir)))
    problems += [f"{name} {reason}" for name, folder in folders
                 if (reason := _unwritable(folder)) is not None]
    if not problems and (n_images := _image_count(config)):
        needed = _store_bytes(config, n_images)
        existing = next(p for p in (Path(config.workdir), *Path(config.workdir).absolute().parents)
                        if p.exists())
        free = shutil.disk_usage(existing).free
        if needed > free:
            problems.append(f"workdir {config.workdir}: {free / 1e9:.2f} GB free, the feature "
                            f"stores of this run need about {needed / 1e9:.2f} GB")
    if problems:
        raise ConfigError("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))


def resolve_source_root(config: RunConfig, progress: bool = True) -> Path:
    """The ALL-IDB2-layout source set: the configured one, or a synthetic one generated once."""
    source = config.source
    if source.root is not None:
        return Path(source.root)
    from milbench.synth import generate_allidb2

    path = Path(config.workdir) / "data" / f"allidb2-seed{source.seed}-n{source.n_per_class}"
    if not path.exists():
        generate_allidb2(path, seed=source.seed, n_per_class=source.n_per_class, progress=progress)
    else:
        check_generated(path, "generated source set")
    return path


PATHS = "paths"  # the extractor kind whose bags are image paths (models that read images)


def _full_mode(spec: ModelSpec) -> bool:
    """A model that fine-tunes a network on the images themselves (bags of paths)."""
    return spec.params.get("mode") == "full" and "source_root" in constructor_parameters(spec.name)


def _needs_source(spec: ModelSpec) -> bool:
    if _full_mode(spec):
        return not spec.params.get("source_root")
    return ("source_features" in constructor_parameters(spec.name)
            and not spec.params.get("source_features"))


def attach_source_features(config: RunConfig, progress: bool = True) -> None:
    """Give every model that learns from an instance-labelled source set (it has a
    ``source_features`` parameter left empty; ensemble members too) the source's features,
    computed with that model's extractor. The model's cohort and source images are
    stain-matched to the source set (as in the seed report): its ``features`` become its extractor plus
    the source stain, which the resolved config records; other models keep theirs."""
    needing = []
    walk_models(config, lambda spec, features, top: needing.append(spec) or spec)
    needing = [spec.display_name for spec in needing if _needs_source(spec)]
    if not needing:
        return
    if config.source is None:
        raise ConfigError(f"models {needing} learn from an instance-labelled source set: add a "
                          "`source:` section (root: null generates a synthetic ALL-IDB2 set)")
    from milbench.semisup.source import prepare_source_features, source_stain

    root = resolve_source_root(config, progress)
    stain = source_stain(root, config.source.stain_space)
    paths: dict[str, str] = {}

    def visit(spec, features, top):
        if not _needs_source(spec):
            return spec
        if _full_mode(spec):  # it reads the source images and matches their stain itself
            return spec.model_copy(update={"params": {**spec.params, "source_root": str(root)}})
        if not isinstance(features, dict) or features.get("kind") == PATHS:
            raise ConfigError(f"model {spec.display_name!r} learns from a source set and needs "
                              "backbone features: set features.extractor or the model's features")
        stained = {**features, "stain": stain}
        key = features_key(stained)
        if key not in paths:
            paths[key] = str(prepare_source_features(
                root, stained, Path(config.workdir) / "cache", seed=config.seed, progress=progress))
        return spec.model_copy(update={"features": stained,
                                       "params": {**spec.params, "source_features": paths[key]}})
    walk_models(config, visit)


def image_path_bags(cohort: Cohort) -> list[np.ndarray]:
    """One bag per patient: its image paths (``features: {kind: paths}``)."""
    return [np.array([str(path) for path in p.image_paths], dtype=object) for p in cohort.patients]


def _key_of(extractor: dict | str) -> str:
    return NO_FEATURES if extractor == NO_FEATURES else features_key(extractor)


def _required_views(config: RunConfig) -> dict[str, tuple[dict | str, list[str]]]:
    """Features key → (extractor, the models and members that read it): only extractors some
    model reads are computed."""
    views = {NO_FEATURES: (NO_FEATURES, [])}

    def visit(spec, features, top):
        if _reads_own_instances(spec):
            views.setdefault(_key_of(features), (features, []))[1].append(spec.display_name)
        return spec
    walk_models(config, visit)
    return views


def prepare_data(config: RunConfig, progress: bool = True,
                 timer: StageTimer | None = None, map_tasks=None) -> PreparedData:
    """Cohort, bags under every extractor a model reads (each computed once) and clinical
    tables for ``config`` (source features attached in place). ``map_tasks`` (an executor's
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
        attach_source_features(config, progress)
    views = {}
    for key, (extractor, models) in _required_views(config).items():
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
    default = views.get(_key_of(config.features.extractor), views[NO_FEATURES])
    return PreparedData(
        root=root, cohort=cohort, train=train, test=test, train_bags=default.train_bags,
        test_bags=default.test_bags, labels=train.labels(), train_clinical=train.clinical_table(),
        test_clinical=test.clinical_table(), features=default.manifest, views=views,
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



"""What a run's models read, and everything that can be checked before the first expensive
step: the walk over every model and ensemble member with the features it reads, the feature
views a run needs, and the preflight that reports every problem at once (features, folders,
write access, disk space)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from milbench.config import ConfigError, RunConfig
from milbench.data_roots import synthetic_cohort_path
from milbench.models.base import NO_FEATURES
from milbench.models.registry import Tag, model_tags
from milbench.models.spec import ModelSpec, features_key, walk_spec

PATHS = "paths"  # the extractor kind whose bags are image paths (models that read images)


def walk_models(config: RunConfig, visit) -> RunConfig:
    """``visit`` every model of the run and ensemble member (:func:`walk_spec`): a copy of
    ``config`` with the specs it returns; ``config`` itself is left as it is."""
    return config.model_copy(update={"models": [walk_spec(spec, config.features.extractor, visit, spec)
                                                for spec in config.models]})


def reads_own_instances(spec: ModelSpec) -> bool:
    """Reads instance features itself (not only through ensemble members)."""
    return spec.reads_instances and Tag.ENSEMBLE not in model_tags(spec.name)


def key_of(extractor: dict | str) -> str:
    return NO_FEATURES if extractor == NO_FEATURES else features_key(extractor)


def required_views(config: RunConfig) -> dict[str, tuple[dict | str, list[str]]]:
    """Features key → (extractor, the models and members that read it): only extractors some
    model reads are computed."""
    views = {NO_FEATURES: (NO_FEATURES, [])}

    def visit(spec, features, top):
        if reads_own_instances(spec):
            views.setdefault(key_of(features), (features, []))[1].append(spec.display_name)
        return spec
    walk_models(config, visit)
    return views


def check_features(config: RunConfig) -> list[str]:
    """Problems of the models' features, naming the model: instance features read but none set,
    or an extractor setting that cannot work (unknown kind, backbone, segmentation ...)."""
    from preprocessing.extract import ExtractorConfig

    problems, checked = [], set()

    def visit(spec, features, top):
        through = "" if spec is top else f" (its member {spec.display_name!r})"
        if reads_own_instances(spec) and features == NO_FEATURES:
            problems.append(f"model {top.display_name!r}{through} reads instance features; set "
                            "features.extractor or the model's features")
        elif (reads_own_instances(spec) and Tag.IMAGES in model_tags(spec.name)
              and not (isinstance(features, dict) and features.get("kind") == "pixels")):
            problems.append(f"model {top.display_name!r}{through} trains on the images: set its "
                            "features to a pixels store, e.g. {kind: pixels, input_size: 64}")
        elif (reads_own_instances(spec) and isinstance(features, dict)
              and features.get("kind") != PATHS and key_of(features) not in checked):
            checked.add(key_of(features))
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
    for key, (extractor, _) in required_views(config).items():
        if key == NO_FEATURES or extractor.get("kind") == PATHS:
            continue
        settings = ExtractorConfig.from_dict(extractor)
        pixels = settings.pixels()  # every extractor reads the pixels store of its preprocessing
        stores[key_of(pixels.to_dict())] = 3 * pixels.input_size ** 2
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

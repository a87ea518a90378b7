"""Extractor configs → feature stores: the one entry point the pipeline calls.

An extractor config is a small dict (or :class:`ExtractorConfig`)::

    {"kind": "autoencoder" | "backbone" | "pixels", "name": "resnet18", "weights": None,
     "input_size": 224, "segmentation": None | "kmeans_saturation" | ..., "background": 0,
     "stain": None | {"reference": "train" | "all" | <dir>, "space": "rgb" | "lab"},
     "latent": 8192, "epochs": 5, "train_batch_size": 32, "learning_rate": 1e-3}

``pixels`` stores the preprocessed image itself (uint8, flattened ``3 x S x S``). Every other
extractor reads the pixels store of its preprocessing instead of the image files, so JPEG
decoding, stain matching and segmentation run once per cohort and preprocessing: an autoencoder
trains on it for its epochs, then encodes it, and a backbone encodes it (its store is built by
loader workers on every core while nothing else runs, which on 2 cores beats one worker
feeding the network).

Its resolved form (defaults filled in, stain reference numbers computed, a weights file's
content hash, the autoencoder's training key) is canonical JSON and hashes, together with the
source files, into the store key (see :mod:`preprocessing.store`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from milbench.io import atomic_write, atomic_write_json, file_sha256
from preprocessing.forward import RowsInMemory, default_workers, run_model_into, shard_ranges
from preprocessing.preprocess import Preprocessor
from preprocessing.segmentation import VARIANTS
from preprocessing.stain import StainReference, image_set_paths, reference_from_images
from preprocessing.store import (
    FeatureStore,
    StoreIntegrityError,
    StoreWriter,
    exclusive,
    hash_key,
    source_table,
    store_key,
)

log = logging.getLogger(__name__)

KINDS = ("backbone", "autoencoder", "pixels", "morphometry", "selfsup")
# Extractors trained on the cohort: (resolved-config key of the training run, cache folder,
# weights file). A saved run keeps these weights to encode new patients (milbench.saved).
TRAINED_WEIGHTS = {"autoencoder": ("autoencoder_key", "autoencoders", "autoencoder.pt"),
                   "selfsup": ("selfsup_key", "selfsup", "encoder.pt")}
# What a pixels store depends on: the preprocessing chain, nothing learned.
PIXEL_KEYS = ("kind", "name", "input_size", "segmentation", "background", "stain")
DEFAULT_LATENT = {False: 8192, True: 4096}  # raw images / segmented images


@dataclass(frozen=True)
class ExtractorConfig:
    """What turns an image into a vector. Unknown keys in a dict are an error."""

    kind: str = "backbone"
    name: str = "resnet18"
    weights: str | None = None
    input_size: int = 224
    segmentation: str | None = None
    background: int = 0
    stain: Mapping[str, Any] | None = None
    latent: int | None = None
    epochs: int = 5
    train_batch_size: int = 32
    learning_rate: float = 1e-3

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ExtractorConfig) -> ExtractorConfig:
        if isinstance(data, ExtractorConfig):
            return data
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown extractor config keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        if data.get("kind") == "pixels":
            data.setdefault("name", "pixels")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        from preprocessing.backbones import list_backbones

        if self.kind not in KINDS:
            raise ValueError(f"extractor kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "backbone" and self.name not in list_backbones():
            raise ValueError(f"unknown backbone {self.name!r}; choose from {list_backbones()}")
        if self.kind == "backbone" and self.weights is not None:
            from preprocessing.backbones import check_weights

            check_weights(self.name, self.weights)
        if self.segmentation is not None and self.segmentation not in VARIANTS:
            raise ValueError(f"unknown segmentation {self.segmentation!r}; "
                             f"choose from {sorted(VARIANTS)}")
        if self.kind == "morphometry" and self.segmentation is None:
            raise ValueError("a morphometry extractor measures the segmented cell: it needs "
                             "segmentation (e.g. kmeans_saturation_hue)")
        if self.kind == "pixels" and self.name != "pixels":
            raise ValueError(f"a pixels extractor is named 'pixels', got name {self.name!r}")
        if self.kind in TRAINED_WEIGHTS and self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"{self.kind} weights {self.weights}: no such file (a trained "
                             f"{TRAINED_WEIGHTS[self.kind][2]}; null trains one on the cohort)")
        if self.kind == "autoencoder" and self.input_size % 16:
            raise ValueError(f"autoencoder input_size must be a multiple of 16, "
                             f"got {self.input_size}")
        if self.stain is not None and "reference" not in self.stain and "mean" not in self.stain:
            raise ValueError("stain config needs 'reference' (train, all or a directory) or "
                             "explicit 'mean' and 'std'")

    @property
    def resolved_latent(self) -> int:
        if self.latent is not None:
            return int(self.latent)
        return DEFAULT_LATENT[self.segmentation is not None]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["stain"] = dict(self.stain) if self.stain is not None else None
        return data

    def pixels(self) -> ExtractorConfig:
        """The pixels extractor of this config's preprocessing (what its images look like)."""
        return ExtractorConfig(kind="pixels", name="pixels", input_size=self.input_size,
                               segmentation=self.segmentation, background=self.background,
                               stain=self.stain)


def load_extractor_config(source: str | os.PathLike | Mapping[str, Any]) -> ExtractorConfig:
    """A config from a dict or a YAML file (``configs/features/*.yaml``)."""
    if isinstance(source, Mapping | ExtractorConfig):
        return ExtractorConfig.from_dict(source)
    import yaml

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"extractor config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"extractor config {path} must be a mapping")
    return ExtractorConfig.from_dict(data)


def resolve_stain(stain: Mapping[str, Any] | None, cohort, cache_dir: Path
                  ) -> StainReference | None:
    """Turn a stain config into numbers, caching references computed from image sets."""
    if stain is None:
        return None
    space = stain.get("space", "rgb")
    if "mean" in stain:
        return StainReference(space, tuple(stain["mean"]), tuple(stain["std"]),
                              source=str(stain.get("reference", "explicit")))
    name = str(stain["reference"])
    paths = image_set_paths(name, cohort)
    fingerprint = [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    cached = cache_dir / "stain" / f"{hash_key({'space': space, 'files': fingerprint})}.json"
    if cached.is_file():
        import json

        return StainReference.from_dict(json.loads(cached.read_text()))
    reference = reference_from_images(paths, space=space, source=name)
    atomic_write_json(cached, reference.to_dict())
    return reference


@dataclass
class Prepared:
    """Everything one extraction needs, resolved: model, preprocessing, store identity."""

    config: ExtractorConfig
    resolved: dict
    preprocessor: Preprocessor
    model: torch.nn.Module | None  # None for pixels: the preprocessed image is the row
    dim: int
    key: str
    sources: Any
    # The pixels store the model reads, built on first call (None: the pixels extractor itself,
    # which decodes the files): only an extraction with work to do pays for it.
    pixels: Callable[[], FeatureStore] | None = None
    pixels_key: str | None = None

    @property
    def dtype(self) -> str:
        return "uint8" if self.config.kind == "pixels" else "float32"


def _training_key(resolved: dict, sources) -> str:
    """What an extractor trained on the cohort depends on: its settings and the cohort's images."""
    return hash_key({"config": {k: v for k, v in resolved.items() if k not in {"name", "weights"}},
                     "sources": store_key({}, sources)})


def prepare(cohort, extractor_config, cache_dir: str | os.PathLike, *, seed: int = 0,
            progress: bool = True, num_workers: int | None = None,
            device: str = "cpu") -> Prepared:
    """Resolve a config against a cohort; trains the autoencoder (cached) if needed."""
    config = load_extractor_config(extractor_config)
    cache_dir = Path(cache_dir)
    sources = source_table(cohort.image_table())
    if len(sources) == 0:
        raise ValueError("cohort has no images to extract features from")
    stain = resolve_stain(config.stain, cohort, cache_dir)
    resolved = config.to_dict()
    resolved["stain"] = stain.to_dict() if stain is not None else None
    normalize = "imagenet" if config.kind == "backbone" else None
    preprocessor = Preprocessor(config.input_size, config.segmentation, config.background,
                                stain, normalize)
    if config.kind == "pixels":
        resolved = {name: resolved[name] for name in PIXEL_KEYS}
        return Prepared(config, resolved, preprocessor, None, 3 * config.input_size ** 2,
                        store_key(resolved, sources), sources)
    resolved["normalize"] = normalize
    # Part of the key: another device or torch build computes slightly different numbers.
    resolved["runtime"] = {"device": torch.device(device).type, "torch": torch.__version__,
                           "torchvision": torchvision.__version__}
    # Every extractor reads the preprocessed images from the pixels store of its preprocessing.
    pixels_key = prepare(cohort, config.pixels(), cache_dir).key

    def pixels() -> FeatureStore:
        return _extract_locked(cohort, config.pixels(), cache_dir, seed=seed, progress=progress,
                               batch_size=64, num_workers=num_workers, channels_last=False,
                               commit_seconds=2.0, on_batch=None, device=device)

    if config.kind == "morphometry":
        from preprocessing.morphometry import Morphometry

        model = Morphometry(config.background)
        dim = model.dim
    elif config.kind == "backbone":
        from preprocessing.backbones import build_backbone, is_weights_file

        if is_weights_file(config.weights):
            resolved["weights_sha256"] = file_sha256(config.weights)
        model = build_backbone(config.name, config.weights)
        dim = model.dim
    elif config.kind == "selfsup":
        from preprocessing.selfsup import fit_selfsup_encoder, load_encoder

        resolved["seed"] = seed
        resolved["pixels_key"] = pixels_key
        if config.weights is not None:  # a saved run's encoder: nothing is trained here
            resolved["weights_sha256"] = file_sha256(config.weights)
            model = load_encoder(config.weights)
        else:
            training_key = _training_key(resolved, sources)
            resolved["selfsup_key"] = training_key
            resolved["uses_test_images"] = True
            model = fit_selfsup_encoder(
                lambda: pixels().features(), cache_dir / "selfsup" / training_key,
                input_size=config.input_size, epochs=config.epochs,
                batch_size=config.train_batch_size, learning_rate=config.learning_rate,
                seed=seed, progress=progress,
                record={"config": resolved, "test_patients": [p.id for p in cohort.test().patients]})
        dim = model.dim
    elif config.weights is not None:
        # A trained autoencoder given by its weights (a saved run's, to encode new patients):
        # nothing is trained, so this cohort's images (test ones included) teach it nothing.
        from preprocessing.autoencoder import ConvAutoencoder, Encoder

        resolved["latent"] = config.resolved_latent
        resolved["weights_sha256"] = file_sha256(config.weights)
        autoencoder = ConvAutoencoder(config.input_size, config.resolved_latent)
        autoencoder.load_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True))
        model = Encoder(autoencoder.to(device).eval()).eval()
        dim = model.dim
    else:
        from preprocessing.autoencoder import Encoder, fit_cohort_autoencoder

        resolved["latent"] = config.resolved_latent
        resolved["seed"] = seed
        # Trained on the pixels store (its batches, hence its weights, differ from training on
        # decoded files): part of the training key.
        resolved["pixels_key"] = pixels_key
        training_key = _training_key(resolved, sources)
        resolved["autoencoder_key"] = training_key
        resolved["uses_test_images"] = True
        autoencoder = fit_cohort_autoencoder(
            lambda: pixels().features(), cache_dir / "autoencoders" / training_key,
            input_size=config.input_size, latent=config.resolved_latent, epochs=config.epochs,
            batch_size=config.train_batch_size, learning_rate=config.learning_rate, seed=seed,
            progress=progress, device=device,
            record={"config": resolved, "test_patients": [p.id for p in cohort.test().patients]})
        model = Encoder(autoencoder).eval()
        dim = model.dim
    key = store_key(resolved, sources)
    return Prepared(config, resolved, preprocessor, model, dim, key, sources, pixels, pixels_key)


def extract_features(
    cohort,
    extractor_config: Mapping[str, Any] | ExtractorConfig | str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 32,
    num_workers: int | None = None,
    channels_last: bool = True,
    commit_seconds: float = 2.0,
    on_batch: Callable[[int], None] | None = None,
    device: str = "cpu",
    shards: int = 1,
    map_tasks: Callable[[Callable, list[tuple]], Iterable[tuple[int, Any]]] | None = None,
) -> FeatureStore:
    """Features of every cohort image under ``extractor_config``, computed once and cached.

    With ``shards`` > 1 and ``map_tasks`` (an executor's ``map``: ``milbench.execution``), the
    model's forward pass over the rows is split into that many parts, run as tasks (Ray GPU
    workers, say) that each write a part file next to the store; this process then merges the
    parts into the store and only then marks it complete. A part already written is kept, so
    an interrupted sharded extraction resumes. Parts start on multiples of ``batch_size``:
    every batch is the one a serial extraction forms, so the store is the same.

    Returns the complete :class:`FeatureStore` at ``<cache_dir>/features/<key>``; an existing
    complete store is returned without work, an interrupted one is resumed, losing at most
    ``commit_seconds`` of work. ``on_batch`` is called after each batch with the number of
    committed (durable) rows (progress hooks, tests).
    """
    # One extraction per cache folder at a time, across processes: a concurrent run waits,
    # then finds the store complete and reuses it.
    with exclusive(Path(cache_dir) / "extraction.lock", "building features in this cache"):
        return _extract_locked(cohort, extractor_config, cache_dir, seed=seed, progress=progress,
                               batch_size=batch_size, num_workers=num_workers,
                               channels_last=channels_last, commit_seconds=commit_seconds,
                               on_batch=on_batch, device=device, shards=shards,
                               map_tasks=map_tasks)


def _extract_locked(cohort, extractor_config, cache_dir, *, seed, progress, batch_size,
                    num_workers, channels_last, commit_seconds, on_batch, device, shards=1,
                    map_tasks=None) -> FeatureStore:
    torch.manual_seed(seed)
    prepared = prepare(cohort, extractor_config, cache_dir, seed=seed, progress=progress,
                       num_workers=num_workers, device=device)
    root = Path(cache_dir) / "features" / prepared.key
    if (root / "complete.json").is_file():
        existing = FeatureStore(root)
        problems = existing.verify()
        if not problems:
            return existing
        log.warning("feature store %s is damaged (%s); rebuilding it", root, "; ".join(problems))
        (root / "complete.json").unlink()
        (root / "progress.json").unlink(missing_ok=True)  # its rows cannot be trusted either
    manifest = {"key": prepared.key, "config": prepared.resolved, "dim": prepared.dim,
                "n_rows": len(prepared.sources), "dtype": prepared.dtype,
                "key_inputs": "sha256(canonical config JSON + (path, size, mtime_ns) of sources)",
                "uses_test_images": bool(prepared.resolved.get("uses_test_images", False)),
                "pixels_key": prepared.pixels_key}  # the pixels store it read (kept by prune)
    # The pixels store first, outside this store's error handling: its own errors name it.
    source = prepared.pixels() if prepared.pixels is not None else list(prepared.sources["path"])
    if shards > 1 and map_tasks is not None and prepared.model is not None:
        return _extract_sharded(cohort, extractor_config, cache_dir, root, manifest, prepared,
                                seed=seed, progress=progress, batch_size=batch_size,
                                channels_last=channels_last, device=device, shards=shards,
                                map_tasks=map_tasks)
    try:
        writer = StoreWriter(root, manifest, prepared.sources, commit_seconds=commit_seconds)
        started = time.perf_counter()
        resumed_at = writer.rows_done
        run_model_into(writer, source, prepared.preprocessor, prepared.model,
                       batch_size=batch_size,
                       num_workers=(default_workers(prepared.model is not None)
                                    if num_workers is None else num_workers),
                       channels_last=channels_last, progress=progress, on_batch=on_batch,
                       device=device,
                       description=f"features ({prepared.config.kind}:{prepared.config.name})")
        seconds = time.perf_counter() - started
        return writer.finish({"seconds": seconds, "resumed_at_row": resumed_at,
                              "images_per_second": (writer.n_rows - resumed_at) / max(seconds, 1e-9)})
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        # The store stays incomplete (no complete.json): its committed rows resume next time.
        raise OSError(errno.ENOSPC, f"disk full while writing feature store {root}; it is left "
                      "incomplete and resumes once there is space") from error


def extract_part(cohort, extractor_config, cache_dir: str, seed: int, batch_size: int,
                 channels_last: bool, device: str, start: int, stop: int, part: str) -> str:
    """One shard of an extraction, as a worker runs it: rows ``start`` to ``stop`` of the
    store, written (atomically) to the ``part`` file. The driver trained the autoencoder and
    built the pixels store first; here both are read from the shared cache."""
    torch.manual_seed(seed)
    prepared = prepare(cohort, extractor_config, cache_dir, seed=seed, progress=False,
                       device=device)
    rows = RowsInMemory(start, stop, prepared.dim)
    run_model_into(rows, prepared.pixels(), prepared.preprocessor, prepared.model,
                   batch_size=batch_size, num_workers=0, channels_last=channels_last,
                   progress=False, device=device, stop=stop)
    def save(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, rows.block, allow_pickle=False)

    atomic_write(Path(part), save)
    return part


def _extract_sharded(cohort, extractor_config, cache_dir, root: Path, manifest: dict,
                     prepared: Prepared, *, seed, progress, batch_size, channels_last, device,
                     shards, map_tasks) -> FeatureStore:
    from milbench.progress import progress_bar

    prepared.pixels()  # built here, once: every shard reads it
    n_rows = manifest["n_rows"]
    ranges = shard_ranges(n_rows, shards, batch_size)
    parts_dir = root / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = [str(parts_dir / f"rows-{start}-{stop}-batch-{batch_size}.npy") for start, stop in ranges]
    todo = [i for i, part in enumerate(parts) if not Path(part).is_file()]
    started = time.perf_counter()
    tasks = [(cohort, extractor_config, str(cache_dir), seed, batch_size, channels_last, device,
              *ranges[i], parts[i]) for i in todo]
    with progress_bar(f"features ({prepared.config.kind}:{prepared.config.name}), {len(ranges)} "
                      "shards", total=len(ranges), completed=len(ranges) - len(todo),
                      enabled=progress, unit="shard") as advance:
        for _ in map_tasks(extract_part, tasks):
            advance()
    # Complete only once every part is in: the merge reads them all, then marks the store.
    writer = StoreWriter(root, manifest, prepared.sources)
    for (start, stop), part in zip(ranges, parts, strict=True):
        block = np.load(part, allow_pickle=False)
        if block.shape != (stop - start, prepared.dim):
            raise StoreIntegrityError(f"{part}: shape {block.shape}, expected "
                                      f"{(stop - start, prepared.dim)}")
        if writer.rows_written < stop:  # a merge that was interrupted resumes after its last part
            writer.write(start, block)
    store = writer.finish({"seconds": time.perf_counter() - started, "shards": len(ranges),
                           "images_per_second": n_rows / max(time.perf_counter() - started, 1e-9)})
    shutil.rmtree(parts_dir)
    return store

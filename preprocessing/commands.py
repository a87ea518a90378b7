"""Plain functions behind ``milbench segment``, ``milbench features`` and ``milbench pretrain``.

The CLI only parses arguments and calls these; every argument has a library default.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from preprocessing.extract import extract_features, load_extractor_config
from preprocessing.segmentation import list_variants, segment_file, segment_files
from preprocessing.store import FeatureStore

DEFAULT_CACHE = Path(".milbench") / "cache"


def _load_cohort(root: str | os.PathLike):
    from milbench.data import load_challenge

    return load_challenge(root)


def _segment_chunk(arguments: tuple) -> int:
    paths, out, variant, background, seed = arguments
    for path in paths:
        segment_file(path, out, variant, background=background, seed=seed)
    return len(paths)


def segment_command(root: str | os.PathLike, variant: str = "kmeans_saturation",
                    out: str | os.PathLike | None = None, *, background: int = 0, seed: int = 0,
                    workers: int = 1, limit: int | None = None, progress: bool = True) -> Path:
    """Segment every image of the challenge folder ``root``; returns the cache folder.

    Writes ``OUT/<variant>/<patient>/<stem>_mask.png`` and ``<stem>_masked.png`` (background
    set to ``background``); existing entries are kept, so an interrupted run resumes.
    ``out`` defaults to ``ROOT/segmentation``.
    """
    from milbench.progress import progress_bar

    if variant not in list_variants():
        raise ValueError(f"unknown segmentation variant {variant!r}; choose from "
                         f"{list_variants()}")
    cohort = _load_cohort(root)
    out = Path(out) if out is not None else Path(root) / "segmentation"
    paths = [path for patient in cohort.patients for path in patient.image_paths][:limit]
    if workers <= 1:
        segment_files(paths, out, variant, background=background, seed=seed, progress=progress)
        return out / variant
    chunks = [paths[i:i + 32] for i in range(0, len(paths), 32)]
    with ProcessPoolExecutor(workers) as pool, progress_bar(
            f"segment ({variant})", total=len(paths), enabled=progress, unit="img") as advance:
        for done in pool.map(_segment_chunk,
                             [(chunk, out, variant, background, seed) for chunk in chunks]):
            advance(done)
    return out / variant


def features_command(root: str | os.PathLike,
                     extractor_config: str | os.PathLike | dict[str, Any],
                     cache_dir: str | os.PathLike = DEFAULT_CACHE, *, seed: int = 0,
                     batch_size: int = 32, num_workers: int | None = None,
                     progress: bool = True, device: str = "cpu", shards: int = 1,
                     map_tasks=None) -> FeatureStore:
    """Extract (or reuse, or resume) the features of every image in ``root``.

    ``extractor_config`` is a YAML path (``configs/features/*.yaml``) or a dict; ``shards``
    parts run as ``map_tasks`` tasks (see ``extract_features``).
    """
    cohort = _load_cohort(root)
    return extract_features(cohort, load_extractor_config(extractor_config), cache_dir,
                            seed=seed, progress=progress, batch_size=batch_size,
                            num_workers=num_workers, device=device, shards=shards,
                            map_tasks=map_tasks)


def pretrain_command(root: str | os.PathLike, out: str | os.PathLike, *,
                     arch: str = "resnet18", weights: str | None = None, input_size: int = 224,
                     head_epochs: int = 3, finetune_epochs: int = 5, head_lr: float = 1e-3,
                     finetune_lr: float = 1e-5, batch_size: int = 32, seed: int = 0,
                     num_workers: int = 0) -> dict:
    """Fine-tune ``arch`` on ``ROOT/<split>/<CLASS>/*.jpg``; ``OUT/backbone.pt`` then serves
    as ``weights`` of a backbone extractor. Returns the evaluation metrics."""
    from preprocessing.pretrain import pretrain_backbone

    return pretrain_backbone(root, out, arch=arch, weights=weights, input_size=input_size,
                             head_epochs=head_epochs, finetune_epochs=finetune_epochs,
                             head_lr=head_lr, finetune_lr=finetune_lr, batch_size=batch_size,
                             seed=seed, num_workers=num_workers)

"""The instance-labelled source set in the ALL-IDB2 layout, and its backbone features.

ALL-IDB2 keeps single-cell crops in ``ALL_IDB2/img/`` named ``Im001_1.tif``: the digit after the
last underscore is the label (1 blast, 0 healthy). The loader accepts the dataset root, its
``ALL_IDB2`` folder or the ``img`` folder itself, and refuses names it cannot read a label from
instead of guessing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SOURCE_NAME = re.compile(r"^Im(\d+)_([01])\.tiff?$", re.IGNORECASE)
SOURCE_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class SourceSet:
    """Source image paths (sorted by image number) and their 0/1 labels."""

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray

    def image_table(self) -> pd.DataFrame:
        """The cohort-style image table, so the feature extractor can read a source set."""
        return pd.DataFrame({"patient_id": "source", "position": np.arange(len(self.paths)),
                             "path": [str(p) for p in self.paths]})

    def __len__(self) -> int:
        return len(self.paths)


def source_image_dir(root: str | os.PathLike) -> Path:
    """The folder holding the crops: ``root/ALL_IDB2/img``, ``root/img`` or ``root``."""
    root = Path(root)
    for candidate in (root / "ALL_IDB2" / "img", root / "img", root):
        if candidate.is_dir() and any(p.suffix.lower() in SOURCE_SUFFIXES for p in candidate.iterdir()):
            return candidate
    if not root.exists():
        raise FileNotFoundError(f"source set not found: {root}")
    raise FileNotFoundError(f"no .tif images in {root}, {root / 'img'} or {root / 'ALL_IDB2' / 'img'} "
                            "(expected the ALL-IDB2 layout: ALL_IDB2/img/Im001_1.tif ...)")


def load_source(root: str | os.PathLike) -> SourceSet:
    """Read an ALL-IDB2-layout source set; labels come from the ``_0`` / ``_1`` suffix.

    Raises ``ValueError`` naming the files whose names do not follow ``ImNNN_L.tif`` (L in 0, 1),
    duplicate image numbers, and a set lacking one of the classes.
    """
    folder = source_image_dir(root)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SOURCE_SUFFIXES)
    bad = [p.name for p in files if not SOURCE_NAME.match(p.name)]
    if bad:
        raise ValueError(f"{len(bad)} file(s) in {folder} are not named ImNNN_0.tif / ImNNN_1.tif, "
                         f"so their label is unknown: {bad[:5]}")
    parsed = [(int(m.group(1)), int(m.group(2)), p)
              for p in files for m in [SOURCE_NAME.match(p.name)]]
    numbers = [n for n, _, _ in parsed]
    duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicated:
        raise ValueError(f"source set {folder} has image numbers with two files: {duplicated[:5]}")
    parsed.sort()
    labels = np.array([label for _, label, _ in parsed], dtype=int)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"source set {folder} must hold both _0 and _1 images, got only "
                         f"{sorted(set(labels.tolist()))}")
    return SourceSet(folder, tuple(p.resolve() for _, _, p in parsed), labels)


def source_stain(root: str | os.PathLike, space: str = "rgb") -> dict:
    """The stain entry that matches images to the source set's per-channel mean and std."""
    return {"reference": str(source_image_dir(root).resolve()), "space": space}


def with_source_stain(extractor_config: Any, root: str | os.PathLike, space: str = "rgb"):
    """An extractor config whose stain reference is the source set (cohort and source alike)."""
    from preprocessing.extract import load_extractor_config

    config = load_extractor_config(extractor_config)
    return replace(config, stain=source_stain(root, space))


def prepare_source_features(source_root: str | os.PathLike,
                            extractor_config: Mapping[str, Any] | Any,
                            cache_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                            *, seed: int = 0, progress: bool = False, num_workers: int | None = 0
                            ) -> Path:
    """Backbone features of the source set as an ``.npz`` of ``X`` (n, d) and ``y`` (n,).

    The extractor config must be the one the cohort's features were made with (same backbone,
    weights, input size and ``seed``: randomly initialised backbones are built after
    ``torch.manual_seed(seed)``, as :func:`preprocessing.extract.extract_features` does), so the
    source and cohort vectors live in one space. Its stain entry should name the source set
    (:func:`with_source_stain`). Features are cached in the feature store under ``cache_dir``.
    """
    from milbench.io import atomic_write
    from preprocessing.extract import extract_features, load_extractor_config

    config = load_extractor_config(extractor_config)
    if config.kind != "backbone":
        raise ValueError("source features need a backbone extractor (an autoencoder is trained on "
                         f"the cohort's own images), got kind {config.kind!r}")
    source = load_source(source_root)
    store = extract_features(source, config, cache_dir, seed=seed, progress=progress,
                             num_workers=num_workers)
    features = np.asarray(store.features()[store.rows(source.paths)], dtype=np.float32)
    out_path = Path(out_path) if out_path is not None else (
        Path(cache_dir) / "semisup" / f"source_{Path(store.root).name}.npz")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, X=features, y=source.labels,
                     paths=np.array([str(p) for p in source.paths]))

    return atomic_write(out_path, write)


def read_source_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` from an ``.npz`` written by :func:`prepare_source_features`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            features, labels = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"])
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"cannot read source features {path} (needs arrays X and y): {error}"
                         ) from error
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"source features {path}: X must be (n, d) and y (n,), got "
                         f"{features.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) < 2:
        raise ValueError(f"source features {path}: y must hold both labels 0 and 1")
    return features, labels.astype(int)

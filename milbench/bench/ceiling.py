"""The pixel ceiling of a synthetic cohort (`milbench bench cohort ROOT --pixel-ceiling`): how well
the pixels alone can show the atypical cells when the truth is given.

A small CNN (four conv-BN-ReLU-pool blocks, global average pooling, one logit) is trained on the
true instance labels (``truth/instances.csv``: atypical or not) of the training patients' images
at ``input_size`` px, in patient-grouped ``n_splits``-fold CV stratified by the patients' labels:
every image is scored by the network that did not see its patient. Reported:

- ``instance_auc``: the out-of-fold AUC of the images' scores against the atypical flag, pooled
  over folds, and ``instance_auc_per_fold`` (the pooled figure sits below the per-fold ones when
  sites shift the scores between folds);
- the bag figures of the predicted witness fraction (each patient's mean out-of-fold probability)
  against the patients' labels: ``bag_auc``, and ``bag_best_threshold_balanced_accuracy``, the
  best threshold over all patients (an upper bound, as ``oracle_bag`` in ``difficulty.json``).

This is a ceiling for the bag-label models: they never see the instance labels it trains on. It
is computed on demand (minutes on CPU), never at generation, and written beside the cohort's
truth (``truth/pixel_ceiling_<size>px.json``), where every run's report puts it beside the
models' instance AUC. Augmentation: flips, 90° rotations
and stain jitter, as the image models'.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from milbench.data import load_challenge
from milbench.instances import join_truth, score_table
from milbench.io import atomic_write_json
from milbench.models.images import augment
from milbench.progress import progress_bar
from milbench.synth.difficulty import best_threshold, pixel_ceiling_path
from milbench.synth.layout import AGE_REFERENCE_DATE
from milbench.training import seeded, shuffled_batches, train

log = logging.getLogger(__name__)

STAIN_JITTER = 0.05


class SmallCNN(nn.Module):
    """uint8 pixel rows ``(m, 3 * S * S)`` → one logit per image."""

    def __init__(self, side: int, width: int = 32) -> None:
        super().__init__()
        self.side = side
        layers, channels = [], 3
        for out in (width // 2, width, 2 * width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.reshape(-1, 3, self.side, self.side).float() / 255.0
        return self.head(self.features(images)).squeeze(-1)


def instance_truth(root: Path, cohort) -> list[np.ndarray]:
    """Each training patient's images' atypical flags, in bag (image) order."""
    truth = pd.read_csv(root / "truth" / "instances.csv", dtype={"patient_id": str, "image": str})
    table = join_truth(score_table(cohort, [np.zeros(p.n_images) for p in cohort.patients]), truth)
    return np.split(table["atypical"].to_numpy(), np.cumsum([p.n_images for p in cohort.patients])[:-1])


def _fit_and_score(pixels: torch.Tensor, flags: torch.Tensor, train_rows: np.ndarray,
                   test_rows: np.ndarray, side: int, epochs: int, batch_size: int,
                   seed: int) -> np.ndarray:
    with seeded(seed) as generator:
        network = SmallCNN(side)
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        positives = float(flags[train_rows].sum())
        weight = torch.tensor((len(train_rows) - positives) / max(positives, 1.0))
        loss = nn.BCEWithLogitsLoss(pos_weight=weight)
        rows = torch.as_tensor(train_rows)

        def step(batch: torch.Tensor) -> torch.Tensor:
            chosen = rows[batch]
            return loss(network(augment(pixels[chosen], side, STAIN_JITTER, generator)),
                        flags[chosen])

        train(network, optimizer, step, lambda epoch: shuffled_batches(len(rows), batch_size, generator),
              epochs=epochs)
        with torch.no_grad():
            return torch.sigmoid(network(pixels[torch.as_tensor(test_rows)])).numpy()


def pixel_ceiling(root: str | Path, cache_dir: str | Path, input_size: int = 64, n_splits: int = 5,
                  epochs: int = 6, batch_size: int = 128, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """The pixel ceiling of the synthetic cohort at ``root`` (see the module docstring); the
    pixels store is cached under ``cache_dir``."""
    from preprocessing.extract import extract_features

    root = Path(root)
    if not (root / "truth" / "instances.csv").is_file():
        raise FileNotFoundError(f"{root}: no truth/instances.csv; the pixel ceiling needs a "
                                "synthetic cohort's instance truth")
    started = time.perf_counter()
    cohort = load_challenge(root, AGE_REFERENCE_DATE).train()
    truth = instance_truth(root, cohort)
    store = extract_features(cohort, {"kind": "pixels", "input_size": input_size}, cache_dir,
                             progress=progress)
    bags = store.bags(cohort)
    pixels = torch.from_numpy(np.ascontiguousarray(np.concatenate(bags)))
    flags = np.concatenate(truth).astype(np.float32)
    owners = np.repeat(np.arange(len(bags)), [len(b) for b in bags])
    labels = cohort.labels()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = np.full(len(flags), np.nan)
    folds = np.full(len(flags), -1)
    with progress_bar("pixel ceiling", n_splits, enabled=progress, unit="folds") as advance:
        for fold, (train_rows, test_rows) in enumerate(
                splitter.split(flags, labels[owners], groups=owners)):
            scores[test_rows] = _fit_and_score(pixels, torch.from_numpy(flags), train_rows,
                                               test_rows, input_size, epochs, batch_size, seed + fold)
            folds[test_rows] = fold
            advance()
    figures = summarize_ceiling(flags, scores, owners, labels, folds)
    figures.update(input_size=input_size, n_splits=n_splits, epochs=epochs, seed=seed,
                   n_images=int(len(flags)), seconds=round(time.perf_counter() - started, 1))
    # Beside the cohort's truth, where a run's report finds it.
    atomic_write_json(pixel_ceiling_path(root, input_size), figures)
    log.info("pixel ceiling of %s: instance AUC %.3f in %.0f s", root, figures["instance_auc"],
             figures["seconds"])
    return figures


def summarize_ceiling(flags: np.ndarray, scores: np.ndarray, owners: np.ndarray,
                      labels: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """The ceiling's figures from out-of-fold instance ``scores`` (one per image; ``owners``:
    each image's bag, ``folds``: its fold) and the bags' ``labels``."""
    fraction = np.array([scores[owners == bag].mean() for bag in range(len(labels))])
    best, _ = best_threshold(fraction, labels)
    return {"instance_auc": _auc(flags, scores),
            "instance_auc_per_fold": [_auc(flags[folds == f], scores[folds == f])
                                      for f in np.unique(folds)],
            "bag_auc": _auc(labels, fraction), "bag_best_threshold_balanced_accuracy": best}


def _auc(truth: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(truth, scores)) if len(np.unique(truth)) == 2 else float("nan")

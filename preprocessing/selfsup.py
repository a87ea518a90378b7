"""A self-supervised cell encoder (VICReg: Bardes, Ponce & LeCun, ICLR 2022) trained on a cohort's
own cells, without labels, as an instance feature extractor (``kind: selfsup``).

Why VICReg: it needs neither negative pairs (SimCLR wants large batches to have enough of them,
costly on 2 CPU cores) nor a momentum teacher (BYOL, DINO: a second network and more
hyper-parameters); its three terms (invariance between two views of a cell, a variance floor per
dimension, decorrelated dimensions) keep the representation from collapsing with small batches.

Two views of every cell are drawn by augmentations that span how acquisition varies between
sites: a random crop rescaled to the input size (scale), flips and 90° rotations, brightness,
contrast, saturation and hue jitter (stain), Gaussian blur, and JPEG re-compression. The encoder
is a narrow residual CNN (four stages, 32 to 256 channels, global average pooling); the
representation (256 numbers) is what the feature store keeps; the projector (256 → 512 → 512)
serves the loss only.

Trained on every image of the cohort (test images too: an unsupervised step), cached and
resumable per epoch (``checkpoint.pt``); ``encoder.pt`` holds the final weights and
``train.json`` the losses. Deterministic under its seed on one machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from milbench.io import atomic_write, atomic_write_json
from milbench.training import checkpoint_epochs, seeded, shuffled_batches, train

REPRESENTATION = 256
PROJECTION = 512
# VICReg's loss weights (the paper's): invariance, variance, covariance.
WEIGHTS = (25.0, 25.0, 1.0)


class _Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.skip = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=2, bias=False),
                                  nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class CellEncoder(nn.Module):
    """Float images in [0, 1] ``(n, 3, S, S)`` → ``(n, REPRESENTATION)``."""

    dim = REPRESENTATION

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.stages = nn.Sequential(_Block(32, 64), _Block(64, 128), _Block(128, REPRESENTATION))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(images))).flatten(1)


class VICReg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = CellEncoder()
        self.projector = nn.Sequential(
            nn.Linear(REPRESENTATION, PROJECTION), nn.BatchNorm1d(PROJECTION), nn.ReLU(),
            nn.Linear(PROJECTION, PROJECTION))

    def compute_loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return vicreg_loss(self.projector(self.encoder(first)), self.projector(self.encoder(second)))


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Invariance (mean squared distance of the two views), variance (hinge on each dimension's
    standard deviation under 1) and covariance (squared off-diagonal covariances / dimensions)."""
    invariance = F.mse_loss(z1, z2)
    variance = covariance = z1.new_zeros(())
    for z in (z1, z2):
        centred = z - z.mean(dim=0)
        std = torch.sqrt(centred.var(dim=0) + eps)
        variance = variance + F.relu(1.0 - std).mean() / 2
        matrix = centred.T @ centred / (len(z) - 1)
        off = matrix - torch.diag(torch.diag(matrix))
        covariance = covariance + off.pow(2).sum() / z.shape[1] / 2
    a, b, c = WEIGHTS
    return a * invariance + b * variance + c * covariance


def augment_views(pixels: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """One random view of each uint8 image ``(n, 3, S, S)`` → float ``(n, 3, S, S)`` in [0, 1]."""
    import cv2
    import torchvision.transforms.v2.functional as TF

    views = []
    draws = torch.rand(len(pixels), 10, generator=generator)
    for image, d in zip(pixels, draws, strict=True):
        scale = 0.6 + 0.4 * float(d[0])
        crop = max(8, int(round(side * scale ** 0.5)))
        top = int(float(d[1]) * (side - crop + 1))
        left = int(float(d[2]) * (side - crop + 1))
        view = TF.resized_crop(image, top, left, crop, crop, [side, side], antialias=True)
        if d[3] < 0.5:
            view = view.flip(-1)
        view = torch.rot90(view, int(float(d[4]) * 4) % 4, dims=(-2, -1))
        if d[5] < 0.3:  # JPEG re-compression, quality 30 to 90 (OpenCV works in BGR)
            bgr = np.ascontiguousarray(view.permute(1, 2, 0).numpy()[..., ::-1])
            _, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 30 + int(60 * float(d[6]))])
            decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
            view = torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1)
        view = view.float() / 255.0
        view = TF.adjust_brightness(view, 0.8 + 0.4 * float(d[7]))
        view = TF.adjust_contrast(view, 0.8 + 0.4 * float(d[8]))
        view = TF.adjust_saturation(view, 0.7 + 0.6 * float(d[9]))
        view = TF.adjust_hue(view, 0.05 * (float(d[0]) * 2 - 1))
        if d[6] < 0.3:
            view = TF.gaussian_blur(view, [5, 5], [0.1 + 1.4 * float(d[1])])
        views.append(view.clamp(0, 1))
    return torch.stack(views)


def fit_selfsup_encoder(pixels: Callable[[], np.ndarray], out_dir: str | os.PathLike, *,
                        input_size: int, epochs: int = 8, batch_size: int = 64,
                        learning_rate: float = 1e-3, seed: int = 0, progress: bool = True,
                        record: dict | None = None) -> CellEncoder:
    """Train VICReg on ``pixels()`` (every cohort image, preprocessed: ``(n, 3 * S * S)`` uint8;
    called only when there is training to do) or reuse a finished run in ``out_dir``."""
    from milbench.progress import progress_bar

    out_dir = Path(out_dir)
    final = out_dir / "encoder.pt"
    with seeded(seed):
        model = VICReg()
        if final.is_file():
            model.encoder.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
            return model.encoder.eval()
        # A copy: the pixels store is mapped read-only.
        rows = torch.from_numpy(np.array(pixels())).view(-1, 3, input_size, input_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        started = time.perf_counter()

        def batches(epoch: int) -> list[tuple[int, torch.Tensor]]:
            # (augmentation seed, rows) per batch, from (seed, epoch, batch) alone: a run resumed
            # from its checkpoint trains exactly as an uninterrupted one.
            first = (seed * 100_003 + epoch) * 10_007
            order = shuffled_batches(len(rows), batch_size, torch.Generator().manual_seed(first))
            return [(first + i, indices) for i, indices in enumerate(order)]

        checkpoint = out_dir / "checkpoint.pt"
        with progress_bar("train self-supervised encoder", total=epochs * len(rows),
                          completed=checkpoint_epochs(checkpoint) * len(rows),
                          enabled=progress, unit="img") as advance:
            def step(batch: tuple[int, torch.Tensor]) -> torch.Tensor:
                batch_seed, indices = batch
                images = rows[indices]
                views = torch.Generator().manual_seed(batch_seed)
                advance(len(images))
                return model.compute_loss(augment_views(images, input_size, views),
                                          augment_views(images, input_size, views))

            result = train(model, optimizer, step, batches, epochs=epochs, checkpoint=checkpoint)
    atomic_write_json(out_dir / "train.json", {
        **(record or {}), "method": "VICReg", "uses_test_images": True, "n_images": len(rows),
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "epoch_mean_loss": [r["train_loss"] for r in result.history],
        "seconds_this_session": time.perf_counter() - started})
    atomic_write(final, lambda tmp: torch.save(model.encoder.state_dict(), tmp))
    return model.encoder.eval()


def load_encoder(weights: str | os.PathLike) -> CellEncoder:
    """A trained encoder from its ``encoder.pt`` (a saved run's, to encode new patients)."""
    encoder = CellEncoder()
    encoder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return encoder.eval()

"""The per-image preprocessing chain shared by every extractor: decode, stain match, segment,
resize, tensor; and the dataset that runs it in loader workers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from preprocessing.images import IMAGENET_MEAN, IMAGENET_STD, read_rgb, resize
from preprocessing.segmentation import apply_mask, segment
from preprocessing.stain import match_stain


@dataclass(frozen=True)
class Preprocessor:
    """Decode → stain match → segment → resize → float tensor, as one picklable callable.

    Picklable so DataLoader workers can run it; the stain reference is carried as numbers.
    ``normalize`` is ``"imagenet"`` (backbones) or ``None`` (autoencoder: inputs stay in [0, 1]).
    """

    input_size: int = 224
    segmentation: str | None = None
    background: int = 0
    stain: Any = None  # a preprocessing.stain.StainReference, or None
    normalize: str | None = None

    def image(self, path: str | os.PathLike) -> np.ndarray:
        """The preprocessed uint8 image, before tensor conversion (used for previews)."""
        image = read_rgb(path)
        if self.stain is not None:
            image = match_stain(image, self.stain)
        if self.segmentation is not None:
            image = apply_mask(image, segment(image, self.segmentation), self.background)
        return resize(image, self.input_size)

    def uint8_tensor(self, path: str | os.PathLike) -> torch.Tensor:
        """``(3, S, S)`` uint8: what loader workers ship (a quarter of the float bytes)."""
        return torch.from_numpy(np.ascontiguousarray(self.image(path))).permute(2, 0, 1)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, S, S)`` → float in [0, 1], ImageNet-normalised if configured.

        Done on whole batches in the main process: one vectorised pass instead of per image.
        """
        tensor = images.float().div_(255.0)
        if self.normalize == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, device=tensor.device).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=tensor.device).view(3, 1, 1)
            tensor = tensor.sub_(mean).div_(std)
        elif self.normalize is not None:
            raise ValueError(f"unknown normalize {self.normalize!r}; use 'imagenet' or None")
        return tensor

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return self.finish(self.uint8_tensor(path))


class ImageDataset(torch.utils.data.Dataset):
    """Paths → ``(row, tensor)`` pairs; ``row`` lets the writer place results in order.

    ``raw=True`` yields uint8 tensors; pass batches through ``preprocess.finish``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Preprocessor,
                 start: int = 0, raw: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.start = start
        self.raw = raw

    def __len__(self) -> int:
        return len(self.paths) - self.start

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor]:
        row = self.start + item
        if self.raw:
            return row, self.preprocess.uint8_tensor(self.paths[row])
        return row, self.preprocess(self.paths[row])

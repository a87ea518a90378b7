"""Image decoding and the per-image preprocessing chain shared by every extractor.

Every image the toolkit reads goes through :func:`read_rgb`, so a file that cannot be decoded
(a non-image, a truncated JPEG) always fails the same way: a :class:`CorruptImageError` whose
message names the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL, unlike OpenCV, refuses truncated JPEGs instead of returning a half-grey image; keep that.
Image.LOAD_TRUNCATED_IMAGES = False


class CorruptImageError(ValueError):
    """An image file that exists but cannot be decoded; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        # One-argument form: a DataLoader worker re-raises with the formatted message only.
        self.path = str(path)
        self.reason = reason
        super().__init__(self.path if reason is None else f"cannot decode image {path}: {reason}")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a ``(H, W, 3)`` uint8 RGB array; raise naming the file on failure."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(path, str(error) or type(error).__name__) from error
    return np.array(rgb, dtype=np.uint8)  # writable (torch.from_numpy needs that)


def write_rgb(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> Path:
    """Write an RGB uint8 image atomically (format from the suffix: .png lossless, .jpg lossy)."""
    from milbench.io import atomic_write

    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in {".jpg", ".jpeg"} else []
    ok, encoded = cv2.imencode(path.suffix, _to_bgr(image), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a boolean mask as an 8-bit PNG (0 / 255), atomically."""
    from milbench.io import atomic_write

    ok, encoded = cv2.imencode(".png", np.where(mask, 255, 0).astype(np.uint8))
    if not ok:
        raise ValueError(f"OpenCV could not encode {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as a boolean array (any non-zero pixel is foreground)."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise CorruptImageError(path, "not a readable mask image")
    return mask > 0


def _to_bgr(image: np.ndarray) -> np.ndarray:
    return image[..., ::-1] if image.ndim == 3 else image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize; area interpolation when shrinking keeps small structures (nuclei) intact."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


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
        from preprocessing.segmentation import apply_mask, segment
        from preprocessing.stain import match_stain

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

"""Image files: decoding, writing and resizing, shared by every step that reads a cell image.

Every image the toolkit reads goes through :func:`read_rgb`, so a file that cannot be decoded
(a non-image, a truncated JPEG) always fails the same way: a :class:`CorruptImageError` whose
message names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
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

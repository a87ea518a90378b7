"""Digit "slides" from scikit-learn's bundled ``load_digits`` (real 8x8 handwriting).

Two generators of test slides (20 to 100 held-out digits each):

- ``stochastic_slide``: the thesis' generator. Held-out digits are split into "sure" and
  "unsure" by the classifier's confidence (the least confident ``unsure_quantile`` of each
  true class are unsure); a slide mixes sure digits of a few classes with unsure digits of at
  most one class.
- ``distorted_slide``: digits of a few classes, all passed through one random "handwriting"
  distortion (shear, rotation, stroke thickness), as if one writer wrote the whole slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

UPSAMPLE = 4  # distortions act on a 32x32 upsampled image, then block-average back to 8x8


@dataclass
class DigitSplit:
    train_images: np.ndarray  # (n, 8, 8), values 0..16
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digit_split(test_size: float = 0.5, seed: int = 0) -> DigitSplit:
    """Stratified split of ``load_digits``: the CNN trains on one part, slides use the other."""
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=test_size, stratify=digits.target, random_state=seed
    )
    return DigitSplit(train_x, train_y.astype(int), test_x, test_y.astype(int))


@dataclass(frozen=True)
class Distortion:
    """One writer's style: shear and rotation (affine) and stroke thickness."""

    shear: float  # horizontal shear factor
    rotation_degrees: float
    thickness: int  # +1 thicker strokes, -1 thinner, 0 unchanged

    @classmethod
    def random(cls, rng: np.random.Generator, strength: float = 1.0) -> Distortion:
        return cls(
            shear=float(rng.uniform(-0.5, 0.5) * strength),
            rotation_degrees=float(rng.uniform(-30, 30) * strength),
            thickness=int(rng.choice([-1, 0, 1])),
        )

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Distort ``(n, 8, 8)`` images; returns the same shape and value range (0..16)."""
        return np.stack([self._one(image) for image in np.asarray(images, dtype=np.float64)])

    def _one(self, image: np.ndarray) -> np.ndarray:
        big = ndimage.zoom(image, UPSAMPLE, order=1)
        angle = np.deg2rad(self.rotation_degrees)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        shear = np.array([[1.0, 0.0], [self.shear, 1.0]])  # (row, col): col shifts with row
        matrix = rotation @ shear
        # affine_transform maps output coordinates to input ones: invert, keep the centre fixed.
        inverse = np.linalg.inv(matrix)
        centre = (np.array(big.shape) - 1) / 2.0
        offset = centre - inverse @ centre
        warped = ndimage.affine_transform(big, inverse, offset=offset, order=1, mode="constant")
        if self.thickness > 0:
            warped = ndimage.grey_dilation(warped, size=(3, 3))
        elif self.thickness < 0:
            warped = ndimage.grey_erosion(warped, size=(2, 2))
        small = warped.reshape(8, UPSAMPLE, 8, UPSAMPLE).mean(axis=(1, 3))
        peak = small.max()
        # Rescale to the 0..16 ink range the classifier was trained on.
        return small * (16.0 / peak) if peak > 0 else small


@dataclass
class Slide:
    images: np.ndarray
    labels: np.ndarray
    kind: str
    indices: np.ndarray  # rows of the held-out set the slide's digits came from


def sure_mask(
    confidence: np.ndarray, labels: np.ndarray, unsure_quantile: float = 0.3
) -> np.ndarray:
    """True for "sure" digits: above the ``unsure_quantile`` confidence quantile of their class."""
    sure = np.ones(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        cut = np.quantile(confidence[rows], unsure_quantile)
        sure[rows[confidence[rows] <= cut]] = False
    return sure


def _slide_size(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high + 1))


def _take(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    # Without replacement while the pool lasts: repeated images would form artificial clusters.
    return rng.choice(pool, size=count, replace=count > len(pool))


def stochastic_slide(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    sure: np.ndarray,
    *,
    size_range: tuple[int, int] = (20, 100),
    class_range: tuple[int, int] = (2, 5),
    max_unsure_fraction: float = 0.5,
) -> Slide:
    """Sure digits of 2-5 classes plus unsure digits of at most one class."""
    n = _slide_size(rng, *size_range)
    classes = np.unique(labels)
    chosen = rng.choice(
        classes, size=int(rng.integers(class_range[0], class_range[1] + 1)), replace=False
    )
    unsure_class = int(rng.choice(classes))
    unsure_pool = np.flatnonzero(~sure & (labels == unsure_class))
    n_unsure = min(int(round(rng.uniform(0, max_unsure_fraction) * n)), len(unsure_pool))
    rows = [rng.choice(unsure_pool, size=n_unsure, replace=False)] if n_unsure else []
    per_class = np.bincount(rng.integers(0, len(chosen), size=n - n_unsure), minlength=len(chosen))
    for cls, count in zip(chosen, per_class, strict=True):
        if count:
            rows.append(_take(rng, np.flatnonzero(sure & (labels == cls)), int(count)))
    index = rng.permutation(np.concatenate(rows))
    return Slide(images[index], labels[index], "stochastic", index)


def distorted_slide(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    size_range: tuple[int, int] = (20, 100),
    class_range: tuple[int, int] = (2, 5),
    strength: float = 1.0,
) -> Slide:
    """Digits of 2-5 classes, all distorted by one random handwriting style."""
    n = _slide_size(rng, *size_range)
    classes = rng.choice(
        np.unique(labels), size=int(rng.integers(class_range[0], class_range[1] + 1)), replace=False
    )
    per_class = np.bincount(rng.integers(0, len(classes), size=n), minlength=len(classes))
    rows = [
        _take(rng, np.flatnonzero(labels == cls), int(count))
        for cls, count in zip(classes, per_class, strict=True)
        if count
    ]
    index = rng.permutation(np.concatenate(rows))
    distortion = Distortion.random(rng, strength)
    return Slide(distortion.apply(images[index]), labels[index], "distorted", index)

"""Cytomorphometry: the hand-crafted cell descriptors of haematology papers, as instance features.

Per cell image (segmented: everything but the central cell set to the background value, as the
pixels store of a segmented preprocessing holds it):

- masks: the cell is every pixel that is not background; the nucleus is the darker part of the
  cell under Otsu's threshold on its grey levels (the chromatin stains dark), its largest
  connected component; the cytoplasm is the rest of the cell;
- shape (scikit-image ``regionprops``) of the cell and of the nucleus: area (as a share of the
  image), perimeter (per image side), circularity 4πA/P², solidity, eccentricity; the
  nucleus-to-cell area ratio; contour irregularity of the nucleus (the coefficient of variation
  of its boundary's distance to its centroid);
- chromatin texture of the nucleus: grey-level co-occurrence (``graycomatrix`` at distances 1
  and 2, four angles, 32 levels; contrast, dissimilarity, homogeneity, energy, correlation,
  averaged) and the histogram of uniform local binary patterns (8 neighbours, radius 1);
- colour moments (mean, standard deviation, skewness of each RGB channel) of the nucleus and of
  the cytoplasm.

Generic descriptors only: nothing here knows how any cohort was made. A cell too small to
measure (under ``MIN_PIXELS`` pixels, say a failed segmentation) gets zeros and a flag.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MIN_PIXELS = 16
GLCM_LEVELS = 32
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
LBP_POINTS = 8
SHAPE_NAMES = ("area", "perimeter", "circularity", "solidity", "eccentricity")
NAMES = (
    *(f"cell_{n}" for n in SHAPE_NAMES), *(f"nucleus_{n}" for n in SHAPE_NAMES),
    "nucleus_to_cell", "nucleus_irregularity",
    *(f"glcm_{p}" for p in GLCM_PROPERTIES), *(f"lbp_{i}" for i in range(LBP_POINTS + 2)),
    *(f"{part}_{stat}_{channel}" for part in ("nucleus", "cytoplasm")
      for stat in ("mean", "std", "skew") for channel in "rgb"),
    "unmeasurable",
)
DIM = len(NAMES)


def _shape(mask: np.ndarray, side: int) -> tuple[list[float], object | None]:
    from skimage.measure import label, regionprops

    regions = regionprops(label(mask))
    if not regions:
        return [0.0] * len(SHAPE_NAMES), None
    region = max(regions, key=lambda r: r.area)
    perimeter = float(region.perimeter)
    circularity = 4 * np.pi * region.area / perimeter ** 2 if perimeter > 0 else 0.0
    return [region.area / side ** 2, perimeter / side, min(circularity, 1.5), float(region.solidity),
            float(region.eccentricity)], region


def _irregularity(region) -> float:
    from skimage.measure import find_contours

    padded = np.pad(region.image, 1)
    contours = find_contours(padded.astype(float), 0.5)
    if not contours:
        return 0.0
    boundary = max(contours, key=len)
    centre = np.array(region.image.shape) / 2 + 0.5
    radii = np.linalg.norm(boundary - centre, axis=1)
    return float(radii.std() / radii.mean()) if radii.mean() > 0 else 0.0


def _moments(pixels: np.ndarray) -> list[float]:
    """Mean, standard deviation and skewness of each channel of ``pixels`` (n, 3) in [0, 1]."""
    if len(pixels) < 2:
        return [0.0] * 9
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    skew = np.where(std > 0, ((pixels - mean) ** 3).mean(axis=0) / np.maximum(std, 1e-12) ** 3, 0.0)
    return [*mean, *std, *skew]


def describe(image: np.ndarray, background: int = 0) -> np.ndarray:
    """The ``DIM`` descriptors (``NAMES``) of one segmented uint8 RGB cell image (S, S, 3)."""
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    side = image.shape[0]
    cell = np.any(image != background, axis=-1)
    if cell.sum() < MIN_PIXELS:
        vector = np.zeros(DIM)
        vector[-1] = 1.0
        return vector
    grey = image.astype(float).mean(axis=-1)
    inside = grey[cell]
    threshold = threshold_otsu(inside) if np.ptp(inside) > 0 else inside.max() + 1
    dark = cell & (grey < threshold)
    labelled = label(dark)
    if labelled.max() > 0:
        largest = np.argmax(np.bincount(labelled.ravel())[1:]) + 1
        nucleus = labelled == largest
    else:
        nucleus = np.zeros_like(cell)
    cytoplasm = cell & ~nucleus
    cell_shape, _ = _shape(cell, side)
    nucleus_shape, nucleus_region = _shape(nucleus, side)
    ratio = nucleus.sum() / cell.sum()
    irregular = _irregularity(nucleus_region) if nucleus_region is not None else 0.0

    texture = [0.0] * len(GLCM_PROPERTIES)
    lbp = [0.0] * (LBP_POINTS + 2)
    if nucleus.sum() >= MIN_PIXELS:
        levels = np.clip((grey / 256 * GLCM_LEVELS).astype(np.uint8), 0, GLCM_LEVELS - 1)
        # Only nucleus pixels count: the rest is moved to an extra level and dropped after.
        levels = np.where(nucleus, levels, GLCM_LEVELS).astype(np.uint8)
        matrix = graycomatrix(levels, distances=[1, 2], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                              levels=GLCM_LEVELS + 1, symmetric=True, normed=False)
        matrix = matrix[:GLCM_LEVELS, :GLCM_LEVELS].astype(float)
        totals = matrix.sum(axis=(0, 1), keepdims=True)
        if np.all(totals > 0):
            matrix = matrix / totals
            texture = [float(np.nan_to_num(graycoprops(matrix, p)).mean()) for p in GLCM_PROPERTIES]
        patterns = local_binary_pattern(grey.astype(np.uint8), LBP_POINTS, 1, method="uniform")
        counts = np.bincount(patterns[nucleus].astype(int), minlength=LBP_POINTS + 2)
        lbp = list(counts / counts.sum())
    colours = image.astype(float) / 255.0
    return np.array([*cell_shape, *nucleus_shape, ratio, irregular, *texture, *lbp,
                     *_moments(colours[nucleus]), *_moments(colours[cytoplasm]), 0.0])


class Morphometry(nn.Module):
    """The extractor's "model": a batch of float images in [0, 1] ``(n, 3, S, S)`` → the
    descriptors of each ``(n, DIM)``; nothing is learned."""

    dim = DIM

    def __init__(self, background: int = 0) -> None:
        super().__init__()
        self.background = background

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        batch = batch.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return torch.from_numpy(np.stack([describe(image, self.background) for image in batch]))

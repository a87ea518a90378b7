"""Lymphocyte segmentation: find the central white cell and mask everything else out.

Each challenge image holds one lymphocyte near the centre with red cells around it. Every
variant returns a boolean mask of the central cell; all share the same post-processing
(closing, keep the component at or nearest the centre, fill holes, a few pixels of dilation).

Variants (chosen by name in configs, see :data:`VARIANTS`):

- ``kmeans_saturation`` (the seed method): 2-means on the HSV saturation channel, the more
  saturated cluster is the first mask.
- ``kmeans_color3``: 3-means on RGB colour (background, red cells, stained cell); the cluster
  whose centre is most saturated is the cell.
- ``kmeans_saturation_hue``: the seed method with red-hued pixels removed from the saturated
  cluster first, so red cells touching the lymphocyte no longer merge with it.
- ``grabcut``: OpenCV GrabCut seeded with a definite-foreground disc at the centre and a
  definite-background border.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from preprocessing.images import read_rgb, write_mask, write_rgb


@dataclass(frozen=True)
class PostProcess:
    """Shared morphology; sizes are in pixels at 224x224 and scale with the image side."""

    close_radius: int = 5
    open_radius: int = 2
    dilate_radius: int = 3
    split_touching: bool = False  # watershed apart round blobs merged into the central one


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _scaled(radius: int, side: int) -> int:
    return max(1, round(radius * side / 224)) if radius > 0 else 0


def central_component(mask: np.ndarray) -> np.ndarray:
    """The connected component containing the image centre, or the one nearest to it.

    Red cells are saturated too, so the raw cluster mask holds several blobs; the lymphocyte is
    the one at the centre. An empty mask stays empty.
    """
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    cy, cx = (mask.shape[0] - 1) / 2, (mask.shape[1] - 1) / 2
    centre_label = labels[int(round(cy)), int(round(cx))]
    if centre_label > 0:
        return labels == centre_label
    ys, xs = np.nonzero(labels)
    nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
    return labels == labels[ys[nearest], xs[nearest]]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background (pale cytoplasm inside the cell outline)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood == 0
    return (padded.astype(bool) | holes)[1:-1, 1:-1]


def split_touching(mask: np.ndarray, depth: float = 0.6) -> np.ndarray:
    """Detach smaller blobs (red cells) stuck to the central cell: opening by the cell's size.

    The mask is eroded by ``depth`` times the distance from the centre to the mask edge, which
    cuts the necks to touching smaller blobs; the central piece is then dilated back by the
    same radius, inside the original mask.
    """
    binary = mask.astype(np.uint8)
    distance = cv2.distanceTransform(binary, cv2.DIST_L2, 5)
    cy, cx = (mask.shape[0] - 1) // 2, (mask.shape[1] - 1) // 2
    radius = int(depth * distance[cy, cx])
    if radius < 2:
        return mask
    kernel = _disc(radius)
    core = central_component(cv2.erode(binary, kernel) > 0)
    if not core.any():
        return mask
    return fill_holes((cv2.dilate(core.astype(np.uint8), kernel) > 0) & mask)


def postprocess(raw: np.ndarray, settings: PostProcess = PostProcess()) -> np.ndarray:
    """Opening (drops speckle), closing (convex cell), central component, holes, dilation."""
    side = min(raw.shape[:2])
    mask = raw.astype(np.uint8)
    if settings.open_radius:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(_scaled(settings.open_radius, side)))
    if settings.close_radius:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(_scaled(settings.close_radius, side)))
    mask = fill_holes(central_component(mask > 0))
    if settings.split_touching and mask.any():
        mask = split_touching(mask)
    if settings.dilate_radius:
        kernel = _disc(_scaled(settings.dilate_radius, side))
        mask = cv2.dilate(mask.astype(np.uint8), kernel) > 0
    return mask


def kmeans(values: np.ndarray, k: int, *, seed: int = 0, iterations: int = 30,
           sample: int = 4096) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on a fixed pixel subsample; returns the centres.

    Own implementation (not cv2.kmeans) so the result depends only on ``seed``, not on
    OpenCV's global RNG, which DataLoader workers would share unpredictably.
    """
    values = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
    rng = np.random.default_rng(seed)
    if len(values) > sample:
        values = values[rng.choice(len(values), sample, replace=False)]
    centres = [values[rng.integers(len(values))]]
    for _ in range(1, k):
        distance = np.min([((values - c) ** 2).sum(1) for c in centres], axis=0)
        total = distance.sum()
        if total <= 0:  # fewer distinct values than clusters
            centres.append(values[rng.integers(len(values))])
            continue
        centres.append(values[rng.choice(len(values), p=distance / total)])
    centres = np.stack(centres)
    for _ in range(iterations):
        labels = ((values[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        updated = np.stack([
            values[labels == j].mean(0) if np.any(labels == j) else centres[j] for j in range(k)
        ])
        if np.allclose(updated, centres, atol=1e-3):
            break
        centres = updated
    return centres


def _assign(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    values = values.reshape(len(values), -1).astype(np.float32)
    return ((values[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)


def raw_kmeans_saturation(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The seed method's first mask: the more saturated of two saturation clusters."""
    saturation = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1].reshape(-1, 1)
    centres = kmeans(saturation, 2, seed=seed)
    labels = _assign(saturation, centres)
    return (labels == int(np.argmax(centres[:, 0]))).reshape(image.shape[:2])


# OpenCV hue (0..180) of blue to purple: cytoplasm and nucleus. Red cells are pink to red
# (hue near 0 / 180) and fall outside.
CELL_HUES = (100, 160)


def raw_kmeans_saturation_hue(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The seed's saturated cluster without its red-hued pixels (red cells)."""
    hue = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 0]
    return raw_kmeans_saturation(image, seed) & (hue >= CELL_HUES[0]) & (hue <= CELL_HUES[1])


def raw_kmeans_color3(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Three colour clusters (background, red cells, stained cell); keep the most saturated."""
    pixels = image.reshape(-1, 3)
    centres = kmeans(pixels, 3, seed=seed)
    centre_colours = np.clip(centres, 0, 255).astype(np.uint8).reshape(1, -1, 3)
    saturation = cv2.cvtColor(centre_colours, cv2.COLOR_RGB2HSV)[0, :, 1].astype(float)
    # Darkness breaks near-ties: the stained nucleus is both saturated and dark, red cells are
    # saturated but brighter.
    score = saturation + 0.5 * (255 - centre_colours[0].mean(1))
    labels = _assign(pixels, centres)
    return (labels == int(np.argmax(score))).reshape(image.shape[:2])


def raw_grabcut(image: np.ndarray, seed: int = 0, iterations: int = 4) -> np.ndarray:
    """GrabCut from a centre seed: definite foreground disc, definite background border."""
    height, width = image.shape[:2]
    side = min(height, width)
    mask = np.full((height, width), cv2.GC_PR_BGD, np.uint8)
    cv2.circle(mask, (width // 2, height // 2), max(2, int(0.25 * side)), cv2.GC_PR_FGD, -1)
    cv2.circle(mask, (width // 2, height // 2), max(1, int(0.05 * side)), cv2.GC_FGD, -1)
    border = max(1, int(0.03 * side))
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = (cv2.GC_BGD,) * 4
    # GrabCut initialises its colour models with OpenCV's global RNG; fix it per call.
    cv2.setRNGSeed(seed)
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), mask, None, background_model,
                foreground_model, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


VARIANTS: dict[str, tuple[Callable[..., np.ndarray], PostProcess]] = {
    "kmeans_saturation": (raw_kmeans_saturation, PostProcess(split_touching=True)),
    "kmeans_saturation_hue": (raw_kmeans_saturation_hue, PostProcess()),
    "kmeans_color3": (raw_kmeans_color3, PostProcess()),
    "grabcut": (raw_grabcut, PostProcess(open_radius=2, close_radius=3, dilate_radius=0)),
}


def list_variants() -> list[str]:
    return sorted(VARIANTS)


def segment(image: np.ndarray, variant: str = "kmeans_saturation", *, seed: int = 0) -> np.ndarray:
    """Boolean mask of the central cell of an RGB uint8 image, by the named variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown segmentation variant {variant!r}; choose from {list_variants()}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    raw_method, settings = VARIANTS[variant]
    return postprocess(raw_method(image, seed=seed), settings)


def apply_mask(image: np.ndarray, mask: np.ndarray, background: int = 0) -> np.ndarray:
    """The image with everything outside ``mask`` set to the constant ``background``."""
    out = np.full_like(image, background)
    out[mask] = image[mask]
    return out


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    union = np.logical_or(predicted, truth).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(predicted, truth).sum() / union)


def segmentation_paths(out_dir: str | os.PathLike, variant: str, image_path: str | os.PathLike
                       ) -> tuple[Path, Path]:
    """Where the cached mask and masked image of one source image live.

    ``OUT/<variant>/<patient folder>/<stem>_mask.png`` and ``<stem>_masked.png``; the patient
    folder is the image's parent directory name (``P26``), as in the challenge layout.
    """
    source = Path(image_path)
    folder = Path(out_dir) / variant / source.parent.name
    return folder / f"{source.stem}_mask.png", folder / f"{source.stem}_masked.png"


def segment_file(image_path: str | os.PathLike, out_dir: str | os.PathLike, variant: str,
                 *, background: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """Segment one file and cache mask + masked image; an existing cache entry is reused.

    Both files are written atomically and the masked image last, so its presence means the
    entry is complete.
    """
    mask_path, masked_path = segmentation_paths(out_dir, variant, image_path)
    if masked_path.exists() and mask_path.exists():
        return mask_path, masked_path
    image = read_rgb(image_path)
    mask = segment(image, variant, seed=seed)
    write_mask(mask_path, mask)
    write_rgb(masked_path, apply_mask(image, mask, background))
    return mask_path, masked_path


def segment_files(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, variant: str,
                  *, background: int = 0, seed: int = 0, progress: bool = True) -> int:
    """Segment many files into the cache, with a rich progress bar; returns how many."""
    from milbench.progress import progress_bar

    paths = list(paths)
    with progress_bar(f"segment ({variant})", total=len(paths), enabled=progress,
                      unit="img") as advance:
        for path in paths:
            segment_file(path, out_dir, variant, background=background, seed=seed)
            advance(1)
    return len(paths)

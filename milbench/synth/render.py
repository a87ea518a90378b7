"""Rendering of synthetic blood-smear images: one lymphocyte near the centre, red cells around.

Images are built in optical-density space (Beer-Lambert): every stained object adds absorbance,
so overlapping red cells darken as on a real smear, and a per-patient stain is just a change of
the absorbance vectors. Everything is drawn with OpenCV on small regions of interest so that one
224x224 image costs a few milliseconds.

Cell morphology comes in three variants:

- ``typical``: small lymphocyte, round dense nucleus filling most of the cell, thin cytoplasm rim;
- ``atypical`` (tumoral witness): larger cell, lobulated or cleaved nucleus, coarse chromatin,
  visible nucleoli, lower nucleus/cytoplasm ratio; ``signal_strength`` interpolates every
  difference from typical (0, same distribution as typical) to fully atypical (1);
- ``reactive``: large cell with abundant, deeper-blue cytoplasm and a regular nucleus, the
  confounder found in reactive lymphocytoses.

Realistic cohorts give every cell its own strength per morphological trait (``TRAITS``): an
atypical cell need not be atypical in every respect, and a typical one may carry a nucleolus or a
notch. Acquisition sites each have their own stain, blur, JPEG quality and cell scale
(``sample_site_stain``); a patient's slide varies a little around its site (``perturb_stain``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

VARIANTS = ("typical", "atypical", "reactive")
# Morphological traits that move from typical (0) to atypical (1), each with its own strength.
TRAITS = ("size", "nucleus_ratio", "outline", "chromatin", "density", "nucleoli")

# Absorbance (optical density) per RGB channel of each stained component, before the per-patient
# stain jitter. Chosen so that on the pale background the nucleus renders dark purple and is the
# most saturated object, red cells render pink-red, and cytoplasm pale blue.
_BACKGROUND_RGB = np.array([0.95, 0.91, 0.93], dtype=np.float32)
_NUCLEUS_OD = np.array([1.05, 1.75, 0.45], dtype=np.float32)
_CYTOPLASM_OD = np.array([0.26, 0.15, 0.03], dtype=np.float32)
_RBC_OD = np.array([0.08, 0.52, 0.42], dtype=np.float32)

_POLY_POINTS = 72
_RBC_UNIT = 200  # uint8 drawing value of unit red-cell density (room for jitter)
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel polygon vertices
_ANGLES = np.linspace(0.0, 2.0 * np.pi, _POLY_POINTS, endpoint=False)


@dataclass(frozen=True)
class Stain:
    """One patient's (or one slide's) staining and acquisition conditions."""

    background: np.ndarray
    nucleus_od: np.ndarray
    cytoplasm_od: np.ndarray
    rbc_od: np.ndarray
    brightness: float
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int
    cell_scale: float
    rbc_density: float


@dataclass(frozen=True)
class RenderedCell:
    """An RGB uint8 image and the binary (0/255) masks of the lymphocyte and its nucleus."""

    image: np.ndarray
    cell_mask: np.ndarray
    nucleus_mask: np.ndarray


def sample_stain(rng: np.random.Generator) -> Stain:
    """Draw a stain: per-channel absorbance shifts change hue and saturation, a factor density."""

    def jitter(base: np.ndarray, spread: float, density: float) -> np.ndarray:
        return (base * rng.uniform(1 - spread, 1 + spread, 3) * density).astype(np.float32)

    density = float(rng.uniform(0.85, 1.15))
    background = np.clip(_BACKGROUND_RGB + rng.uniform(-0.03, 0.03, 3), 0.8, 1.0)
    return Stain(
        background=background.astype(np.float32),
        nucleus_od=jitter(_NUCLEUS_OD, 0.12, density),
        cytoplasm_od=jitter(_CYTOPLASM_OD, 0.25, density),
        rbc_od=jitter(_RBC_OD, 0.12, density),
        brightness=float(rng.uniform(0.95, 1.03)),
        blur_sigma=float(rng.uniform(0.5, 0.9)),
        noise_sigma=float(rng.uniform(0.006, 0.014)),
        jpeg_quality=int(rng.integers(85, 93)),
        cell_scale=float(rng.uniform(0.93, 1.07)),
        rbc_density=float(rng.uniform(0.8, 1.25)),
    )


def sample_site_stain(rng: np.random.Generator) -> Stain:
    """An acquisition site's conditions: a wider stain shift than between patients of one site,
    and the site's own blur, JPEG quality and magnification (cell scale)."""
    base = sample_stain(rng)
    return Stain(
        background=base.background,
        nucleus_od=(base.nucleus_od * rng.uniform(0.85, 1.15, 3)).astype(np.float32),
        cytoplasm_od=(base.cytoplasm_od * rng.uniform(0.8, 1.2, 3)).astype(np.float32),
        rbc_od=(base.rbc_od * rng.uniform(0.85, 1.15, 3)).astype(np.float32),
        brightness=base.brightness,
        blur_sigma=float(rng.uniform(0.5, 1.5)),
        noise_sigma=float(rng.uniform(0.006, 0.02)),
        jpeg_quality=int(rng.integers(60, 95)),
        cell_scale=float(rng.uniform(0.88, 1.12)),
        rbc_density=base.rbc_density,
    )


def perturb_stain(rng: np.random.Generator, site: Stain) -> Stain:
    """One patient's slide at a site: small changes of density, light and focus."""
    density = float(rng.uniform(0.94, 1.06))
    return Stain(
        background=site.background,
        nucleus_od=(site.nucleus_od * density * rng.uniform(0.97, 1.03, 3)).astype(np.float32),
        cytoplasm_od=(site.cytoplasm_od * density * rng.uniform(0.95, 1.05, 3)).astype(np.float32),
        rbc_od=(site.rbc_od * density * rng.uniform(0.97, 1.03, 3)).astype(np.float32),
        brightness=float(site.brightness * rng.uniform(0.98, 1.02)),
        blur_sigma=float(site.blur_sigma * rng.uniform(0.9, 1.1)),
        noise_sigma=site.noise_sigma,
        jpeg_quality=site.jpeg_quality,
        cell_scale=float(site.cell_scale * rng.uniform(0.98, 1.02)),
        rbc_density=float(site.rbc_density * rng.uniform(0.9, 1.1)),
    )


@dataclass(frozen=True)
class _Morphology:
    cell_radius: float
    nucleus_ratio: float  # nucleus radius / cell radius
    nucleus_harmonics: float  # amplitude of the radial irregularity of the nucleus outline
    notch_depth: float  # cleft in the nucleus, as a fraction of its radius
    cell_harmonics: float
    chromatin_coarse: float  # 0 = fine dense chromatin, 1 = coarse clumped chromatin
    chromatin_amplitude: float
    nucleus_density: float
    cytoplasm_density: float
    nucleoli: int


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _sample_morphology(
    rng: np.random.Generator, variant: str, signal_strength: float, scale: float,
    traits: np.ndarray | None = None,
) -> _Morphology:
    # The same random draws feed every variant, so an atypical cell at signal_strength 0 has
    # exactly the distribution of a typical one.
    z = rng.standard_normal(4)
    u = rng.uniform(size=4)
    if variant == "reactive":
        return _Morphology(
            cell_radius=scale * (47.0 + 3.0 * z[0]),
            nucleus_ratio=float(np.clip(0.60 + 0.04 * z[1], 0.5, 0.7)),
            nucleus_harmonics=0.03,
            notch_depth=0.0,
            cell_harmonics=0.06,
            chromatin_coarse=0.2,
            chromatin_amplitude=0.14,
            nucleus_density=0.95 + 0.06 * z[2],
            cytoplasm_density=1.9 + 0.2 * z[3],
            nucleoli=0,
        )
    if traits is None:
        s = signal_strength if variant == "atypical" else 0.0
        traits = np.full(len(TRAITS), s)
    size, ratio, outline, chromatin, density, nucleoli = (float(t) for t in traits)
    return _Morphology(
        cell_radius=scale * (_lerp(33.0, 45.0, size) + _lerp(2.5, 4.0, size) * z[0]),
        nucleus_ratio=float(np.clip(_lerp(0.87, 0.78, ratio) + 0.025 * z[1], 0.72, 0.93)),
        nucleus_harmonics=_lerp(0.025, 0.11, outline),
        notch_depth=_lerp(0.0, 0.22 + 0.2 * u[0], outline) if u[1] < 0.6 else 0.0,
        cell_harmonics=0.025,
        chromatin_coarse=chromatin,
        chromatin_amplitude=_lerp(0.10, 0.34, chromatin),
        nucleus_density=_lerp(1.0, 0.88, density) + 0.06 * z[2],
        cytoplasm_density=_lerp(1.0, 1.3, density) + 0.1 * z[3],
        nucleoli=int(u[2] < 0.9 * nucleoli) + int(u[3] < 0.45 * nucleoli),
    )


def _radial_outline(
    rng: np.random.Generator, radius: float, harmonics: float, notch_depth: float
) -> np.ndarray:
    """Radii over ``_ANGLES`` of a closed blob: low-order harmonics plus an optional cleft."""
    ks = np.arange(2, 7)
    amps = harmonics * rng.uniform(0.3, 1.0, ks.size) / np.sqrt(ks - 1)
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    r = 1.0 + (amps[:, None] * np.cos(ks[:, None] * _ANGLES[None, :] + phases[:, None])).sum(0)
    notch_angle = rng.uniform(0, 2 * np.pi)
    if notch_depth > 0:
        d = np.angle(np.exp(1j * (_ANGLES - notch_angle)))
        r = r * (1.0 - notch_depth * np.exp(-0.5 * (d / 0.28) ** 2))
    return radius * r


def _fill(shape: tuple[int, int], cx: float, cy: float, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased filled polygon as float32 coverage in [0, 1]."""
    pts = np.stack([cx + radii * np.cos(_ANGLES), cy + radii * np.sin(_ANGLES)], axis=1)
    pts = np.round(pts * (1 << _SHIFT)).astype(np.int32)
    canvas = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
    return canvas


def _smooth_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish band-limited noise: a small random grid upsampled."""
    small = rng.standard_normal((grid, grid)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _add_red_cells(
    rbc: np.ndarray, pallor_map: np.ndarray, rng: np.random.Generator, stain: Stain,
    center: tuple[float, float], keep_out: float, scale: float,
) -> None:
    size = rbc.shape[0]
    area = (size + 40) ** 2
    count = int(rng.poisson(stain.rbc_density * area / (scale * scale * 4300.0)))
    # Rejection sampling over candidates drawn in one go (per-call RNG overhead dominates here):
    # x, y, radius, then the shape parameters of _stamp_red_cell.
    tries = 3 * count
    xy = rng.uniform(-20, size + 20, (tries, 2))
    radii = scale * rng.normal(26.0, 2.2, tries)
    shapes = rng.uniform((0.88, 0.0, 0.38, 0.5, 0.85), (1.0, 180.0, 0.52, 0.7, 1.1), (tries, 5))
    placed: list[tuple[float, float, float]] = []
    for (x, y), r, shape in zip(xy.tolist(), radii.tolist(), shapes.tolist(), strict=True):
        if len(placed) >= count:
            break
        if (x - center[0]) ** 2 + (y - center[1]) ** 2 < (keep_out + 0.85 * r) ** 2:
            continue
        # Red cells may touch and overlap a little, as in a smear's monolayer, not pile up.
        if any((x - px) ** 2 + (y - py) ** 2 < (1.4 * min(r, pr)) ** 2 for px, py, pr in placed):
            continue
        placed.append((x, y, r))
        _stamp_red_cell(rbc, pallor_map, x, y, r, *shape)


def _stamp_red_cell(
    rbc: np.ndarray, pallor_map: np.ndarray, x: float, y: float, r: float,
    aspect: float, angle: float, pallor: float, depth: float, density: float,
) -> None:
    """Add one red cell to the uint16 density maps of red cells and of their central pallor."""
    half = int(np.ceil(r)) + 2
    patch = 2 * half + 1
    x0, y0 = int(np.floor(x)) - half, int(np.floor(y)) - half
    one = 1 << _SHIFT
    centre = (int(round((x - x0) * one)), int(round((y - y0) * one)))
    body = np.zeros((patch, patch), dtype=np.uint8)
    hollow = np.zeros((patch, patch), dtype=np.uint8)
    axes = (int(r * one), int(r * aspect * one))
    cv2.ellipse(body, centre, axes, angle, 0, 360, int(_RBC_UNIT * density), -1, cv2.LINE_AA,
                _SHIFT)
    # The central pallor (the biconcave disc is thinner in the middle) goes to its own map,
    # which the caller blurs once per image to make it soft while the cell rim stays crisp.
    axes = (int(r * pallor * one), int(r * pallor * aspect * one))
    cv2.ellipse(hollow, centre, axes, angle, 0, 360, int(_RBC_UNIT * density * depth), -1,
                cv2.LINE_AA, _SHIFT)
    h, w = rbc.shape
    ax0, ay0 = max(x0, 0), max(y0, 0)
    ax1, ay1 = min(x0 + patch, w), min(y0 + patch, h)
    if ax0 < ax1 and ay0 < ay1:
        window = (slice(ay0 - y0, ay1 - y0), slice(ax0 - x0, ax1 - x0))
        rbc[ay0:ay1, ax0:ax1] += body[window]
        pallor_map[ay0:ay1, ax0:ax1] += hollow[window]


def _add_platelets(
    nucleus: np.ndarray, rng: np.random.Generator, center: tuple[float, float], keep_out: float
) -> None:
    size = nucleus.shape[0]
    for _ in range(int(rng.poisson(0.6))):
        x, y = rng.uniform(4, size - 4, 2)
        r = rng.uniform(1.5, 3.5)
        if np.hypot(x - center[0], y - center[1]) < keep_out + 10:
            continue
        blob = np.zeros((13, 13), dtype=np.uint8)
        cv2.circle(blob, (6 << _SHIFT, 6 << _SHIFT), int(r * (1 << _SHIFT)), 178, -1,
                   cv2.LINE_AA, _SHIFT)
        xi, yi = int(x) - 6, int(y) - 6
        if xi < 0 or yi < 0 or xi + 13 > size or yi + 13 > size:
            continue
        # Platelet granules take the nuclear (azurophilic) stain, paler.
        nucleus[yi : yi + 13, xi : xi + 13] += blob.astype(np.float32) / 255.0


def render_cell(
    rng: np.random.Generator,
    stain: Stain,
    variant: str = "typical",
    signal_strength: float = 1.0,
    *,
    size: int = 224,
    magnification: float = 1.0,
    jitter: float = 15.0,
    traits: np.ndarray | None = None,
) -> RenderedCell:
    """Render one smear image with a single lymphocyte of ``variant`` near the centre.

    ``magnification`` scales every object (ALL-IDB crops are imaged closer than the challenge's);
    ``jitter`` bounds the offset of the lymphocyte from the image centre, in pixels. ``traits``
    (one strength in [0, 1] per name in ``TRAITS``) replaces ``signal_strength`` for a typical
    or atypical cell: each trait then moves on its own.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if traits is not None and np.shape(traits) != (len(TRAITS),):
        raise ValueError(f"traits must hold {len(TRAITS)} strengths {TRAITS}, got {np.shape(traits)}")
    scale = stain.cell_scale * magnification
    morph = _sample_morphology(rng, variant, signal_strength, scale, traits)
    offset = rng.uniform(-jitter, jitter, 2) if jitter > 0 else np.zeros(2)
    cx, cy = size / 2 + offset[0], size / 2 + offset[1]

    # One density map per stained component; the stain turns them into colour at the end.
    rbc_u16 = np.zeros((size, size), dtype=np.uint16)
    pallor_u16 = np.zeros((size, size), dtype=np.uint16)
    _add_red_cells(rbc_u16, pallor_u16, rng, stain, (cx, cy), morph.cell_radius * 1.05, scale)
    pallor = cv2.GaussianBlur(pallor_u16.astype(np.float32), (0, 0), 3.0 * scale)
    rbc = cv2.subtract(rbc_u16.astype(np.float32), pallor) * np.float32(1.0 / _RBC_UNIT)
    nucleus_d = np.zeros((size, size), dtype=np.float32)
    cytoplasm_d = np.zeros((size, size), dtype=np.float32)
    _add_platelets(nucleus_d, rng, (cx, cy), morph.cell_radius)

    # The lymphocyte lives in a square region around its centre; outlines are drawn there.
    half = int(np.ceil(morph.cell_radius * 1.35)) + 4
    roi = 2 * half
    x0, y0 = int(round(cx)) - half, int(round(cy)) - half
    lx, ly = cx - x0, cy - y0
    cell_r = _radial_outline(rng, morph.cell_radius, morph.cell_harmonics, 0.0)
    nuc_radius = morph.cell_radius * morph.nucleus_ratio
    nuc_r = _radial_outline(rng, nuc_radius, morph.nucleus_harmonics, morph.notch_depth)
    # The nucleus sits off-centre but inside the cytoplasm: the free rim bounds the offset.
    rim = max(morph.cell_radius * (1 - morph.nucleus_ratio) - 1.0, 0.0)
    theta = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.2, 0.8) * rim
    nx, ny = lx + shift * np.cos(theta), ly + shift * np.sin(theta)
    nucleus = _fill((roi, roi), nx, ny, nuc_r)
    cell = np.maximum(_fill((roi, roi), lx, ly, cell_r), nucleus)

    nuc_f = nucleus.astype(np.float32) * np.float32(1 / 255)
    cell_f = cell.astype(np.float32) * np.float32(1 / 255)
    fine = _smooth_noise(rng, max(roi // 4, 4), roi)
    coarse = _smooth_noise(rng, max(roi // 11, 3), roi)
    chromatin = (1 - morph.chromatin_coarse) * fine + morph.chromatin_coarse * coarse
    texture = np.clip(1.0 + morph.chromatin_amplitude * chromatin, 0.45, 1.8)
    nuc_density = nuc_f * (morph.nucleus_density * texture)
    cyto_density = (cell_f - nuc_f) * (morph.cytoplasm_density * (1.0 + 0.06 * fine.T))
    if morph.nucleoli:
        nucleoli = np.zeros((roi, roi), dtype=np.uint8)
        for _ in range(morph.nucleoli):
            ang = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.0, 0.45) * nuc_radius
            rr = scale * rng.uniform(3.0, 5.0)
            c = (int((nx + dist * np.cos(ang)) * 16), int((ny + dist * np.sin(ang)) * 16))
            cv2.circle(nucleoli, c, int(rr * 16), 255, -1, cv2.LINE_AA, _SHIFT)
        nl = (cv2.GaussianBlur(nucleoli, (0, 0), 1.0).astype(np.float32) / 255.0) * nuc_f
        # Nucleoli are RNA-rich: paler in the nuclear stain, basophilic like the cytoplasm.
        nuc_density *= 1.0 - 0.6 * nl
        cyto_density += 1.1 * nl
    # Red cells never lie on top of the lymphocyte: its area replaces their absorbance.
    ys0, xs0 = max(y0, 0), max(x0, 0)
    ys1, xs1 = min(y0 + roi, size), min(x0 + roi, size)
    sl = (slice(ys0 - y0, ys1 - y0), slice(xs0 - x0, xs1 - x0))
    rbc[ys0:ys1, xs0:xs1] *= 1 - cell_f[sl]
    nucleus_d[ys0:ys1, xs0:xs1] += nuc_density[sl]
    cytoplasm_d[ys0:ys1, xs0:xs1] += cyto_density[sl]

    cell_mask = np.zeros((size, size), dtype=np.uint8)
    nucleus_mask = np.zeros((size, size), dtype=np.uint8)
    cell_mask[ys0:ys1, xs0:xs1] = np.where(cell[sl] >= 128, 255, 0)
    nucleus_mask[ys0:ys1, xs0:xs1] = np.where(nucleus[sl] >= 128, 255, 0)

    # Log-brightness: uneven illumination across the field plus per-pixel sensor noise
    # (uniform: cheaper to draw than Gaussian, and JPEG hides the difference).
    log_light = np.float32(0.03) * _smooth_noise(rng, 4, size)
    noise = rng.random((size, size), dtype=np.float32)
    log_light += (noise - np.float32(0.5)) * np.float32(stain.noise_sigma * np.sqrt(12.0))
    # Beer-Lambert in one OpenCV call: transmitted = light * exp(-sum_k density_k * od_k).
    wobble = rng.uniform(0.95, 1.05)  # per-image staining-thickness variation
    matrix = np.zeros((3, 5), dtype=np.float32)
    matrix[:, 0] = -wobble * stain.rbc_od
    matrix[:, 1] = -wobble * stain.nucleus_od
    matrix[:, 2] = -wobble * stain.cytoplasm_od
    matrix[:, 3] = 1.0
    matrix[:, 4] = np.log(stain.background * stain.brightness)
    log_image = cv2.transform(cv2.merge([rbc, nucleus_d, cytoplasm_d, log_light]), matrix)
    image = cv2.GaussianBlur(cv2.exp(log_image), (0, 0), stain.blur_sigma)
    rgb = cv2.convertScaleAbs(image, alpha=255.0)
    return RenderedCell(image=rgb, cell_mask=cell_mask, nucleus_mask=nucleus_mask)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes (4:2:0, like the challenge files); deterministic for equal input."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def encode_png(mask: np.ndarray) -> bytes:
    """Lossless single-channel PNG of a 0/255 mask."""
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_tiff(image: np.ndarray) -> bytes:
    """Uncompressed RGB TIFF, as the ALL-IDB crops are stored."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="TIFF")
    return buffer.getvalue()

"""What the end-to-end image-bag models share (``image_mil``, ``instance_cnn``): pixels-store
bags, the image encoder, augmentation and the device.

A pixels-store bag is ``(n_i, 3 * S * S)`` uint8 rows: the patient's images decoded,
stain-matched, segmented and resized once per cohort (``features: {kind: pixels, input_size:
S}``), so no epoch or fold decodes a JPEG again.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from preprocessing.backbones import list_backbones

BACKBONES = ("conv_ae", *list_backbones())  # the seed's encoder, or a torchvision backbone
DEVICES = ("auto", "cpu", "cuda")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREDICTION_CHUNK = 256  # images per CNN call at prediction: bounds activation memory


def side_of(width: int) -> int:
    """The image side ``S`` of a pixels row of ``3 * S * S`` values; raises otherwise."""
    side = int(round(math.sqrt(width / 3)))
    if side < 1 or 3 * side * side != width:
        raise ValueError(f"image bags must be pixels-store rows of 3 x S x S values "
                         f"(features: {{kind: pixels}}), got rows of {width}")
    return side


class ImageEncoder(nn.Module):
    """uint8 pixel rows ``(m, 3 * S * S)`` → ``(m, dim)``: reshape, scale to [0, 1],
    ImageNet-normalise for torchvision backbones, CNN.

    With ``reconstruction_weight`` λ > 0 (the ``conv_ae`` backbone only), the autoencoder's
    decoder is kept too: every forward pass under autograd leaves the mean squared reconstruction
    error of its images in ``reconstruction_loss``, which :meth:`auxiliary_loss` gives the
    network's training loss (λ times it)."""

    def __init__(self, backbone: str, side: int, weights: str | None, latent: int,
                 reconstruction_weight: float = 0.0) -> None:
        super().__init__()
        self.side = side
        self.decoder = None
        self.reconstruction_weight = float(reconstruction_weight)
        self.reconstruction_loss: torch.Tensor | None = None
        reconstruct = self.reconstruction_weight > 0
        if backbone == "conv_ae":
            from preprocessing.autoencoder import ConvAutoencoder

            autoencoder = ConvAutoencoder(side, latent)
            self.network = autoencoder.encoder
            if reconstruct:
                self.decoder = autoencoder.decoder
            self.dim = int(latent)
            self.normalize = False
        else:
            if reconstruct:
                raise ValueError(f"reconstruction needs the autoencoder's encoder (backbone "
                                 f"conv_ae), got backbone {backbone!r}")
            from preprocessing.backbones import build_backbone

            self.network = build_backbone(backbone, weights)
            self.dim = self.network.dim
            self.normalize = True
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and len(pixels) > PREDICTION_CHUNK:
            return torch.cat([self(part) for part in pixels.split(PREDICTION_CHUNK)])
        images = pixels.reshape(-1, 3, self.side, self.side).float() / 255.0
        if self.normalize:
            images = (images - self.mean) / self.std
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        codes = self.network(images)
        if self.decoder is not None and torch.is_grad_enabled():
            # The autoencoder in the loop: the training step adds this loss to the classifier's.
            self.reconstruction_loss = nn.functional.mse_loss(self.decoder(codes).float(), images)
        return codes.flatten(1).float()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """λ times the last training pass's reconstruction error (None without a decoder),
        taken and cleared: a fitted model must not hold the last step's autograd graph."""
        if self.decoder is None:
            return None
        loss, self.reconstruction_loss = self.reconstruction_loss, None
        return self.reconstruction_weight * loss


def augment(pixels: torch.Tensor, side: int, stain_jitter: float,
            generator: torch.Generator) -> torch.Tensor:
    """Random flips, 90° rotations and per-channel stain jitter, drawn per image, on uint8
    pixel rows ``(m, 3 * S * S)``; returns uint8 rows of the same shape."""
    images = pixels.reshape(-1, 3, side, side)
    count = len(images)
    draws = torch.rand(count, 3, generator=generator)
    turns = torch.randint(0, 4, (count,), generator=generator)
    out = torch.empty_like(images)
    for index in range(count):
        image = images[index]
        if draws[index, 0] < 0.5:
            image = image.flip(-1)
        if draws[index, 1] < 0.5:
            image = image.flip(-2)
        out[index] = torch.rot90(image, int(turns[index]), dims=(-2, -1))
    if stain_jitter:
        scale = 1 + stain_jitter * (2 * torch.rand(count, 3, 1, 1, generator=generator) - 1)
        shift = 255 * stain_jitter * (2 * torch.rand(count, 3, 1, 1, generator=generator) - 1)
        out = (out.float() * scale + shift).round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(count, -1)


def check_pixel_bags(bags) -> list[np.ndarray]:
    """Pixels-store bags, checked: non-empty uint8 2-D rows of one image size (errors name the
    bag)."""
    checked = []
    for index, bag in enumerate(bags):
        array = np.asarray(bag)
        if array.ndim == 2 and len(array) == 0:
            raise ValueError(f"bag {index} has no instances (images)")
        if array.dtype != np.uint8 or array.ndim != 2:
            raise ValueError(f"bag {index}: image models read uint8 pixel rows from a pixels "
                             f"store (features: {{kind: pixels}}), got a {array.dtype} array "
                             f"of shape {array.shape}")
        checked.append(array)
    if not checked:
        raise ValueError("no bags given")
    widths = {bag.shape[1] for bag in checked}
    if len(widths) > 1:
        raise ValueError(f"bags hold images of different sizes (row widths {sorted(widths)})")
    side_of(checked[0].shape[1])
    return checked


class PixelBags:
    """Mixin of the image models: their bags are pixels-store rows (``Tag.IMAGES``), checked at
    fit (which records the image side, ``input_size_``) and at prediction (same side)."""

    def _check_fit_bags(self, bags):
        bags = check_pixel_bags(bags)
        self.n_features_in_ = bags[0].shape[1]
        self.input_size_ = side_of(self.n_features_in_)
        return bags

    def _check_predict_bags(self, bags):
        check_is_fitted(self)
        bags = check_pixel_bags(bags)
        if bags[0].shape[1] != self.n_features_in_:
            raise ValueError(f"images are {side_of(bags[0].shape[1])} px, the model was fitted "
                             f"on {self.input_size_} px")
        return bags


def check_image_params(model) -> None:
    """The image options every image model has: backbone, device, stain jitter."""
    if model.backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {model.backbone!r}")
    if model.device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {model.device!r}")
    if model.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if not 0 <= model.stain_jitter < 1:
        raise ValueError(f"stain_jitter must lie in [0, 1), got {model.stain_jitter}")


def torch_device(name: str) -> torch.device:
    """``auto`` → CUDA when torch sees one, else the CPU; ``cpu`` / ``cuda`` as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision(device: torch.device):
    """The forward passes' precision context: bfloat16 autocast on CUDA, float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Throughput:
    """Training images per second, per epoch: ``batches`` and ``evaluate`` wrap the training
    loop's callbacks, ``count`` is told each step's images, and each history record gains
    ``train_images_per_s`` (the epoch's training steps only; evaluation excluded)."""

    def __init__(self) -> None:
        self.images = 0
        self.started = time.perf_counter()

    def count(self, images: int) -> None:
        self.images += int(images)

    def batches(self, batches):
        def timed(epoch: int):
            self.images, self.started = 0, time.perf_counter()
            return batches(epoch)
        return timed

    def evaluate(self, evaluate):
        def timed() -> dict:
            rate = self.images / max(time.perf_counter() - self.started, 1e-9)
            return {**evaluate(), "train_images_per_s": rate}
        return timed

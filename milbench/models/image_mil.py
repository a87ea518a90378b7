"""End-to-end image-bag MIL: a CNN trained with the bag head, on the images themselves.

Where every other bag model reads frozen instance vectors, ``image_mil`` trains the image
encoder with the MIL head, as the strongest published lymphocytosis systems do (Sahasrabudhe et
al., IEEE JBHI 2021: a multi-instance CNN in a mixture of experts with the clinical attributes).

Bags are the patients' preprocessed images from a pixels store (``features: {kind: pixels,
input_size: S, ...}``): ``(n_i, 3 * S * S)`` uint8 rows, decoded, stain-matched and segmented
once per cohort, so no epoch or fold decodes a JPEG again.

The network is D-MIL's (:class:`milbench.models.dmil.DMILNetwork`) with the CNN as its
instance encoder: encoder → embedding MLP → aggregation (``mean``, ``max``, ``attention``,
``gated_attention``) → bag MLP → clinical fusion:

* ``concat``: bag and clinical vectors concatenated before one linear head (D-MIL's);
* ``mixture_of_experts``: an image expert and a clinical expert each give a logit, and a gate
  computed from both weighs them per patient (a convex weight in (0, 1); ``fusion_gates``
  reports it), D-MIL's gated late fusion.

Encoders: a torchvision backbone by name (``resnet18`` default; ``weights`` a local file or a
torchvision weights-enum name, random when None: nothing is ever downloaded implicitly) or the
seed's convolutional autoencoder's encoder (``conv_ae``, ``latent`` wide).

Training (D-MIL's loop: class-weighted BCE, Adam, plateau scheduler, early stopping on the
validation loss of a stratified split of the training bags, history per epoch): each step
samples at most ``max_instances`` images per bag (memory stays bounded; prediction uses every
image) and augments them with random flips, 90° rotations and a per-image stain jitter (each
channel scaled and shifted by up to ``stain_jitter``). ``device="auto"`` trains on CUDA when
present, with bfloat16 autocast and channels-last convolutions there. Instance scores are the
aggregation's weights (attention weights; for ``mean``, 1/n).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from milbench.models.base import store_params
from milbench.models.dmil import AGGREGATIONS, NORMS, AttentionDMIL, DMILNetwork, network_settings
from milbench.models.registry import Tag
from preprocessing.backbones import list_backbones

BACKBONES = ("conv_ae", *list_backbones())  # the seed's encoder, or a torchvision backbone
FUSIONS = {"concat": "concat", "mixture_of_experts": "gated"}  # ours → DMILNetwork's
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
    ImageNet-normalise for torchvision backbones, CNN."""

    def __init__(self, backbone: str, side: int, weights: str | None, latent: int) -> None:
        super().__init__()
        self.side = side
        if backbone == "conv_ae":
            from preprocessing.autoencoder import ConvAutoencoder

            self.network = ConvAutoencoder(side, latent).encoder
            self.dim = int(latent)
            self.normalize = False
        else:
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
        return self.network(images).flatten(1).float()


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


class ImageMIL(AttentionDMIL):
    """End-to-end image-bag MIL with clinical fusion (see the module docstring)."""

    capabilities = frozenset({Tag.INSTANCE_SCORES})
    bag_kind = "pixels"
    evaluates_training_bags = False

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str | None = None,
        latent: int = 256,
        aggregation: str = "attention",
        fusion: str = "concat",
        max_instances: int = 16,
        augment: bool = True,
        stain_jitter: float = 0.05,
        attention_dim: int = 64,
        embedding_layers: int = 1,
        embedding_width: int = 128,
        bag_layers: int = 1,
        bag_width: int = 64,
        clinical_layers: int = 1,
        clinical_width: int = 32,
        dropout: float = 0.1,
        norm: str = "layer",
        use_clinical: bool | str = "auto",
        expert_loss_weight: float = 0.5,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        batch_size: int = 8,
        max_epochs: int = 30,
        patience: int = 8,
        validation_fraction: float = 0.2,
        lr_factor: float = 0.5,
        lr_patience: int = 3,
        class_weight: str | None = "balanced",
        device: str = "auto",
        torch_threads: int | None = None,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    # D-MIL's instance-vector options that images do not have.
    scale = False
    pca_components = None
    instance_dropout = 0.0

    def _validate_params(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.aggregation not in AGGREGATIONS or self.aggregation == "mean_std":
            raise ValueError(f"aggregation must be one of mean, max, attention, gated_attention, "
                             f"got {self.aggregation!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {tuple(FUSIONS)}, got {self.fusion!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
        if int(self.max_instances) < 1:
            raise ValueError(f"max_instances must be at least 1, got {self.max_instances}")
        if not 0 <= self.stain_jitter < 1:
            raise ValueError(f"stain_jitter must lie in [0, 1), got {self.stain_jitter}")
        if self.use_clinical not in ("auto", True, False):
            raise ValueError(f"use_clinical must be 'auto', True or False, got {self.use_clinical!r}")
        if int(self.batch_size) < 2:
            raise ValueError(f"batch_size must be at least 2 (real batches), got {self.batch_size}")
        if int(self.max_epochs) < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.class_weight not in ("balanced", None):
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if self.torch_threads is not None and int(self.torch_threads) < 1:
            raise ValueError(f"torch_threads must be None or at least 1, got {self.torch_threads}")

    # -- bags --------------------------------------------------------------------------------
    @staticmethod
    def _pixel_bags(bags) -> list[np.ndarray]:
        checked = []
        for index, bag in enumerate(bags):
            array = np.asarray(bag)
            if array.ndim == 2 and len(array) == 0:
                raise ValueError(f"bag {index} has no instances (images)")
            if array.dtype != np.uint8 or array.ndim != 2:
                raise ValueError(f"bag {index}: image_mil reads uint8 pixel rows from a pixels "
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

    def _check_fit_bags(self, bags):
        bags = self._pixel_bags(bags)
        self.n_features_in_ = bags[0].shape[1]
        self.input_size_ = side_of(self.n_features_in_)
        return bags

    def _check_predict_bags(self, bags):
        check_is_fitted(self)
        bags = self._pixel_bags(bags)
        if bags[0].shape[1] != self.n_features_in_:
            raise ValueError(f"images are {side_of(bags[0].shape[1])} px, the model was fitted "
                             f"on {self.input_size_} px")
        return bags

    def _fit_transform(self, bags):
        return None

    def _scale_bags(self, bags):
        return bags

    # -- network and batches -------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _network(self, n_features: int, n_clinical: int) -> DMILNetwork:
        settings = {**network_settings(self), "fusion": FUSIONS[self.fusion]}
        encoder = ImageEncoder(self.backbone, self.input_size_, self.weights, int(self.latent))
        return DMILNetwork(n_features, n_clinical, encoder, **settings)

    def _training_tensors(self, bags, clinical, rows, generator):
        """At most ``max_instances`` images per bag, drawn afresh each step, augmented."""
        sampled = []
        for row in rows:
            bag = bags[row]
            if len(bag) > self.max_instances:
                keep = torch.randperm(len(bag), generator=generator)[:int(self.max_instances)]
                bag = bag[np.sort(keep.numpy())]
            sampled.append(bag)
        if self.augment:
            sizes = np.cumsum([len(bag) for bag in sampled])[:-1]
            stacked = augment(torch.from_numpy(np.concatenate(sampled)), self.input_size_,
                              float(self.stain_jitter), generator)
            sampled = np.split(stacked.numpy(), sizes)
        x, mask, _ = self._tensors(sampled, None, np.arange(len(rows)))
        clinical_rows = None if clinical is None else torch.from_numpy(clinical[rows]).to(
            self._device())
        return x, mask, clinical_rows

    def _autocast(self):
        if self._device().type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

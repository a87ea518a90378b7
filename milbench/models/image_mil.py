"""End-to-end image-bag MIL: a CNN trained with the bag head, on the images themselves.

Where every other bag model reads frozen instance vectors, ``image_mil`` trains the image
encoder with the MIL head, as the strongest published lymphocytosis systems do (Sahasrabudhe et
al., IEEE JBHI 2021: a multi-instance CNN in a mixture of experts with the clinical attributes).

Bags are the patients' preprocessed images from a pixels store (``features: {kind: pixels,
input_size: S, ...}``): ``(n_i, 3 * S * S)`` uint8 rows, decoded, stain-matched and segmented
once per cohort, so no epoch or fold decodes a JPEG again.

The network is D-MIL's (:class:`milbench.models.bag_network.DMILNetwork`) with the CNN as its
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

The autoencoder in the loop (the seed report's D-MIL variant), with ``backbone: conv_ae``:
``reconstruction_weight`` λ > 0 keeps the autoencoder's decoder, and each step's loss becomes
classification + λ · reconstruction (mean squared error of the step's augmented images).
``encoder_learning_rate`` gives the encoder (and decoder) its own learning rate.
``schedule: two_phase`` trains with two Adam optimisers: for ``warmup_epochs`` the classifier
is frozen and only the encoder's optimiser steps, then phases of ``phase_epochs`` alternate
which of the two steps (fixed learning rates; ``history_`` names the phase and which part
trained; early stopping watches the alternating part). The seed's settings: λ > 0, 10 warmup
epochs, ``learning_rate: 1e-6`` for the classifier, ``encoder_learning_rate: 1e-3``.
"""

from __future__ import annotations

from functools import partial

import torch

from milbench.models.bag_inputs import ImageInputs
from milbench.models.bag_network import NORMS, DMILNetwork
from milbench.models.bag_training import check_training_params
from milbench.models.base import store_params
from milbench.models.dmil import (
    AttentionDMIL,
    Schedule,
    network_settings,
    plateau_settings,
    plateau_training,
)
from milbench.models.images import ImageEncoder, PixelBags, check_image_params
from milbench.models.registry import Tag
from milbench.training import EarlyStopping, TrainingResult, train

FUSIONS = {"concat": "concat", "mixture_of_experts": "gated"}  # ours → DMILNetwork's
IMAGE_AGGREGATIONS = ("mean", "max", "attention", "gated_attention")
SCHEDULES = ("joint", "two_phase")


class AlternatingOptimizers:
    """Two optimisers behind the interface the training loop uses: both are zeroed every step,
    only the ``active`` one steps, so the other's parameters stay frozen (their batch-norm
    statistics still move in train mode)."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.active = next(iter(optimizers))

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizers[self.active].param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizers[self.active].step()

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}


def two_phase_training(network, step, batches, evaluate, has_validation: bool, *,
                       learning_rate: float, encoder_learning_rate: float | None,
                       weight_decay: float, warmup_epochs: int, phase_epochs: int,
                       max_epochs: int, patience: int) -> TrainingResult:
    """The seed report's schedule: the classifier frozen for ``warmup_epochs`` while the
    encoder (and decoder) learn, then phases of ``phase_epochs`` alternating which of two Adam
    optimisers steps. Learning rates stay fixed; early stopping watches the alternating part."""
    encoder, rest = network.encoder_split()
    optimizers = AlternatingOptimizers(
        classifier=torch.optim.Adam(rest, lr=learning_rate, weight_decay=weight_decay),
        encoder=torch.optim.Adam(encoder, lr=encoder_learning_rate or learning_rate,
                                 weight_decay=weight_decay))
    warmup = min(int(warmup_epochs), int(max_epochs))

    def record() -> dict:
        return {**evaluate(), "trains": optimizers.active}

    result = TrainingResult()
    if warmup:
        optimizers.active = "encoder"
        train(network, optimizers, step, batches, epochs=warmup, evaluate=record,
              phase="warmup", result=result)

    def alternating(epoch: int):
        phase = (epoch // int(phase_epochs)) % 2
        optimizers.active = ("classifier", "encoder")[phase]
        return batches(warmup + epoch)

    if int(max_epochs) > warmup:
        train(network, optimizers, step, alternating, epochs=int(max_epochs) - warmup,
              evaluate=record, phase="alternating", result=result,
              early_stopping=EarlyStopping("val_loss", patience) if has_validation else None)
        if has_validation:  # early stopping numbered the kept epoch within its phase
            result.best_epoch += warmup
    return result


class ImageMIL(PixelBags, AttentionDMIL):
    """End-to-end image-bag MIL with clinical fusion (see the module docstring): D-MIL's
    estimator given image inputs, a network with the CNN as its encoder, and its schedule."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.IMAGES, Tag.CLINICAL_OPTIONAL,
                          Tag.INSTANCE_SCORES})

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
        reconstruction_weight: float = 0.0,
        schedule: str = "joint",
        warmup_epochs: int = 10,
        phase_epochs: int = 5,
        encoder_learning_rate: float | None = None,
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

    def _validate_params(self) -> None:
        check_training_params(self)
        check_image_params(self)
        if self.aggregation not in IMAGE_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {IMAGE_AGGREGATIONS}, "
                             f"got {self.aggregation!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {tuple(FUSIONS)}, got {self.fusion!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if int(self.max_instances) < 1:
            raise ValueError(f"max_instances must be at least 1, got {self.max_instances}")
        if not self.reconstruction_weight >= 0:
            raise ValueError(f"reconstruction_weight must be >= 0, got {self.reconstruction_weight}")
        if self.reconstruction_weight and self.backbone != "conv_ae":
            raise ValueError(f"reconstruction_weight > 0 needs backbone conv_ae (the autoencoder's "
                             f"encoder), got backbone {self.backbone!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if int(self.warmup_epochs) < 0 or int(self.phase_epochs) < 1:
            raise ValueError(f"warmup_epochs must be >= 0 and phase_epochs >= 1, got "
                             f"{self.warmup_epochs} and {self.phase_epochs}")
        if self.encoder_learning_rate is not None and not self.encoder_learning_rate > 0:
            raise ValueError(f"encoder_learning_rate must be None or > 0, "
                             f"got {self.encoder_learning_rate}")

    # -- the parts ---------------------------------------------------------------------------
    def _inputs(self) -> ImageInputs:
        return ImageInputs(self.device, self.input_size_, self.max_instances, self.augment,
                           self.stain_jitter)

    def _network(self, n_features: int, n_clinical: int) -> DMILNetwork:
        # D-MIL's options that image_mil does not offer: no zoo pooling settings, no mean skip.
        settings = {**network_settings(self), "fusion": FUSIONS[self.fusion],
                    "pool_params": None, "mean_skip": False}
        encoder = ImageEncoder(self.backbone, self.input_size_, self.weights, int(self.latent),
                               reconstruction_weight=self.reconstruction_weight)
        return DMILNetwork(n_features, n_clinical, encoder, **settings)

    def _schedule(self) -> Schedule:
        if self.schedule == "two_phase":
            return partial(two_phase_training, learning_rate=self.learning_rate,
                           encoder_learning_rate=self.encoder_learning_rate,
                           weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs,
                           phase_epochs=self.phase_epochs, max_epochs=self.max_epochs,
                           patience=self.patience)
        return partial(plateau_training, **plateau_settings(self),
                       encoder_learning_rate=self.encoder_learning_rate)

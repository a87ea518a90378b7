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

import numpy as np
import torch

from milbench.models.bag_network import NORMS, DMILNetwork
from milbench.models.bag_training import check_training_params
from milbench.models.base import store_params
from milbench.models.dmil import AttentionDMIL, network_settings
from milbench.models.images import (
    ImageEncoder,
    PixelBags,
    Throughput,
    augment,
    check_image_params,
    precision,
    torch_device,
)
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


class ImageMIL(PixelBags, AttentionDMIL):
    """End-to-end image-bag MIL with clinical fusion (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.IMAGES, Tag.CLINICAL_OPTIONAL,
                          Tag.INSTANCE_SCORES})

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

    # D-MIL's instance-vector options that images do not have.
    scale = False
    pca_components = None
    instance_dropout = 0.0
    pool_params = None
    mean_skip = False
    swa_epochs = 0

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

    # -- bags --------------------------------------------------------------------------------
    def _fit_transform(self, bags):
        return None

    def _scale_bags(self, bags):
        return bags

    # -- network and batches -------------------------------------------------------------------
    def _device(self) -> torch.device:
        return torch_device(self.device)

    def _network(self, n_features: int, n_clinical: int) -> DMILNetwork:
        settings = {**network_settings(self), "fusion": FUSIONS[self.fusion]}
        encoder = ImageEncoder(self.backbone, self.input_size_, self.weights, int(self.latent),
                               reconstruction_weight=self.reconstruction_weight)
        return DMILNetwork(n_features, n_clinical, encoder, **settings)

    # -- optimisation: the autoencoder in the loop, two optimisers -------------------------------
    @staticmethod
    def _encoder_split(network) -> tuple[list, list]:
        """(the image encoder's parameters, decoder included; every other parameter)."""
        encoder = list(network.embed[0].parameters())
        owned = {id(parameter) for parameter in encoder}
        return encoder, [p for p in network.parameters() if id(p) not in owned]

    def _parameter_groups(self, network) -> list[dict]:
        if self.encoder_learning_rate is None:
            return super()._parameter_groups(network)
        encoder, rest = self._encoder_split(network)
        return [{"params": rest}, {"params": encoder, "lr": self.encoder_learning_rate}]

    def _optimise(self, network, step, batches, evaluate, has_validation: bool) -> TrainingResult:
        # The step's image count reaches the history (train_images_per_s) through this.
        self._throughput = Throughput()
        try:
            return self._optimise_schedule(network, step, self._throughput.batches(batches),
                                           self._throughput.evaluate(evaluate), has_validation)
        finally:
            del self._throughput

    def _optimise_schedule(self, network, step, batches, evaluate,
                           has_validation: bool) -> TrainingResult:
        if self.schedule == "joint":
            return super()._optimise(network, step, batches, evaluate, has_validation)
        # The seed report's schedule: the classifier frozen for warmup_epochs while the encoder (and
        # decoder) learn, then phases of phase_epochs alternating which of the two optimisers
        # steps. Learning rates stay fixed; early stopping watches the alternating part.
        encoder, rest = self._encoder_split(network)
        optimizers = AlternatingOptimizers(
            classifier=torch.optim.Adam(rest, lr=self.learning_rate,
                                        weight_decay=self.weight_decay),
            encoder=torch.optim.Adam(encoder, lr=self.encoder_learning_rate or self.learning_rate,
                                     weight_decay=self.weight_decay))
        warmup = min(int(self.warmup_epochs), int(self.max_epochs))

        def record() -> dict:
            return {**evaluate(), "trains": optimizers.active}

        result = TrainingResult()
        if warmup:
            optimizers.active = "encoder"
            train(network, optimizers, step, batches, epochs=warmup, evaluate=record,
                  phase="warmup", result=result)

        def alternating(epoch: int):
            phase = (epoch // int(self.phase_epochs)) % 2
            optimizers.active = ("classifier", "encoder")[phase]
            return batches(warmup + epoch)

        if int(self.max_epochs) > warmup:
            train(network, optimizers, step, alternating, epochs=int(self.max_epochs) - warmup,
                  evaluate=record, phase="alternating", result=result,
                  early_stopping=EarlyStopping("val_loss", self.patience) if has_validation
                  else None)
            if has_validation:  # early stopping numbered the kept epoch within its phase
                result.best_epoch += warmup
        return result

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
        self._throughput.count(sum(len(bag) for bag in sampled))
        x, mask, _ = self._tensors(sampled, None, np.arange(len(rows)))
        clinical_rows = None if clinical is None else torch.from_numpy(clinical[rows]).to(
            self._device())
        return x, mask, clinical_rows

    def _autocast(self):
        return precision(self._device())

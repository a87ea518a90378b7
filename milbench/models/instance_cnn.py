"""The naive instance-level CNN (seed appendix): every image labelled with its patient's label.

A CNN (a torchvision backbone by name, or the seed's autoencoder encoder, as ``image_mil``) with
one linear output is trained on single images, each carrying its bag's label: the assumption
that every cell of a tumoral patient looks tumoral, which MIL does not make. It is the baseline
the MIL image models have to beat.

* Training: each epoch draws at most ``images_per_bag`` images from every training bag (so
  large bags do not dominate), shuffles them into batches of ``batch_size`` images, augments
  them (flips, 90° rotations, stain jitter) and minimises the class-weighted BCE (weights from
  the training bags' prevalence). Early stopping watches the bag-level loss of a stratified
  validation split of the training bags; the plateau scheduler steps on it too.
* The bag score pools every image's probability: ``mean`` or ``max``.
* ``head: xgboost`` learns the decision from [bag score, clinical attributes] with gradient-
  boosted trees. Its training rows' bag scores are out-of-fold (``oof_folds`` inner CNN fits),
  since the CNN's scores on its own training bags are overconfident; this multiplies the fit
  time by ``oof_folds + 1``. ``head: none`` thresholds the bag score at 0.5.

Instance scores are the images' probabilities. ``device: auto`` trains on CUDA when present
(bfloat16 autocast, channels-last).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils import check_random_state
from torch import nn

from milbench.core.clinical import clinical_design_matrix
from milbench.models.bag_training import balanced_class_weights, check_training_params, validation_split
from milbench.models.base import (
    BagClassifier,
    check_clinical,
    inner_folds,
    out_of_fold,
    store_params,
)
from milbench.models.boosting import boosted_trees, positive_weight
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
from milbench.training import EarlyStopping, index_batches, seeded, torch_threads, train

POOLINGS = ("mean", "max")
HEADS = ("none", "xgboost")
EPSILON = 1e-6  # keeps the bag-level log loss finite at probabilities 0 and 1


class ImageClassifier(nn.Module):
    """Pixel rows → one logit per image."""

    def __init__(self, encoder: ImageEncoder, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(encoder.dim, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(self.encoder(pixels))).squeeze(-1)


class InstanceCNN(PixelBags, BagClassifier):
    """Image-level CNN trained with the bag label, bag = mean or max of image probabilities,
    optionally XGBoost over [bag score, clinical] (see the module docstring)."""

    mil_tags = frozenset({Tag.INSTANCES, Tag.IMAGES, Tag.CLINICAL_OPTIONAL,
                          Tag.INSTANCE_SCORES})


    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str | None = None,
        latent: int = 256,
        pooling: str = "mean",
        head: str = "none",
        oof_folds: int = 3,
        use_clinical: bool | str = "auto",
        head_estimators: int = 100,
        head_depth: int = 2,
        images_per_bag: int = 16,
        augment: bool = True,
        stain_jitter: float = 0.05,
        dropout: float = 0.2,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        batch_size: int = 64,
        max_epochs: int = 15,
        patience: int = 5,
        validation_fraction: float = 0.2,
        lr_factor: float = 0.5,
        lr_patience: int = 2,
        class_weight: str | None = "balanced",
        device: str = "auto",
        torch_threads: int | None = None,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _validate_params(self) -> None:
        check_training_params(self)
        check_image_params(self)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "xgboost" and int(self.oof_folds) < 2:
            raise ValueError(f"oof_folds must be at least 2 with head xgboost, got {self.oof_folds}")
        if self.head == "none" and self.use_clinical is True:
            raise ValueError("use_clinical=True needs head xgboost (the CNN reads images only)")
        if int(self.images_per_bag) < 1:
            raise ValueError(f"images_per_bag must be at least 1, got {self.images_per_bag}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    # -- bags --------------------------------------------------------------------------------
    # -- fitting -----------------------------------------------------------------------------
    def _fit(self, bags, labels, clinical) -> None:
        if self.use_clinical is True and clinical is None:
            raise ValueError("use_clinical=True but fit got no clinical table")
        self.uses_clinical_ = (self.head == "xgboost" and self.use_clinical is not False
                               and clinical is not None)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self.network_, result = self._fit_network(bags, labels, seed)
        self.history_, self.best_epoch_, self.n_epochs_ = (
            result.history, result.best_epoch, result.n_epochs)
        self.head_ = None
        if self.head == "xgboost":
            def held_out_scores(fold, train, held_out):
                network, _ = self._fit_network([bags[i] for i in train], labels[train],
                                               seed + 1 + fold)
                return self._bag_scores(network, [bags[i] for i in held_out])

            scores = out_of_fold(inner_folds(labels, self.oof_folds, seed, "instance_cnn"),
                                 held_out_scores)
            self.head_ = boosted_trees(
                "xgboost", n_estimators=int(self.head_estimators), learning_rate=0.1,
                max_depth=int(self.head_depth), scale_pos_weight=positive_weight(labels),
                random_state=seed,
            ).fit(self._head_design(scores, clinical, len(bags)), labels)

    def _fit_network(self, bags, labels, seed: int):
        """Train one image classifier on ``bags``; returns (network, training result)."""
        device = torch_device(self.device)
        train_rows, val_rows = validation_split(labels, self.validation_fraction, seed)
        class_weights = balanced_class_weights(labels[train_rows], self.class_weight)
        with seeded(seed, self.torch_threads) as generator:
            encoder = ImageEncoder(self.backbone, self.input_size_, self.weights, int(self.latent))
            network = ImageClassifier(encoder, float(self.dropout)).to(device)
            # Training images: (bag row, image row) pairs, redrawn every epoch.
            def epoch_batches(epoch: int) -> list[np.ndarray]:
                pairs = []
                for row in train_rows:
                    count = len(bags[row])
                    chosen = (torch.randperm(count, generator=generator)[:int(self.images_per_bag)]
                              .numpy())
                    pairs.append(np.column_stack([np.full(len(chosen), row), chosen]))
                pairs = np.concatenate(pairs)
                order = torch.randperm(len(pairs), generator=generator).numpy()
                return index_batches(pairs[order], self.batch_size)

            throughput = Throughput()

            def step(pairs: np.ndarray) -> torch.Tensor:
                throughput.count(len(pairs))
                pixels = torch.from_numpy(np.stack([bags[b][i] for b, i in pairs]))
                if self.augment:
                    pixels = augment(pixels, self.input_size_, float(self.stain_jitter), generator)
                targets = torch.from_numpy(labels[pairs[:, 0]].astype(np.float32)).to(device)
                weights = torch.from_numpy(
                    class_weights[labels[pairs[:, 0]]].astype(np.float32)).to(device)
                with precision(device):
                    logits = network(pixels.to(device)).float()
                losses = nn.functional.binary_cross_entropy_with_logits(
                    logits, targets, reduction="none")
                return (weights * losses).mean()

            def evaluate() -> dict:
                if not len(val_rows):
                    return {}
                held = labels[val_rows]
                scores = np.clip(self._bag_scores(network, [bags[i] for i in val_rows]),
                                 EPSILON, 1 - EPSILON)
                losses = -(held * np.log(scores) + (1 - held) * np.log(1 - scores))
                return {"val_loss": float(np.mean(class_weights[held] * losses)),
                        "val_balanced_accuracy": float(balanced_accuracy_score(
                            held, (scores >= 0.5).astype(int)))}

            optimizer = torch.optim.Adam(network.parameters(), lr=self.learning_rate,
                                         weight_decay=self.weight_decay)
            has_validation = len(val_rows) > 0
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=self.lr_factor, patience=self.lr_patience)
            result = train(
                network, optimizer, step, throughput.batches(epoch_batches),
                epochs=int(self.max_epochs), evaluate=throughput.evaluate(evaluate),
                scheduler=scheduler,
                scheduler_monitor="val_loss" if has_validation else "train_loss",
                early_stopping=EarlyStopping("val_loss", self.patience) if has_validation
                else None)
        return network, result

    # -- prediction --------------------------------------------------------------------------
    def _image_probabilities(self, network, bags) -> list[np.ndarray]:
        device = torch_device(self.device)
        network.eval()
        probabilities = []
        with torch.no_grad(), torch_threads(self.torch_threads), precision(device):
            for bag in bags:
                logits = network(torch.from_numpy(np.ascontiguousarray(bag)).to(device))
                probabilities.append(torch.sigmoid(logits.double()).cpu().numpy())
        return probabilities

    def _bag_scores(self, network, bags) -> np.ndarray:
        pool = np.mean if self.pooling == "mean" else np.max
        return np.array([pool(p) for p in self._image_probabilities(network, bags)])

    def _head_design(self, scores: np.ndarray, clinical, n_bags: int) -> np.ndarray:
        design = scores.reshape(-1, 1)
        if self.uses_clinical_:
            design = np.hstack([design, clinical_design_matrix(check_clinical(clinical, n_bags))])
        return design

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        bags = self._check_predict_bags(bags)
        scores = self._bag_scores(self.network_, bags)
        if self.head_ is None:
            return np.column_stack([1.0 - scores, scores])
        return self.head_.predict_proba(self._head_design(scores, clinical, len(bags)))

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """Each image's probability of the tumoral label."""
        bags = self._check_predict_bags(bags)
        return self._image_probabilities(self.network_, bags)

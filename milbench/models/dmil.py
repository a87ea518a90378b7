"""Attention-based deep MIL with a clinical branch (Ilse, Tomczak & Welling 2018; the seed report's D-MIL).

Instance feature vectors → instance MLP embedding → aggregation into one bag vector → bag MLP;
clinical attributes (age, log lymphocyte count, male) → clinical MLP; both concatenated → linear
→ logit. Aggregations, by name:

* ``attention``: a_i = softmax_i(wᵀ tanh(V h_i)), z = Σ a_i h_i;
* ``gated_attention``: a_i = softmax_i(wᵀ (tanh(V h_i) ⊙ sigm(U h_i)));
* ``max``: element-wise max over instances;
* ``mean``: the instance mean;
* ``mean_std``: instance mean concatenated with instance standard deviation;
* the model zoo (:mod:`milbench.models.zoo_pooling`): ``transformer_abmil``, ``transmil``,
  ``dsmil``, ``clam_sb``, ``dtfd``, ``mi_net``, ``mi_net_ds``, their settings in
  ``pool_params``, their own losses (deep supervision, instance clustering) added to the bag's.

Clinical fusion, by name (``fusion``):

* ``concat``: the bag and clinical vectors are concatenated before one linear head (the seed's);
* ``gated``: late fusion. An image head and a clinical head each give a logit; a gate computed
  from both vectors weighs them per patient, logit = g · image + (1 − g) · clinical. Each head
  also learns from the label on its own (``expert_loss_weight``), and the gate starts leaning
  on the clinical head (initial g ≈ 0.12), so the images must earn their weight: when they
  carry little, the model stays close to a clinical-only classifier instead of drowning it.
  ``gate_`` weights per patient come from ``fusion_gates``.

Bags train in real batches: each batch is padded to its largest bag with a mask
(:mod:`milbench.models.collate`). Only real instances go through the instance MLP and every
aggregation ignores padded rows, so padding never changes an output.

Instance scores are the attention weights (for ``max``, the share of embedding dimensions whose
maximum an instance holds; for ``mean_std``, the uniform weight 1/n), each bag's summing to 1.

Training: class-weighted BCE (weights from the training prevalence), Adam, ReduceLROnPlateau
(factor 0.8, patience 4) on the validation loss of an internal stratified split of the training
bags (``validation_fraction``), early stopping that restores the best epoch; per-epoch loss and
balanced accuracy (train and validation) are kept in ``history_``. ``instance_dropout`` hides
each real instance of a training batch with that probability (a bag augmentation; never at
prediction). ``swa_epochs`` > 0 averages the weights of the last that many epochs (stochastic
weight averaging, Izmailov et al. 2018, through torch's ``AveragedModel``); ``mean_skip`` puts
the instance mean beside the learned pooling in the bag vector (a skip past the attention: the
mean-pooled bag is a strong baseline on the classic benchmarks). Everything random runs under a
forked torch RNG seeded from ``random_state``, so fits are reproducible on CPU and do not disturb
the caller's global torch RNG.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils import check_random_state
from torch import nn

from milbench.core.clinical import clinical_design_matrix
from milbench.models.bag_inputs import VectorInputs
from milbench.models.bag_network import (
    AGGREGATIONS,
    FUSIONS,
    NORMS,
    DMILNetwork,
    check_pool_params,
    layer_widths,
)
from milbench.models.bag_training import (
    balanced_class_weights,
    check_training_params,
    check_weight_averaging,
    validation_split,
)
from milbench.models.base import BagClassifier, check_clinical, store_params
from milbench.models.registry import Tag
from milbench.training import (
    EarlyStopping,
    TrainingResult,
    index_batches,
    seeded,
    torch_threads,
    train,
)

# A training schedule: (network, step, batches, evaluate, has_validation) → its result.
Schedule = Callable[..., TrainingResult]


def network_settings(model: AttentionDMIL) -> dict:
    """The architecture arguments of :class:`DMILNetwork` among the estimator's parameters
    (the one place their defaults are declared; an estimator without some gives them itself)."""
    params = model.get_params(deep=False)
    return {p.name: params[p.name]
            for p in inspect.signature(DMILNetwork.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name in params}


def plateau_training(network, step, batches, evaluate, has_validation: bool, *,
                     learning_rate: float, weight_decay: float, lr_factor: float,
                     lr_patience: int, max_epochs: int, patience: int, swa_epochs: int = 0,
                     encoder_learning_rate: float | None = None) -> TrainingResult:
    """D-MIL's schedule: Adam with the plateau scheduler, early stopping on the validation
    loss, the last ``swa_epochs`` averaged (``encoder_learning_rate``: the encoder's own, see
    :meth:`DMILNetwork.parameter_groups`). Without a validation part: train for max_epochs and
    keep the last epoch (train_loss is then the epoch's mean step loss when the training part
    is not scored)."""
    optimizer = torch.optim.Adam(network.parameter_groups(encoder_learning_rate),
                                 lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=lr_factor, patience=lr_patience
    )
    return train(
        network, optimizer, step, batches, epochs=max_epochs, evaluate=evaluate,
        scheduler=scheduler, scheduler_monitor="val_loss" if has_validation else "train_loss",
        early_stopping=EarlyStopping("val_loss", patience) if has_validation else None,
        average_last=int(swa_epochs))


def plateau_settings(model) -> dict:
    """The arguments of :func:`plateau_training` that every bag network's estimator has."""
    params = model.get_params(deep=False)
    return {name: params[name] for name in ("learning_rate", "weight_decay", "lr_factor",
                                            "lr_patience", "max_epochs", "patience")}


class AttentionDMIL(BagClassifier):
    """Attention D-MIL with an optional clinical MLP (see the module docstring).

    ``use_clinical``: ``"auto"`` uses the clinical table when ``fit`` gets one, ``True`` requires
    it, ``False`` ignores it (the ablation).

    The estimator is made of three parts, each given by one method: how bags become batches
    (``_inputs``: instance vectors here), the network (``_network``: no encoder here) and the
    training schedule (``_schedule``). ``image_mil`` gives its own three and shares the rest.
    """

    mil_tags = frozenset({Tag.INSTANCES, Tag.CLINICAL_OPTIONAL, Tag.INSTANCE_SCORES})

    def __init__(
        self,
        aggregation: str = "attention",
        attention_dim: int = 64,
        embedding_layers: int = 1,
        embedding_width: int = 128,
        bag_layers: int = 1,
        bag_width: int = 128,
        clinical_layers: int = 1,
        clinical_width: int = 128,
        dropout: float = 0.05,
        norm: str = "layer",
        instance_dropout: float = 0.0,
        use_clinical: bool | str = "auto",
        fusion: str = "concat",
        expert_loss_weight: float = 0.5,
        pool_params: dict | None = None,
        mean_skip: bool = False,
        scale: bool = True,
        pca_components: int | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 16,
        max_epochs: int = 100,
        patience: int = 20,
        validation_fraction: float = 0.2,
        lr_factor: float = 0.8,
        lr_patience: int = 4,
        swa_epochs: int = 0,
        class_weight: str | None = "balanced",
        torch_threads: int | None = 1,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    # -- validation and preprocessing ------------------------------------------------------
    def _validate_params(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not self.expert_loss_weight >= 0:
            raise ValueError(f"expert_loss_weight must be >= 0, got {self.expert_loss_weight}")
        check_training_params(self)
        check_pool_params(self.aggregation, self.pool_params)
        if not 0 <= self.instance_dropout < 1:
            raise ValueError(f"instance_dropout must lie in [0, 1), got {self.instance_dropout}")
        try:
            layer_widths(self.embedding_layers, self.embedding_width)
        except (TypeError, ValueError) as error:
            raise ValueError(f"embedding_width: {error}") from None
        check_weight_averaging(self)

    # -- the parts ---------------------------------------------------------------------------
    def _inputs(self) -> VectorInputs:
        """Instance vectors: scaled (+ PCA), instance dropout in training."""
        return VectorInputs(self.scale, self.pca_components, self.instance_dropout)

    def _network(self, n_features: int, n_clinical: int) -> DMILNetwork:
        """Instance vectors go straight to the embedding MLP: no encoder."""
        return DMILNetwork(n_features, n_clinical, **network_settings(self))

    def _schedule(self) -> Schedule:
        return partial(plateau_training, **plateau_settings(self), swa_epochs=self.swa_epochs)

    def _clinical_inputs(self, clinical, n_bags: int) -> np.ndarray | None:
        if not self.uses_clinical_:
            return None
        design = clinical_design_matrix(check_clinical(clinical, n_bags))
        return ((design - self.clinical_mean_) / self.clinical_scale_).astype(np.float32)

    # -- batching ----------------------------------------------------------------------------
    def _batches(self, order: np.ndarray) -> list[np.ndarray]:
        return index_batches(order, self.batch_size)

    def _forward_all(self, network, inputs, bags, clinical):
        """Eval-mode logits and instance weights for every bag, in batches of ``batch_size``."""
        network.eval()
        logits, weights = [], []
        with torch.no_grad(), torch_threads(self.torch_threads), inputs.autocast():
            for rows in self._batches(np.arange(len(bags))):
                x, mask, clinical_rows = inputs.tensors(bags, clinical, rows)
                batch_logits, batch_weights = network(x, mask, clinical_rows)
                logits.append(batch_logits.double().cpu().numpy())
                batch_weights = batch_weights.double().cpu().numpy()
                for i, row_mask in enumerate(mask.cpu().numpy()):
                    weights.append(batch_weights[i][row_mask])
        return np.concatenate(logits), weights

    # -- training ----------------------------------------------------------------------------
    def _fit(self, bags, labels, clinical) -> None:
        if self.use_clinical is True and clinical is None:
            raise ValueError("use_clinical=True but fit got no clinical table")
        self.uses_clinical_ = self.use_clinical is not False and clinical is not None

        inputs = self._inputs()
        self.transform_ = inputs.fit(bags)
        if self.uses_clinical_:
            # Standardised age, log count, male; statistics from the training bags only.
            design = clinical_design_matrix(check_clinical(clinical, len(bags)))
            self.clinical_mean_ = design.mean(axis=0)
            spread = design.std(axis=0)
            self.clinical_scale_ = np.where(spread > 0, spread, 1.0)
        scaled = inputs.prepare(bags, self.transform_)
        clinical_inputs = self._clinical_inputs(clinical, len(bags))

        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        train_rows, val_rows = validation_split(labels, self.validation_fraction, seed)
        with seeded(seed, self.torch_threads) as generator:
            self.network_ = self._train(
                inputs, scaled, labels, clinical_inputs, train_rows, val_rows, generator)
        self.gated_fusion_ = self.network_.fusion is not None

    def _instance_tags(self) -> frozenset[Tag]:
        # Fitted with a gate between the image and clinical experts: fusion_gates answers.
        return frozenset({Tag.FUSION_GATE}) if self.__dict__.get("gated_fusion_") else frozenset()

    def _evaluate(self, network, inputs, bags, clinical, labels,
                  class_weights) -> tuple[float, float]:
        logits, _ = self._forward_all(network, inputs, bags, clinical)
        targets = torch.from_numpy(labels.astype(np.float64))
        losses = nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(logits), targets, reduction="none"
        ).numpy()
        loss = float(np.mean(class_weights[labels] * losses))
        return loss, float(balanced_accuracy_score(labels, (logits >= 0).astype(int)))

    def _train(self, inputs, bags, labels, clinical, train_rows, val_rows,
               generator) -> DMILNetwork:
        network = self._network(bags[0].shape[1], 0 if clinical is None else clinical.shape[1])
        network = network.to(inputs.device)
        train_labels = labels[train_rows]
        class_weights = balanced_class_weights(train_labels, self.class_weight)
        sample_weights = torch.from_numpy(class_weights[labels].astype(np.float32)).to(
            inputs.device)
        targets = torch.from_numpy(labels.astype(np.float32)).to(inputs.device)

        def subset(rows):
            return [bags[i] for i in rows], (None if clinical is None else clinical[rows])

        train_bags, train_clinical = subset(train_rows)
        val_bags, val_clinical = subset(val_rows)

        def epoch_batches(epoch: int) -> list[np.ndarray]:
            permutation = torch.randperm(len(train_rows), generator=generator).numpy()
            return self._batches(train_rows[permutation])

        def step(rows: np.ndarray) -> torch.Tensor:
            x, mask, clinical_rows = inputs.training_tensors(bags, clinical, rows, generator)
            return network.compute_loss(x, mask, clinical_rows, targets[rows], sample_weights[rows],
                                        self.expert_loss_weight, inputs.autocast)

        def evaluate() -> dict:
            record = {}
            if inputs.scores_training_bags:
                record["train_loss"], record["train_balanced_accuracy"] = self._evaluate(
                    network, inputs, train_bags, train_clinical, train_labels, class_weights)
            if len(val_rows):
                record["val_loss"], record["val_balanced_accuracy"] = self._evaluate(
                    network, inputs, val_bags, val_clinical, labels[val_rows], class_weights)
            return record

        result = self._schedule()(network, step, *inputs.watch(epoch_batches, evaluate),
                                  len(val_rows) > 0)
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.n_epochs_ = result.n_epochs
        return network

    # -- prediction --------------------------------------------------------------------------
    def decision_function(self, bags, clinical=None) -> np.ndarray:
        """Bag logits."""
        bags = self._check_predict_bags(bags)
        inputs = self._inputs()
        logits, _ = self._forward_all(self.network_, inputs, inputs.prepare(bags, self.transform_),
                                      self._clinical_inputs(clinical, len(bags)))
        return logits

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        positive = expit(self.decision_function(bags, clinical))  # no overflow for big logits
        return np.column_stack([1.0 - positive, positive])

    def fusion_gates(self, bags, clinical=None) -> np.ndarray:
        """Per bag, the weight of the image head in the fused logit (gated fusion only)."""
        bags = self._check_predict_bags(bags)
        if self.network_.fusion is None:
            raise ValueError("fusion_gates needs gated fusion (image_mil: mixture_of_experts) "
                             "and a clinical table at fit")
        inputs = self._inputs()
        scaled = inputs.prepare(bags, self.transform_)
        clinical_inputs = self._clinical_inputs(clinical, len(bags))
        gates = []
        self.network_.eval()
        with torch.no_grad(), torch_threads(self.torch_threads), inputs.autocast():
            for rows in self._batches(np.arange(len(bags))):
                _, _, experts = self.network_.forward_with_experts(
                    *inputs.tensors(scaled, clinical_inputs, rows))
                gates.append(experts[2].double().cpu().numpy())
        return np.concatenate(gates)

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """Attention weights of each bag's instances (they sum to 1 per bag)."""
        bags = self._check_predict_bags(bags)
        # Weights do not depend on the clinical branch; zeros stand in for a missing table.
        clinical_inputs = None
        if self.uses_clinical_:
            clinical_inputs = (
                np.zeros((len(bags), len(self.clinical_mean_)), np.float32)
                if clinical is None
                else self._clinical_inputs(clinical, len(bags))
            )
        inputs = self._inputs()
        _, weights = self._forward_all(self.network_, inputs, inputs.prepare(bags, self.transform_),
                                       clinical_inputs)
        return weights

"""Attention-based deep MIL with a clinical branch (Ilse, Tomczak & Welling 2018; the seed report's D-MIL).

Instance feature vectors → instance MLP embedding → aggregation into one bag vector → bag MLP;
clinical attributes (age, log lymphocyte count, male) → clinical MLP; both concatenated → linear
→ logit. Aggregations, by name:

* ``attention``: a_i = softmax_i(wᵀ tanh(V h_i)), z = Σ a_i h_i;
* ``gated_attention``: a_i = softmax_i(wᵀ (tanh(V h_i) ⊙ sigm(U h_i)));
* ``max``: element-wise max over instances;
* ``mean``: the instance mean;
* ``mean_std``: instance mean concatenated with instance standard deviation;
* the model zoo (:mod:`milbench.models.pooling`): ``transformer_abmil``, ``transmil``,
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

import contextlib
import inspect
import math

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.utils import check_random_state
from torch import nn

from milbench.core.clinical import clinical_design_matrix
from milbench.models.base import BagClassifier, check_clinical, store_params
from milbench.models.collate import pad_bags
from milbench.models.pooling import POOLINGS, pool_parameters
from milbench.models.registry import Tag
from milbench.training import (
    EarlyStopping,
    TrainingResult,
    index_batches,
    seeded,
    torch_threads,
    train,
)
from preprocessing.transforms import BagTransform

AGGREGATIONS = ("attention", "gated_attention", "max", "mean", "mean_std", *POOLINGS)
NORMS = ("layer", "batch", "none")
FUSIONS = ("concat", "gated")
# Gate bias at initialisation: sigmoid(-2) ≈ 0.12 of the weight on the image head.
INITIAL_GATE_BIAS = -2.0


def layer_widths(layers: int, width) -> list[int]:
    """The widths of an MLP's ``layers`` layers: ``width`` is one int for all, or one per layer
    (a tapering network such as Ilse et al.'s 256 → 128 → 64)."""
    if isinstance(width, (int, np.integer)):
        return [int(width)] * int(layers)
    widths = [int(w) for w in width]
    if len(widths) != int(layers):
        raise ValueError(f"{len(widths)} widths {widths} for {layers} layers: give one width, "
                         f"or one per layer")
    return widths


def make_mlp(
    in_dim: int, layers: int, width, dropout: float, norm: str
) -> tuple[nn.Module, int]:
    """``layers`` × (Linear → norm → ReLU → Dropout), ``width`` one int or one per layer (see
    :func:`layer_widths`); returns the module and its output width."""
    blocks: list[nn.Module] = []
    for out_dim in layer_widths(layers, width):
        blocks.append(nn.Linear(in_dim, out_dim))
        if norm == "layer":
            blocks.append(nn.LayerNorm(out_dim))
        elif norm == "batch":
            blocks.append(nn.BatchNorm1d(out_dim))
        blocks += [nn.ReLU(), nn.Dropout(dropout)]
        in_dim = out_dim
    return (nn.Sequential(*blocks) if blocks else nn.Identity()), in_dim


class GatedFusion(nn.Module):
    """Late fusion of an image vector and a clinical vector: per patient, a gate in (0, 1)
    weighs the image head's logit against the clinical head's."""

    def __init__(self, image_dim: int, clinical_dim: int):
        super().__init__()
        self.image_head = nn.Linear(image_dim, 1)
        self.clinical_head = nn.Linear(clinical_dim, 1)
        self.gate = nn.Linear(image_dim + clinical_dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, INITIAL_GATE_BIAS)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor):
        """(fused logit, image logit, clinical logit, gate), each of shape (batch,)."""
        image_logit = self.image_head(image).squeeze(-1)
        clinical_logit = self.clinical_head(clinical).squeeze(-1)
        gate = torch.sigmoid(self.gate(torch.cat([image, clinical], dim=1))).squeeze(-1)
        return gate * image_logit + (1 - gate) * clinical_logit, image_logit, clinical_logit, gate


class DMILNetwork(nn.Module):
    """The torch module: ``forward(x, mask, clinical)`` → (bag logits, instance weights);
    ``forward_with_experts`` adds, with gated fusion, the heads' logits and the gate.

    ``encoder`` (a module with a ``dim``), when given, turns each real instance into a vector
    before the embedding MLP, and trains with it: end-to-end image models put a CNN here."""

    def __init__(
        self,
        n_features: int,
        n_clinical: int,
        encoder: nn.Module | None = None,
        *,  # the architecture; its defaults are AttentionDMIL's (see network_settings)
        aggregation: str,
        attention_dim: int,
        embedding_layers: int,
        embedding_width: int,
        bag_layers: int,
        bag_width: int,
        clinical_layers: int,
        clinical_width: int,
        dropout: float,
        norm: str,
        fusion: str,
        pool_params: dict | None,
        mean_skip: bool,
    ):
        super().__init__()
        self.aggregation = aggregation
        self.mean_skip = bool(mean_skip)
        self.fusion = None
        self.pool = None
        if encoder is not None:
            n_features = encoder.dim
        self.embed, self.embedding_dim = make_mlp(
            n_features, embedding_layers, embedding_width, dropout, norm
        )
        if encoder is not None:
            self.embed = nn.Sequential(encoder, self.embed)
        if aggregation in POOLINGS:  # the model zoo (milbench.models.pooling)
            self.pool = POOLINGS[aggregation](self.embedding_dim, attention_dim, dropout,
                                              **(pool_params or {}))
        if aggregation in ("attention", "gated_attention"):
            self.attention_v = nn.Linear(self.embedding_dim, attention_dim)
            self.attention_w = nn.Linear(attention_dim, 1)
        if aggregation == "gated_attention":
            self.attention_u = nn.Linear(self.embedding_dim, attention_dim)
        pooled_dim = (self.pool.out_dim if self.pool is not None
                      else self.embedding_dim * (2 if aggregation == "mean_std" else 1))
        if self.pool is not None and self.pool.pools_logits:
            if self.mean_skip:
                raise ValueError(f"mean_skip needs a pooled bag vector; {aggregation} pools "
                                 f"instance logits")
            bag_layers = 0  # already bag logits (mi-Net's): the head only weighs them
        if self.mean_skip:
            pooled_dim += self.embedding_dim
        self.bag_mlp, head_dim = make_mlp(pooled_dim, bag_layers, bag_width, dropout, norm)
        self.clinical_mlp = None
        if n_clinical:
            self.clinical_mlp, clinical_dim = make_mlp(
                n_clinical, clinical_layers, clinical_width, dropout, norm
            )
            if fusion == "gated":
                self.fusion = GatedFusion(head_dim, clinical_dim)
                return
            head_dim += clinical_dim
        self.head = nn.Linear(head_dim, 1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, clinical: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, weights, _ = self.forward_with_experts(x, mask, clinical)
        return logits, weights

    def forward_with_experts(self, x: torch.Tensor, mask: torch.Tensor,
                             clinical: torch.Tensor | None = None):
        """(bag logits, instance weights, experts): experts is (image logits, clinical logits,
        gate) with gated fusion, else None."""
        # Only real instances are embedded (batch norm statistics never see padding), then
        # scattered back into the padded layout.
        embedded = self.embed(x[mask])
        hidden = embedded.new_zeros(*mask.shape, self.embedding_dim)
        hidden[mask] = embedded
        pooled, weights = self._aggregate(hidden, mask)
        if self.mean_skip:  # the instance mean beside the learned pooling
            counts = mask.sum(dim=1, keepdim=True).to(hidden.dtype)
            pooled = torch.cat([pooled, hidden.sum(dim=1) / counts], dim=1)
        features = self.bag_mlp(pooled)
        if self.fusion is not None:
            fused, *experts = self.fusion(features, self.clinical_mlp(clinical))
            return fused, weights, tuple(experts)
        if self.clinical_mlp is not None:
            features = torch.cat([features, self.clinical_mlp(clinical)], dim=1)
        return self.head(features).squeeze(-1), weights, None

    def auxiliary_loss(self, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The aggregation's own training loss after a training forward pass (deep
        supervision, instance clustering), weighted per bag; None for most."""
        return None if self.pool is None else self.pool.auxiliary_loss(targets, weights)

    def _aggregate(self, hidden: torch.Tensor, mask: torch.Tensor):
        if self.pool is not None:
            return self.pool(hidden, mask)
        counts = mask.sum(dim=1, keepdim=True).to(hidden.dtype)
        if self.aggregation in ("attention", "gated_attention"):
            gate = torch.tanh(self.attention_v(hidden))
            if self.aggregation == "gated_attention":
                gate = gate * torch.sigmoid(self.attention_u(hidden))
            logits = self.attention_w(gate).squeeze(-1).masked_fill(~mask, float("-inf"))
            weights = torch.softmax(logits, dim=1)
            return torch.bmm(weights.unsqueeze(1), hidden).squeeze(1), weights
        if self.aggregation == "max":
            masked = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            pooled, winners = masked.max(dim=1)
            shares = torch.zeros_like(mask, dtype=hidden.dtype)
            shares.scatter_add_(1, winners, torch.ones_like(winners, dtype=hidden.dtype))
            return pooled, shares / hidden.shape[-1]
        weights = mask.to(hidden.dtype) / counts
        mean = torch.bmm(weights.unsqueeze(1), hidden).squeeze(1)
        if self.aggregation == "mean":
            return mean, weights
        # mean_std
        centred = (hidden - mean.unsqueeze(1)) * mask.unsqueeze(-1)
        variance = (centred**2).sum(dim=1) / counts
        return torch.cat([mean, torch.sqrt(variance + 1e-6)], dim=1), weights


def network_settings(model: AttentionDMIL) -> dict:
    """The architecture arguments of :class:`DMILNetwork`, read from the estimator's
    parameters (the one place their defaults are declared)."""
    names = [p.name for p in inspect.signature(DMILNetwork.__init__).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return {name: getattr(model, name) for name in names}


def check_pool_params(aggregation: str, pool_params: dict | None) -> None:
    """``pool_params`` only with a zoo aggregation, and only keys that aggregation takes."""
    if not pool_params:
        return
    if aggregation not in POOLINGS:
        raise ValueError(f"pool_params is for the zoo aggregations {tuple(POOLINGS)}, "
                         f"not {aggregation!r}")
    valid = pool_parameters(aggregation)
    for key in pool_params:
        if key not in valid:
            raise ValueError(f"pool_params: unknown key {key!r} for aggregation "
                             f"{aggregation!r}; valid keys: {', '.join(valid) or 'none'}")


def check_training_params(model) -> None:
    """The training options the bag networks share (D-MIL and the image models): batches,
    epochs, the validation split, class weights, threads and the clinical switch."""
    if model.use_clinical not in ("auto", True, False):
        raise ValueError(f"use_clinical must be 'auto', True or False, got {model.use_clinical!r}")
    if int(model.batch_size) < 2:
        raise ValueError(f"batch_size must be at least 2 (real batches), got {model.batch_size}")
    if int(model.max_epochs) < 1:
        raise ValueError(f"max_epochs must be at least 1, got {model.max_epochs}")
    if not 0 <= model.validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {model.validation_fraction}")
    if model.class_weight not in ("balanced", None):
        raise ValueError(f"class_weight must be 'balanced' or None, got {model.class_weight!r}")
    if model.torch_threads is not None and int(model.torch_threads) < 1:
        raise ValueError(f"torch_threads must be None or at least 1, got {model.torch_threads}")


def check_weight_averaging(model) -> None:
    """``swa_epochs`` (average the weights of the last epochs) needs a fixed number of epochs
    (no early stopping) and no batch norm (averaged weights would need fresh batch statistics)."""
    swa_epochs = int(model.swa_epochs)
    if swa_epochs == 0:
        return
    if not 1 <= swa_epochs <= int(model.max_epochs):
        raise ValueError(f"swa_epochs must lie in [0, max_epochs={model.max_epochs}], "
                         f"got {model.swa_epochs}")
    if model.validation_fraction:
        raise ValueError("swa_epochs needs validation_fraction 0: weight averaging trains a fixed "
                         "number of epochs, early stopping would pick one epoch instead")
    if model.norm == "batch":
        raise ValueError("swa_epochs does not go with norm 'batch': the averaged weights' batch "
                         "statistics would need recomputing")


def validation_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified (train rows, validation rows) split of the training bags for early stopping;
    everything trains (no validation rows) when ``fraction`` is 0 or a class is too rare for
    both parts to hold it."""
    rows = np.arange(len(labels))
    n_val = math.ceil(fraction * len(labels))
    counts = np.bincount(labels, minlength=2)
    if fraction == 0 or n_val < 2 or counts.min() < 2 or len(labels) - n_val < 2:
        return rows, rows[:0]
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train_rows, val_rows = next(splitter.split(rows.reshape(-1, 1), labels))
    return np.sort(train_rows), np.sort(val_rows)


def balanced_class_weights(labels: np.ndarray, class_weight: str | None) -> np.ndarray:
    """Per-class loss weights (index = label): ``"balanced"`` from the training prevalence,
    None → ones."""
    if class_weight is None:
        return np.ones(2)
    counts = np.bincount(labels, minlength=2).astype(float)
    return len(labels) / (2.0 * np.maximum(counts, 1.0))


class AttentionDMIL(BagClassifier):
    """Attention D-MIL with an optional clinical MLP (see the module docstring).

    ``use_clinical``: ``"auto"`` uses the clinical table when ``fit`` gets one, ``True`` requires
    it, ``False`` ignores it (the ablation).
    """

    capabilities = frozenset({Tag.INSTANCE_SCORES})
    # Whether each epoch's history scores the whole training part too (image models skip it:
    # a forward pass over every training image per epoch).
    evaluates_training_bags = True

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

    def _scale_bags(self, bags: list[np.ndarray]) -> list[np.ndarray]:
        transformed = bags if self.transform_ is None else self.transform_.transform(bags)
        return [bag.astype(np.float32) for bag in transformed]

    def _clinical_inputs(self, clinical, n_bags: int) -> np.ndarray | None:
        if not self.uses_clinical_:
            return None
        design = clinical_design_matrix(check_clinical(clinical, n_bags))
        return ((design - self.clinical_mean_) / self.clinical_scale_).astype(np.float32)

    # -- batching ----------------------------------------------------------------------------
    def _batches(self, order: np.ndarray) -> list[np.ndarray]:
        return index_batches(order, self.batch_size)

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def _tensors(self, bags, clinical, rows):
        """Padded bags (in the bags' own dtype), mask and clinical rows, on the model's device."""
        chosen = [bags[i] for i in rows]
        padded, mask = pad_bags(chosen, dtype=chosen[0].dtype)
        device = self._device()
        clinical_rows = None if clinical is None else torch.from_numpy(clinical[rows]).to(device)
        return (torch.from_numpy(padded).to(device), torch.from_numpy(mask).to(device),
                clinical_rows)

    def _autocast(self):
        """The precision context of forward passes (image models use bfloat16 on CUDA)."""
        return contextlib.nullcontext()

    def _training_tensors(self, bags, clinical, rows, generator):
        """A training batch: :meth:`_tensors` with instance dropout applied to the mask."""
        x, mask, clinical_rows = self._tensors(bags, clinical, rows)
        return x, self._drop_instances(mask, generator), clinical_rows

    def _forward_all(self, network, bags, clinical):
        """Eval-mode logits and instance weights for every bag, in batches of ``batch_size``."""
        network.eval()
        logits, weights = [], []
        with torch.no_grad(), torch_threads(self.torch_threads), self._autocast():
            for rows in self._batches(np.arange(len(bags))):
                x, mask, clinical_rows = self._tensors(bags, clinical, rows)
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

        self.transform_ = self._fit_transform(bags)
        if self.uses_clinical_:
            # Standardised age, log count, male; statistics from the training bags only.
            design = clinical_design_matrix(check_clinical(clinical, len(bags)))
            self.clinical_mean_ = design.mean(axis=0)
            spread = design.std(axis=0)
            self.clinical_scale_ = np.where(spread > 0, spread, 1.0)
        scaled = self._scale_bags(bags)
        clinical_inputs = self._clinical_inputs(clinical, len(bags))

        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        train_rows, val_rows = validation_split(labels, self.validation_fraction, seed)
        with seeded(seed, self.torch_threads) as generator:
            self.network_ = self._train(
                scaled, labels, clinical_inputs, train_rows, val_rows, generator)
        self.gated_fusion_ = self.network_.fusion is not None  # fusion_gates is available

    def _fit_transform(self, bags) -> BagTransform | None:
        """Scaler (+ PCA) on the training instances only: inside CV, the training fold's."""
        if not self.scale and self.pca_components is None:
            return None
        return BagTransform(n_components=self.pca_components, scale=self.scale,
                            random_state=0).fit(bags)

    def _network(self, n_features: int, n_clinical: int) -> DMILNetwork:
        return DMILNetwork(n_features, n_clinical, **network_settings(self))

    def _evaluate(self, network, bags, clinical, labels, class_weights) -> tuple[float, float]:
        logits, _ = self._forward_all(network, bags, clinical)
        targets = torch.from_numpy(labels.astype(np.float64))
        losses = nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(logits), targets, reduction="none"
        ).numpy()
        loss = float(np.mean(class_weights[labels] * losses))
        return loss, float(balanced_accuracy_score(labels, (logits >= 0).astype(int)))

    def _drop_instances(self, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time augmentation: each real instance is hidden with probability
        ``instance_dropout``; a bag that would lose them all keeps them all."""
        if not self.instance_dropout:
            return mask
        kept = mask & (torch.rand(mask.shape, generator=generator) >= self.instance_dropout)
        emptied = ~kept.any(dim=1)
        kept[emptied] = mask[emptied]
        return kept

    def _train(self, bags, labels, clinical, train_rows, val_rows, generator) -> DMILNetwork:
        network = self._network(bags[0].shape[1], 0 if clinical is None else clinical.shape[1])
        network = network.to(self._device())
        train_labels = labels[train_rows]
        class_weights = balanced_class_weights(train_labels, self.class_weight)
        sample_weights = torch.from_numpy(class_weights[labels].astype(np.float32)).to(
            self._device())
        targets = torch.from_numpy(labels.astype(np.float32)).to(self._device())

        def subset(rows):
            return [bags[i] for i in rows], (None if clinical is None else clinical[rows])

        train_bags, train_clinical = subset(train_rows)
        val_bags, val_clinical = subset(val_rows)

        def epoch_batches(epoch: int) -> list[np.ndarray]:
            permutation = torch.randperm(len(train_rows), generator=generator).numpy()
            return self._batches(train_rows[permutation])

        def step(rows: np.ndarray) -> torch.Tensor:
            x, mask, clinical_rows = self._training_tensors(bags, clinical, rows, generator)
            with self._autocast():
                logits, _, experts = network.forward_with_experts(x, mask, clinical_rows)
            logits = logits.float()
            experts = None if experts is None else tuple(e.float() for e in experts)
            losses = nn.functional.binary_cross_entropy_with_logits(
                logits, targets[rows], reduction="none")
            if experts is not None and self.expert_loss_weight:
                # Each head also learns the label alone, so neither starves behind the gate.
                for expert_logits in experts[:2]:
                    losses = losses + self.expert_loss_weight * (
                        nn.functional.binary_cross_entropy_with_logits(
                            expert_logits, targets[rows], reduction="none"))
            loss = (sample_weights[rows] * losses).mean()
            auxiliary = self._auxiliary_loss(network, targets[rows], sample_weights[rows])
            return loss if auxiliary is None else loss + auxiliary

        def evaluate() -> dict:
            record = {}
            if self.evaluates_training_bags:
                record["train_loss"], record["train_balanced_accuracy"] = self._evaluate(
                    network, train_bags, train_clinical, train_labels, class_weights)
            if len(val_rows):
                record["val_loss"], record["val_balanced_accuracy"] = self._evaluate(
                    network, val_bags, val_clinical, labels[val_rows], class_weights)
            return record

        result = self._optimise(network, step, epoch_batches, evaluate, len(val_rows) > 0)
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.n_epochs_ = result.n_epochs
        return network

    def _auxiliary_loss(self, network, targets, weights) -> torch.Tensor | None:
        """A loss the step adds to the bag loss: the aggregation's own (image models add the
        reconstruction's)."""
        return network.auxiliary_loss(targets, weights)

    def _optimise(self, network, step, batches, evaluate, has_validation: bool) -> TrainingResult:
        """Adam with the plateau scheduler, early stopping on the validation loss. Without a
        validation part: train for max_epochs and keep the last epoch (train_loss is then the
        epoch's mean step loss when the training part is not scored)."""
        optimizer = torch.optim.Adam(
            self._parameter_groups(network), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.lr_factor, patience=self.lr_patience
        )
        return train(
            network, optimizer, step, batches, epochs=self.max_epochs, evaluate=evaluate,
            scheduler=scheduler, scheduler_monitor="val_loss" if has_validation else "train_loss",
            early_stopping=EarlyStopping("val_loss", self.patience) if has_validation else None,
            average_last=int(self.swa_epochs))

    def _parameter_groups(self, network) -> list[dict]:
        """The optimiser's parameter groups (one here; image models may give the encoder its
        own learning rate)."""
        return [{"params": list(network.parameters())}]

    # -- prediction --------------------------------------------------------------------------
    def decision_function(self, bags, clinical=None) -> np.ndarray:
        """Bag logits."""
        bags = self._check_predict_bags(bags)
        logits, _ = self._forward_all(
            self.network_, self._scale_bags(bags), self._clinical_inputs(clinical, len(bags))
        )
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
        scaled, clinical_inputs = self._scale_bags(bags), self._clinical_inputs(clinical, len(bags))
        gates = []
        self.network_.eval()
        with torch.no_grad(), torch_threads(self.torch_threads), self._autocast():
            for rows in self._batches(np.arange(len(bags))):
                _, _, experts = self.network_.forward_with_experts(
                    *self._tensors(scaled, clinical_inputs, rows))
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
        _, weights = self._forward_all(self.network_, self._scale_bags(bags), clinical_inputs)
        return weights

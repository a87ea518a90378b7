"""The bag network of D-MIL and the end-to-end image models: instance MLP (after an optional
encoder), aggregation, bag MLP, clinical MLP, fused head. :mod:`milbench.models.dmil` documents
the aggregations and fusions; the poolings are in :mod:`milbench.models.pooling` (the classic
ones) and :mod:`milbench.models.zoo_pooling` (the model zoo's)."""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
from torch import nn

from milbench.models.pooling import CLASSIC_POOLINGS, AttentionScores, Pooling
from milbench.models.zoo_pooling import ZOO_POOLINGS

# Every aggregation D-MIL and the image models know: name → pooling module class.
POOLINGS: dict[str, type[Pooling]] = {**CLASSIC_POOLINGS, **ZOO_POOLINGS}
AGGREGATIONS = tuple(POOLINGS)
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
        if encoder is not None:
            n_features = encoder.dim
        self.embed, self.embedding_dim = make_mlp(
            n_features, embedding_layers, embedding_width, dropout, norm
        )
        self.has_encoder = encoder is not None
        if encoder is not None:
            self.embed = nn.Sequential(encoder, self.embed)
        self.pool = POOLINGS[aggregation](self.embedding_dim, attention_dim, dropout,
                                          **(pool_params or {}))
        pooled_dim = self.pool.out_dim
        if self.pool.pools_logits:
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
        pooled, weights = self.pool(hidden, mask)
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

    def compute_loss(self, x: torch.Tensor, mask: torch.Tensor, clinical: torch.Tensor | None,
                     targets: torch.Tensor, weights: torch.Tensor, expert_loss_weight: float = 0.0,
                     precision=contextlib.nullcontext) -> torch.Tensor:
        """One training batch's loss (the network owns its loss, as torchmil's models do): the
        bag logits' binary cross-entropy weighted per bag (``weights``), with gated fusion each
        expert head's own (times ``expert_loss_weight``), plus :meth:`auxiliary_loss`. The
        forward pass runs under ``precision()`` (the estimator's autocast), the loss in float."""
        with precision():
            logits, _, experts = self.forward_with_experts(x, mask, clinical)
        logits = logits.float()
        experts = None if experts is None else tuple(e.float() for e in experts)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if experts is not None and expert_loss_weight:
            # Each head also learns the label alone, so neither starves behind the gate.
            for expert_logits in experts[:2]:
                losses = losses + expert_loss_weight * (
                    nn.functional.binary_cross_entropy_with_logits(
                        expert_logits, targets, reduction="none"))
        loss = (weights * losses).mean()
        auxiliary = self.auxiliary_loss(targets, weights)
        return loss if auxiliary is None else loss + auxiliary

    def auxiliary_loss(self, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The extra training losses of the network's parts after a training forward pass: the
        aggregation's own (deep supervision, instance clustering), weighted per bag, and an
        encoder's (an image autoencoder's reconstruction); None when they have none."""
        parts = [self.pool.auxiliary_loss(targets, weights)]
        if self.has_encoder and hasattr(self.embed[0], "auxiliary_loss"):
            parts.append(self.embed[0].auxiliary_loss())
        parts = [part for part in parts if part is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def parameter_groups(self, encoder_learning_rate: float | None = None) -> list[dict]:
        """The optimiser's parameter groups: one of every parameter, or, with
        ``encoder_learning_rate``, every parameter but the encoder's, then the encoder's (a
        decoder included) at that learning rate."""
        if encoder_learning_rate is None:
            return [{"params": list(self.parameters())}]
        encoder, rest = self.encoder_split()
        return [{"params": rest}, {"params": encoder, "lr": encoder_learning_rate}]

    def encoder_split(self) -> tuple[list, list]:
        """(the encoder's parameters, every other parameter)."""
        if not self.has_encoder:
            raise ValueError("this network has no encoder (it reads instance vectors)")
        encoder = list(self.embed[0].parameters())
        owned = {id(parameter) for parameter in encoder}
        return encoder, [p for p in self.parameters() if id(p) not in owned]

    def __setstate__(self, state: dict) -> None:
        # A network pickled before the classic aggregations moved into POOLINGS kept its
        # attention layers as its own and no pool: give them to the pool it now needs.
        super().__setstate__(state)
        modules = self._modules
        if modules.get("pool") is not None:
            return
        pool_class = POOLINGS[self.aggregation]
        pool = pool_class.__new__(pool_class)
        Pooling.__init__(pool)
        pool.out_dim = self.embedding_dim * (2 if self.aggregation == "mean_std" else 1)
        if "attention_v" in modules:
            scores = AttentionScores.__new__(AttentionScores)
            nn.Module.__init__(scores)
            scores.attention_v = modules.pop("attention_v")
            scores.attention_u = modules.pop("attention_u", None)
            scores.attention_w = modules.pop("attention_w")
            pool.scores = scores
        pool.train(self.training)
        modules["pool"] = pool


def pool_parameters(aggregation: str) -> tuple[str, ...]:
    """The ``pool_params`` keys the aggregation accepts."""
    names = list(inspect.signature(POOLINGS[aggregation].__init__).parameters)
    return tuple(names[names.index("dropout") + 1:])


def check_pool_params(aggregation: str, pool_params: dict | None) -> None:
    """``pool_params`` only with a zoo aggregation, and only keys that aggregation takes."""
    if not pool_params:
        return
    if aggregation not in POOLINGS:
        raise ValueError(f"pool_params is for the aggregations {tuple(POOLINGS)}, "
                         f"not {aggregation!r}")
    valid = pool_parameters(aggregation)
    for key in pool_params:
        if key not in valid:
            raise ValueError(f"pool_params: unknown key {key!r} for aggregation "
                             f"{aggregation!r}; valid keys: {', '.join(valid) or 'none'}")

"""D-MIL's aggregations: each module pools a padded batch of embedded instances into one vector
per bag. This module holds the interface, its helpers and the classic aggregations (Ilse et al.
2018): ``attention`` and ``gated_attention`` (:class:`AttentionScores`, the one attention, which
the zoo's attention poolings use too), ``max``, ``mean`` and ``mean_std``. The model zoo's are in
:mod:`milbench.models.zoo_pooling`; ``milbench.models.bag_network.POOLINGS`` names them all.

Interface: ``forward(hidden (B, N, D), mask (B, N))`` → ``(pooled (B, out_dim), instance
scores (B, N))``; after a training forward pass, ``auxiliary_loss(targets, weights)`` gives the
architecture's own extra loss (deep supervision, instance clustering), weighted per bag, or
None. Padded rows never change a real bag's output, and every module is invariant to the order
of a bag's instances. Self-attention pools run a batch as sub-batches of similar bag size
(:func:`by_size`): attention costs n² per bag, and one bag of a thousand instances would
otherwise pad every bag of its batch to a thousand.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over instances (dim 1) with padded rows at exactly zero."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """Per-bag weighted mean of the binary cross-entropy (the bag loss's weighting)."""
    losses = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none")
    return (weights * losses).mean()


class Pooling(nn.Module):
    """Base: ``out_dim`` and no auxiliary loss. Subclasses keep what their loss needs from the
    last training forward pass in ``_saved`` (cleared when the loss is taken)."""

    out_dim: int
    pools_logits = False  # whether the bag vector is already logits (no bag MLP after it)

    def __init__(self) -> None:
        super().__init__()
        self._saved: dict | None = None

    def _save(self, **tensors) -> None:
        self._saved = tensors if self.training else None

    def auxiliary_loss(self, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        return None

    def _take(self) -> dict:
        if self._saved is None:
            raise RuntimeError("auxiliary_loss needs a training forward pass first")
        saved, self._saved = self._saved, None
        return saved


# Sub-batches by size (self-attention costs n² per bag): a bag joins a sub-batch while padding it
# to the sub-batch's largest bag costs at most SIZE_WASTE times the sub-batch's own n² work;
# bags of at most SMALL_BAG instances always share one (there the per-call overhead dominates).
SIZE_WASTE = 1.25
SMALL_BAG = 32


def size_groups(counts: list[int]) -> list[list[int]]:
    """Rows of a batch grouped into sub-batches of similar bag size (largest first)."""
    groups: list[list[int]] = []
    for row in sorted(range(len(counts)), key=lambda r: -counts[r]):
        if groups:
            group = groups[-1]
            largest = counts[group[0]]
            work = sum(counts[r] ** 2 for r in group) + counts[row] ** 2
            if largest <= SMALL_BAG or (len(group) + 1) * largest**2 <= SIZE_WASTE * work:
                group.append(row)
                continue
        groups.append([row])
    return groups


def by_size(forward, hidden: torch.Tensor, mask: torch.Tensor):
    """``forward(hidden, mask) → (pooled, weights)`` run on sub-batches of similar bag size,
    each compacted to its own largest bag, and reassembled in the batch's order. Bags never
    see each other or padding, so the result is the whole batch's, for a fraction of the
    self-attention work when bag sizes vary widely."""
    counts = mask.sum(dim=1).tolist()
    groups = size_groups(counts)
    if len(groups) == 1 and max(counts) == mask.shape[1]:
        return forward(hidden, mask)
    # Real instances first, in their order (instance dropout leaves holes in a mask).
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    pooled_rows, weights = [None] * len(counts), torch.zeros(
        mask.shape, dtype=hidden.dtype, device=hidden.device)
    for group in groups:
        rows = torch.tensor(group, device=hidden.device)
        kept = order[rows, :max(counts[r] for r in group)]
        group_hidden = torch.gather(hidden[rows], 1,
                                    kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        pooled, group_weights = forward(group_hidden, torch.gather(mask[rows], 1, kept))
        weights[rows] = weights[rows].scatter(1, kept, group_weights.to(hidden.dtype))
        for position, row in enumerate(group):
            pooled_rows[row] = pooled[position]
    return torch.stack(pooled_rows), weights


class AttentionScores(nn.Module):
    """Ilse et al.'s attention logits wᵀ tanh(V h) (gated: ⊙ sigm(U h)), one per instance."""

    def __init__(self, dim: int, attention_dim: int, gated: bool = False) -> None:
        super().__init__()
        self.attention_v = nn.Linear(dim, attention_dim)
        self.attention_u = nn.Linear(dim, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.attention_v(hidden))
        if self.attention_u is not None:
            gate = gate * torch.sigmoid(self.attention_u(hidden))
        return self.attention_w(gate).squeeze(-1)


class AttentionPool(Pooling):
    """Ilse et al.'s attention pooling: the bag vector is the attention-weighted mean of its
    instances (``gated_attention``: the gated scores)."""

    gated = False

    def __init__(self, dim: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.scores = AttentionScores(dim, attention_dim, gated=self.gated)
        self.out_dim = dim

    def forward(self, hidden, mask):
        weights = masked_softmax(self.scores(hidden), mask)
        return torch.bmm(weights.unsqueeze(1), hidden).squeeze(1), weights


class GatedAttentionPool(AttentionPool):
    gated = True


class MaxPool(Pooling):
    """The element-wise maximum over the bag; an instance's score is its share of the winning
    elements."""

    def __init__(self, dim: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, hidden, mask):
        masked = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled, winners = masked.max(dim=1)
        shares = torch.zeros_like(mask, dtype=hidden.dtype)
        shares.scatter_add_(1, winners, torch.ones_like(winners, dtype=hidden.dtype))
        return pooled, shares / hidden.shape[-1]


class MeanPool(Pooling):
    """The mean over the bag (``mean_std``: with the standard deviation beside it); every
    instance scores 1 / bag size."""

    with_std = False

    def __init__(self, dim: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = dim * (2 if self.with_std else 1)

    def forward(self, hidden, mask):
        counts = mask.sum(dim=1, keepdim=True).to(hidden.dtype)
        weights = mask.to(hidden.dtype) / counts
        mean = torch.bmm(weights.unsqueeze(1), hidden).squeeze(1)
        if not self.with_std:
            return mean, weights
        centred = (hidden - mean.unsqueeze(1)) * mask.unsqueeze(-1)
        variance = (centred**2).sum(dim=1) / counts
        return torch.cat([mean, torch.sqrt(variance + 1e-6)], dim=1), weights


class MeanStdPool(MeanPool):
    with_std = True


# The classic aggregation name → module class (none takes ``pool_params``).
CLASSIC_POOLINGS: dict[str, type[Pooling]] = {
    "attention": AttentionPool,
    "gated_attention": GatedAttentionPool,
    "max": MaxPool,
    "mean": MeanPool,
    "mean_std": MeanStdPool,
}

"""The MIL model zoo as D-MIL aggregations (:mod:`milbench.models.pooling` gives the interface),
so every one of them gets D-MIL's batching, clinical fusion (concat or gated) and training loop
(``dmil`` with ``aggregation:`` its name).

* ``transformer_abmil``: torchmil's transformer encoder over the bag (padded keys masked), then
  attention pooling.
* ``transmil`` (Shao et al. 2021): a class token, a self-attention block, the PPEG positional
  convolutions on the instances laid out on a square grid, a second block; the class token is
  the bag. Bags have no spatial layout here, so instances are placed on the grid in the order of
  a fixed random projection of their embedding (the model is then order-invariant), and full
  softmax attention replaces the Nyström approximation (bags of hundreds, not tens of thousands).
* ``dsmil`` (Li et al. 2021): an instance classifier picks the critical instance; attention is
  each instance's query matched against the critical one's; the bag vector carries the critical
  instance's logit too, and that logit also learns the bag label (auxiliary loss).
* ``clam_sb`` (Lu et al. 2021): gated attention pooling, plus instance-level clustering: per
  bag, the ``k`` most and least attended instances are the positive and negative examples of
  the bag's class's instance classifier (auxiliary loss, ``instance_weight``).
* ``dtfd`` (Zhang et al. 2022): each bag is split into ``n_pseudo`` pseudo-bags (at random in
  training; by attention rank at prediction, so prediction is deterministic and
  order-invariant); tier 1 attention-pools each pseudo-bag and learns the bag label from it
  (auxiliary loss); tier 2 attention-pools the pseudo-bag features (AFS distillation).
* ``mi_net`` (Wang et al. 2018): instance space, an instance logit per instance, max pooled.
* ``mi_net_ds``: MI-Net with deep supervision: three fully connected levels, each max pooled
  over the bag into a level logit that learns the bag label (auxiliary loss); the bag vector is
  the level logits.

torchmil's models end in a logit, leaving no bag vector for the clinical fusion, so the zoo is
written here as pooling modules; torchmil's modules serve where they fit our padded batches
(the transformer encoder). TransMIL's blocks are native: they need the class token's attention
weights, and torchmil's attention returns NaN weights whenever a mask is given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from milbench.models.pooling import AttentionScores, Pooling, by_size, masked_softmax, weighted_bce


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN x) with padded keys masked, then x + MLP(LN x).
    Real rows never attend to padding, so padding cannot change them."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the embedding width ({dim}) must be divisible by heads ({heads})")
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                need_weights: bool = False):
        normed = self.norm1(x)
        attended, weights = self.attention(
            normed, normed, normed, key_padding_mask=None if mask is None else ~mask,
            need_weights=need_weights, average_attn_weights=True)
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return (x, weights) if need_weights else x


class TransformerABMIL(Pooling):
    def __init__(self, dim: int, attention_dim: int, dropout: float, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        from torchmil.nn import TransformerEncoder

        if dim % int(heads):
            raise ValueError(f"the embedding width ({dim}) must be divisible by heads ({heads})")
        # torchmil's encoder (padded keys masked); its dropout stays 0: torchmil passes it to
        # the attention kernel in eval mode too, which would make predictions random.
        self.encoder = TransformerEncoder(in_dim=dim, att_dim=dim, n_heads=int(heads),
                                          n_layers=int(layers), dropout=0.0)
        self.scores = AttentionScores(dim, attention_dim)
        self.out_dim = dim

    def forward(self, hidden, mask):
        return by_size(self._pool, hidden, mask)

    def _pool(self, hidden, mask):
        x = self.encoder(hidden, mask)
        weights = masked_softmax(self.scores(x), mask)
        return torch.bmm(weights.unsqueeze(1), x).squeeze(1), weights


class TransMIL(Pooling):
    def __init__(self, dim: int, attention_dim: int, dropout: float, heads: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.first = SelfAttentionBlock(dim, heads, dropout)
        self.ppeg = nn.ModuleList(nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim)
                                  for size in (7, 5, 3))
        self.second = SelfAttentionBlock(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        # Fixed (not trained): only orders instances on the grid.
        self.register_buffer("layout", torch.randn(dim))
        self.out_dim = dim

    def forward(self, hidden, mask):
        return by_size(self._pool, hidden, mask)

    def _pool(self, hidden, mask):
        """A padded batch at once: each bag's cells fill the first ``side²`` positions of
        its token row, and its ``side × side`` grid the top-left corner of a zero canvas, so
        the convolutions see exactly the zero border a grid of its own would have."""
        batch, _, dim = hidden.shape
        counts = mask.sum(dim=1)
        sides = torch.ceil(torch.sqrt(counts.double())).long()
        longest, canvas_side = int((sides * sides).max()), int(sides.max())
        # Instances ordered by the fixed projection; padded rows sort last.
        projection = (hidden.detach().float() @ self.layout.float()).masked_fill(
            ~mask, float("inf"))
        order = torch.argsort(projection, dim=1, stable=True)
        # Sequence squaring: a grid's spare cells repeat its bag's first instances.
        positions = torch.arange(longest, device=hidden.device).expand(batch, -1)
        real_cells = positions < (sides * sides).unsqueeze(1)
        cells = torch.gather(order, 1, positions % counts.unsqueeze(1))
        tokens = torch.cat([self.cls_token.to(hidden.dtype).expand(batch, -1, -1),
                            torch.gather(hidden, 1, cells.unsqueeze(-1).expand(-1, -1, dim))], 1)
        token_mask = torch.cat([real_cells.new_ones(batch, 1), real_cells], dim=1)
        tokens = self.first(tokens, token_mask)
        # Cell j of a bag sits at (j // side, j % side) of the canvas; other cells go to a
        # spare slot past the canvas that is dropped.
        flat = torch.where(real_cells, positions // sides.unsqueeze(1) * canvas_side
                           + positions % sides.unsqueeze(1), canvas_side * canvas_side)
        canvas = tokens.new_zeros(batch, canvas_side * canvas_side + 1, dim).scatter(
            1, flat.unsqueeze(-1).expand(-1, -1, dim), tokens[:, 1:])
        grid = canvas[:, :-1].transpose(1, 2).reshape(batch, dim, canvas_side, canvas_side)
        grid = grid + sum(conv(grid) for conv in self.ppeg)
        canvas = grid.flatten(2).transpose(1, 2)
        within = flat.clamp(max=canvas_side * canvas_side - 1)
        tokens = torch.cat([tokens[:, :1], torch.gather(
            canvas, 1, within.unsqueeze(-1).expand(-1, -1, dim))], dim=1)
        tokens, attention = self.second(tokens, token_mask, need_weights=True)
        # The class token's attention to each cell, summed back onto the instance it holds.
        to_cells = (attention[:, 0, 1:] * real_cells).to(hidden.dtype)
        weights = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        weights = weights.scatter_add(1, cells, to_cells)
        return self.norm(tokens[:, 0]), weights / weights.sum(dim=1, keepdim=True)


class DSMIL(Pooling):
    def __init__(self, dim: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(dim, 1)
        self.query = nn.Linear(dim, attention_dim)
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim))
        self.out_dim = dim + 1

    def forward(self, hidden, mask):
        instance_logits = self.instance_classifier(hidden).squeeze(-1).masked_fill(
            ~mask, float("-inf"))
        critical_logit, critical = instance_logits.max(dim=1)
        queries = self.query(hidden)
        critical_query = queries[torch.arange(len(hidden)), critical]
        similarity = torch.einsum("bnd,bd->bn", queries, critical_query) / math.sqrt(
            queries.shape[-1])
        weights = masked_softmax(similarity, mask)
        pooled = torch.bmm(weights.unsqueeze(1), self.value(hidden)).squeeze(1)
        self._save(critical_logit=critical_logit)
        return torch.cat([pooled, critical_logit.unsqueeze(1)], dim=1), weights

    def auxiliary_loss(self, targets, weights):
        return weighted_bce(self._take()["critical_logit"], targets, weights)


class CLAMSB(Pooling):
    def __init__(self, dim: int, attention_dim: int, dropout: float, k: int = 8,
                 instance_weight: float = 0.3) -> None:
        super().__init__()
        self.scores = AttentionScores(dim, attention_dim, gated=True)
        # One instance classifier per class; a bag trains its own class's.
        self.instance_classifiers = nn.ModuleList(nn.Linear(dim, 1) for _ in range(2))
        self.k, self.instance_weight = int(k), float(instance_weight)
        self.out_dim = dim

    def forward(self, hidden, mask):
        logits = self.scores(hidden)
        weights = masked_softmax(logits, mask)
        self._save(hidden=hidden, logits=logits, mask=mask)
        return torch.bmm(weights.unsqueeze(1), hidden).squeeze(1), weights

    def auxiliary_loss(self, targets, weights):
        saved = self._take()
        losses = []
        for row, label in enumerate(targets.long().tolist()):
            real = saved["mask"][row]
            count = int(real.sum())
            k = min(self.k, count // 2)
            if k < 1:
                continue
            hidden, logits = saved["hidden"][row][real], saved["logits"][row][real]
            ranked = torch.argsort(logits, descending=True, stable=True)
            chosen = torch.cat([ranked[:k], ranked[-k:]])
            instance_targets = torch.cat([torch.ones(k), torch.zeros(k)]).to(hidden.device)
            predicted = self.instance_classifiers[label](hidden[chosen]).squeeze(-1)
            losses.append(weights[row] * nn.functional.binary_cross_entropy_with_logits(
                predicted.float(), instance_targets))
        if not losses:
            return None
        return self.instance_weight * torch.stack(losses).sum() / len(targets)


class DTFD(Pooling):
    def __init__(self, dim: int, attention_dim: int, dropout: float, n_pseudo: int = 4) -> None:
        super().__init__()
        self.tier1 = AttentionScores(dim, attention_dim)
        self.tier1_head = nn.Linear(dim, 1)
        self.tier2 = AttentionScores(dim, attention_dim)
        self.n_pseudo = int(n_pseudo)
        self.out_dim = dim

    def _groups(self, logits: torch.Tensor) -> torch.Tensor:
        """Each instance's pseudo-bag: random in training, by attention rank at prediction."""
        count = len(logits)
        groups = min(self.n_pseudo, count)
        if self.training:
            ranks = torch.randperm(count).to(logits.device)
        else:
            ranks = torch.empty(count, dtype=torch.long, device=logits.device)
            ranks[torch.argsort(logits.detach(), descending=True, stable=True)] = torch.arange(
                count, device=logits.device)
        return ranks % groups

    def forward(self, hidden, mask):
        pooled, tier1_logits = [], []
        weights = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        for row in range(len(hidden)):
            instances = hidden[row][mask[row]]
            logits = self.tier1(instances)
            groups = self._groups(logits)
            features, within = [], torch.zeros_like(logits)
            for group in range(int(groups.max()) + 1):
                members = groups == group
                group_weights = torch.softmax(logits[members], dim=0)
                within[members] = group_weights
                features.append(group_weights @ instances[members])
            features = torch.stack(features)
            tier1_logits.append(self.tier1_head(features).squeeze(-1))
            across = torch.softmax(self.tier2(features), dim=0)
            pooled.append(across @ features)
            weights[row, mask[row]] = (within * across[groups]).to(hidden.dtype)
        self._save(tier1_logits=tier1_logits)
        return torch.stack(pooled), weights

    def auxiliary_loss(self, targets, weights):
        logits = self._take()["tier1_logits"]
        losses = [weights[row] * nn.functional.binary_cross_entropy_with_logits(
            bag.float(), targets[row].float().expand(len(bag))) for row, bag in enumerate(logits)]
        return torch.stack(losses).mean()


class MiNet(Pooling):
    pools_logits = True

    def __init__(self, dim: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(dim, 1)
        self.out_dim = 1

    def forward(self, hidden, mask):
        logits = self.instance_classifier(hidden).squeeze(-1)
        pooled = logits.masked_fill(~mask, float("-inf")).max(dim=1).values
        return pooled.unsqueeze(1), torch.sigmoid(logits) * mask


class MiNetDS(Pooling):
    pools_logits = True

    def __init__(self, dim: int, attention_dim: int, dropout: float,
                 widths: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        levels, heads, previous = [], [], dim
        for width in widths:
            levels.append(nn.Sequential(nn.Linear(previous, int(width)), nn.ReLU(),
                                        nn.Dropout(dropout)))
            heads.append(nn.Linear(int(width), 1))
            previous = int(width)
        self.levels, self.heads = nn.ModuleList(levels), nn.ModuleList(heads)
        self.out_dim = len(widths)

    def forward(self, hidden, mask):
        level_logits, shares = [], torch.zeros(mask.shape, dtype=hidden.dtype,
                                               device=hidden.device)
        x = hidden
        for level, head in zip(self.levels, self.heads, strict=True):
            x = level(x)
            pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values
            level_logits.append(head(pooled).squeeze(-1))
            # Each dimension's maximum, shared equally among the instances that reach it (ReLU
            # zeros tie often; sharing keeps the scores independent of instance order).
            winners = ((x == pooled.unsqueeze(1)) & mask.unsqueeze(-1)).to(hidden.dtype)
            shares = shares + (winners / winners.sum(dim=1, keepdim=True)).mean(dim=-1)
        logits = torch.stack(level_logits, dim=1)
        self._save(level_logits=logits)
        return logits, shares / len(self.levels)

    def auxiliary_loss(self, targets, weights):
        logits = self._take()["level_logits"]
        return torch.stack([weighted_bce(logits[:, level], targets, weights)
                            for level in range(logits.shape[1])]).mean()


# The zoo's aggregation name → module class; a class's keyword arguments after ``dropout`` are
# its ``pool_params``.
ZOO_POOLINGS: dict[str, type[Pooling]] = {
    "transformer_abmil": TransformerABMIL,
    "transmil": TransMIL,
    "dsmil": DSMIL,
    "clam_sb": CLAMSB,
    "dtfd": DTFD,
    "mi_net": MiNet,
    "mi_net_ds": MiNetDS,
}

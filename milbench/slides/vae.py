"""Variational autoencoder on instance feature vectors (dense blocks, as in the thesis).

Each block is linear -> batch norm -> ReLU -> dropout(0.2). The latent mean is the embedding
the slide clustering works in; the decoder exists for the thesis' quality check (decode, then
pass the reconstruction through the classifier's head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from milbench.training import seeded, torch_threads, train


def dense_block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        nn.BatchNorm1d(out_features),
        nn.ReLU(),
        nn.Dropout(dropout),
    )


class VariationalAutoencoder(nn.Module):
    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 64,
        hidden_dims: Sequence[int] = (128,),
        dropout: float = 0.2,
    ):
        super().__init__()
        widths = [input_dim, *hidden_dims]
        self.encoder = nn.Sequential(
            *[dense_block(a, b, dropout) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.mean = nn.Linear(widths[-1], latent_dim)
        self.log_variance = nn.Linear(widths[-1], latent_dim)
        back = [latent_dim, *reversed(hidden_dims)]
        self.decoder = nn.Sequential(
            *[dense_block(a, b, dropout) for a, b in zip(back[:-1], back[1:], strict=True)],
            nn.Linear(back[-1], input_dim),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(x)
        return self.mean(hidden), self.log_variance(hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_variance = self.encode(x)
        latent = mean + torch.exp(0.5 * log_variance) * torch.randn_like(mean)
        return self.decoder(latent), mean, log_variance


@dataclass
class VAEModel:
    """A trained VAE plus the standardisation of its inputs (fitted on the training vectors)."""

    network: VariationalAutoencoder
    center: np.ndarray
    scale: np.ndarray

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Latent means ``(n, latent_dim)``; deterministic (eval mode, no sampling)."""
        standardized = (np.asarray(vectors, dtype=np.float64) - self.center) / self.scale
        self.network.eval()
        # One thread: the same numbers in every process (cluster/EMD analyses bags in workers).
        with torch.no_grad(), torch_threads(1):
            mean, _ = self.network.encode(torch.as_tensor(standardized, dtype=torch.float32))
        return mean.numpy().astype(np.float64)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """Reconstructed vectors in the original (unstandardised) feature space."""
        self.network.eval()
        with torch.no_grad():
            output = self.network.decoder(torch.as_tensor(latent, dtype=torch.float32))
        return output.numpy().astype(np.float64) * self.scale + self.center

    def reconstruct(self, vectors: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(vectors))


def fit_vae(
    vectors: np.ndarray,
    *,
    latent_dim: int = 64,
    hidden_dims: Sequence[int] = (128,),
    dropout: float = 0.2,
    epochs: int = 60,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    beta: float = 1.0,
    seed: int = 0,
) -> VAEModel:
    """Train a VAE on ``(n, d)`` vectors; loss = squared error + ``beta`` x KL(q(z|x) || N(0, I)).

    Seeded through a forked torch RNG, so the result depends only on ``seed`` and the caller's
    global torch random state is left untouched.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(
            f"the VAE needs at least 2 vectors in a 2-D array, got shape {vectors.shape}"
        )
    center = vectors.mean(axis=0)
    scale = vectors.std(axis=0)
    scale[scale < 1e-8] = 1.0  # constant features stay constant instead of dividing by zero
    data = torch.as_tensor((vectors - center) / scale, dtype=torch.float32)

    def step(index: torch.Tensor) -> torch.Tensor:
        batch = data[index]
        reconstruction, mean, log_variance = network(batch)
        squared_error = ((reconstruction - batch) ** 2).sum(dim=1).mean()
        divergence = -0.5 * (1 + log_variance - mean**2 - log_variance.exp()).sum(dim=1)
        return squared_error + beta * divergence.mean()

    with seeded(seed) as generator:
        network = VariationalAutoencoder(vectors.shape[1], latent_dim, hidden_dims, dropout)
        train(network, torch.optim.Adam(network.parameters(), lr=learning_rate), step,
              lambda epoch: [index for index in torch.split(
                  torch.randperm(len(data), generator=generator), batch_size)
                  if len(index) >= 2],  # batch norm cannot normalise a batch of one
              epochs=epochs)
    return VAEModel(network=network, center=center, scale=scale)

"""A small CNN instance classifier for 8x8 digit images: per-image class probabilities plus the
intermediate feature vector (the input of its linear head) that the VAE and clustering use."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from milbench.training import seeded, train


class DigitCNN(nn.Module):
    def __init__(self, n_classes: int = 10, feature_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


@dataclass
class InstanceClassifier:
    """Trained CNN; images are ``(n, 8, 8)`` arrays with values in [0, 16] (``load_digits``)."""

    network: DigitCNN

    @staticmethod
    def _tensor(images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1:] != (8, 8):
            raise ValueError(f"images must have shape (n, 8, 8), got {images.shape}")
        return torch.from_numpy(images / 16.0).unsqueeze(1)

    def features(self, images: np.ndarray) -> np.ndarray:
        self.network.eval()
        with torch.no_grad():
            return self.network.features(self._tensor(images)).numpy().astype(np.float64)

    def head_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities from feature vectors (used on VAE reconstructions too)."""
        self.network.eval()
        with torch.no_grad():
            logits = self.network.head(torch.as_tensor(features, dtype=torch.float32))
            return torch.softmax(logits, dim=1).numpy().astype(np.float64)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.head_proba(self.features(images))


def train_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int = 10,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> InstanceClassifier:
    """Train ``DigitCNN`` with Adam and cross-entropy; seeded through a forked torch RNG."""
    data = InstanceClassifier._tensor(images)
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    with seeded(seed) as generator:
        network = DigitCNN(n_classes=n_classes)
        train(network, torch.optim.Adam(network.parameters(), lr=learning_rate),
              lambda index: nn.functional.cross_entropy(network(data[index]), targets[index]),
              lambda epoch: torch.split(torch.randperm(len(data), generator=generator), batch_size),
              epochs=epochs)
    return InstanceClassifier(network)

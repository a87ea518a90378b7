"""The two instance learners the pseudo-labelling loop plugs in.

Both are the seed's classifier: a last layer with 2 outputs and log-softmax, trained with the
negative log-likelihood loss and SGD (momentum), validation accuracy recorded per epoch.

- ``head``: a linear layer on frozen backbone features (standardised with statistics fixed at
  the start of ``fit``, so every retraining sees the same input scale). Fast on CPU.
- ``full``: the whole torchvision network fine-tuned on stain-matched images (meant for a GPU).

Models are plain picklable objects (no closures), so fitted bag models pickle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from milbench.semisup.loop import InstanceModel
from milbench.training import seeded, shuffled_batches, train


def _validation_accuracy(model, items, labels) -> float | None:
    """Accuracy of ``model`` on the source validation part (None when there is none)."""
    if items is None:
        return None
    predicted = model.predict_positive(items) >= 0.5
    return float((predicted == np.asarray(labels, bool)).mean())


def _sgd_epochs(network: nn.Module, fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                n: int, *, epochs: int, learning_rate: float, momentum: float, weight_decay: float,
                batch_size: int, generator: torch.Generator,
                evaluate: Callable[[], float | None]) -> list[float]:
    """NLL + SGD for ``epochs`` epochs; returns the validation accuracy after each epoch."""
    optimizer = torch.optim.SGD(network.parameters(), lr=learning_rate, momentum=momentum,
                                weight_decay=weight_decay)
    loss_fn = nn.NLLLoss()

    def step(batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = fetch(batch)
        return loss_fn(network(inputs), targets)

    def accuracy() -> dict:
        value = evaluate()
        return {} if value is None else {"val_accuracy": value}

    result = train(network, optimizer, step,
                   lambda epoch: shuffled_batches(n, batch_size, generator),
                   epochs=epochs, evaluate=accuracy)
    return [record["val_accuracy"] for record in result.history if "val_accuracy" in record]


# --------------------------------------------------------------------------- head mode


class HeadModel:
    """A linear 2-way log-softmax layer on standardised feature vectors."""

    def __init__(self, layer: nn.Linear, mean: np.ndarray, scale: np.ndarray,
                 val_accuracy: list[float]) -> None:
        self.layer = layer
        self.mean = mean
        self.scale = scale
        self.val_accuracy = val_accuracy

    def log_proba(self, features: np.ndarray) -> torch.Tensor:
        inputs = torch.as_tensor((np.asarray(features, dtype=np.float64) - self.mean) / self.scale,
                                 dtype=torch.float32)
        with torch.no_grad():
            return torch.log_softmax(self.layer(inputs), dim=1)

    def predict_positive(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        return self.log_proba(features)[:, 1].exp().double().numpy()


class HeadTrainer:
    """Trains a :class:`HeadModel`; ``mean`` / ``scale`` standardise the inputs."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, *, epochs: int, learning_rate: float,
                 momentum: float, weight_decay: float, batch_size: int) -> None:
        self.mean, self.scale = mean, scale
        self.epochs, self.learning_rate, self.momentum = epochs, learning_rate, momentum
        self.weight_decay, self.batch_size = weight_decay, batch_size

    def __call__(self, items: np.ndarray, labels: np.ndarray, val_items, val_labels,
                 previous: HeadModel | None, seed: int) -> InstanceModel:
        with seeded(seed) as generator:
            return self._fit(items, labels, val_items, val_labels, previous, generator)

    def _fit(self, items, labels, val_items, val_labels, previous, generator) -> HeadModel:
        if previous is not None:
            layer = copy.deepcopy(previous.layer)
        else:
            layer = nn.Linear(items.shape[1], 2)
        model = HeadModel(layer, self.mean, self.scale, [])
        network = nn.Sequential(layer, nn.LogSoftmax(dim=1))
        inputs = torch.as_tensor((items - self.mean) / self.scale, dtype=torch.float32)
        targets = torch.as_tensor(labels, dtype=torch.long)

        def evaluate() -> float | None:
            return _validation_accuracy(model, val_items, val_labels)

        model.val_accuracy = _sgd_epochs(
            network, lambda batch: (inputs[batch], targets[batch]), len(items),
            epochs=self.epochs, learning_rate=self.learning_rate, momentum=self.momentum,
            weight_decay=self.weight_decay, batch_size=self.batch_size, generator=generator,
            evaluate=evaluate)
        return model


# --------------------------------------------------------------------------- full mode


class FullModel:
    """A whole torchvision network with a 2-way log-softmax head, on image paths."""

    def __init__(self, network: nn.Module, preprocessor, val_accuracy: list[float],
                 device: str = "cpu", batch_size: int = 32) -> None:
        self.network = network
        self.preprocessor = preprocessor
        self.val_accuracy = val_accuracy
        self.device = device
        self.batch_size = batch_size

    def predict_positive(self, paths: np.ndarray, images: ImageCache | None = None) -> np.ndarray:
        if len(paths) == 0:
            return np.zeros(0)
        cache = images if images is not None else ImageCache(self.preprocessor)
        network = self.network.to(self.device).eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(paths), self.batch_size):
                batch = cache.batch(paths[start:start + self.batch_size]).to(self.device)
                out.append(network(batch)[:, 1].exp().double().cpu())
        return torch.cat(out).numpy()


class ImageCache:
    """Decoded, stain-matched, resized uint8 images by path: each file is read once per fit."""

    def __init__(self, preprocessor) -> None:
        self.preprocessor = preprocessor
        self.images: dict[str, torch.Tensor] = {}

    def batch(self, paths) -> torch.Tensor:
        tensors = []
        for path in paths:
            key = str(path)
            if key not in self.images:
                self.images[key] = self.preprocessor.uint8_tensor(key)
            tensors.append(self.images[key])
        return self.preprocessor.finish(torch.stack(tensors))


class _CachedFullModel(FullModel):
    """A FullModel that predicts through the trainer's image cache during ``fit``."""

    def __init__(self, model: FullModel, cache: ImageCache) -> None:
        super().__init__(model.network, model.preprocessor, model.val_accuracy, model.device,
                         model.batch_size)
        self.cache = cache

    def predict_positive(self, paths, images=None) -> np.ndarray:
        return super().predict_positive(paths, self.cache)

    def plain(self) -> FullModel:
        return FullModel(self.network, self.preprocessor, self.val_accuracy, self.device,
                         self.batch_size)


class FullTrainer:
    """Fine-tunes the whole network (``backbone`` by name, last layer → 2 outputs) on images."""

    def __init__(self, backbone: str, weights: str | None, preprocessor, *, epochs: int,
                 learning_rate: float, momentum: float, weight_decay: float, batch_size: int,
                 device: str = "cpu") -> None:
        self.backbone, self.weights, self.preprocessor = backbone, weights, preprocessor
        self.epochs, self.learning_rate, self.momentum = epochs, learning_rate, momentum
        self.weight_decay, self.batch_size, self.device = weight_decay, batch_size, device
        self.cache = ImageCache(preprocessor)

    def build(self) -> nn.Module:
        from preprocessing.backbones import build_classifier, is_weights_file

        if is_weights_file(self.weights):
            # A local backbone file (e.g. from `milbench pretrain`): load it, then add the head.
            from preprocessing.backbones import SPECS, _set_attr, build_backbone

            backbone = build_backbone(self.backbone, self.weights)
            _set_attr(backbone.network, SPECS[self.backbone].head,
                      nn.Linear(SPECS[self.backbone].dim, 2))
            network = backbone.network
        else:
            network = build_classifier(self.backbone, self.weights, num_classes=2)
        return nn.Sequential(network, nn.LogSoftmax(dim=1))

    def __call__(self, paths: np.ndarray, labels: np.ndarray, val_paths, val_labels,
                 previous: FullModel | None, seed: int) -> InstanceModel:
        with seeded(seed) as generator:
            return self._fit(paths, labels, val_paths, val_labels, previous, generator)

    def _fit(self, paths, labels, val_paths, val_labels, previous, generator) -> FullModel:
        network = copy.deepcopy(previous.network) if previous is not None else self.build()
        network = network.to(self.device)
        model = _CachedFullModel(FullModel(network, self.preprocessor, [], self.device,
                                           self.batch_size), self.cache)
        targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)

        def fetch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = batch.numpy()
            return (self.cache.batch(paths[chosen]).to(self.device),
                    targets[batch].to(self.device))

        def evaluate() -> float | None:
            return _validation_accuracy(model, val_paths, val_labels)

        model.val_accuracy = _sgd_epochs(
            network, fetch, len(paths), epochs=self.epochs, learning_rate=self.learning_rate,
            momentum=self.momentum, weight_decay=self.weight_decay, batch_size=self.batch_size,
            generator=generator, evaluate=evaluate)
        return model

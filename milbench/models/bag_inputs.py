"""What a bag network reads, batch by batch: instance vectors (D-MIL) or pixels-store images
(``image_mil``). The D-MIL estimator (:class:`milbench.models.dmil.AttentionDMIL`) is given one
of these by ``_inputs`` and trains and predicts through it without asking which.

An inputs object is built from the estimator's parameters when needed and holds no fitted
state: what it fits (the scaler) is returned to the estimator, which keeps it as ``transform_``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from milbench.models.collate import pad_bags
from milbench.models.images import Throughput, augment, precision, torch_device
from preprocessing.transforms import BagTransform


def padded_tensors(bags, clinical, rows, device: torch.device):
    """The bags of ``rows`` padded to the longest (in the bags' own dtype), their mask and their
    clinical rows, on ``device``."""
    chosen = [bags[i] for i in rows]
    padded, mask = pad_bags(chosen, dtype=chosen[0].dtype)
    clinical_rows = None if clinical is None else torch.from_numpy(clinical[rows]).to(device)
    return torch.from_numpy(padded).to(device), torch.from_numpy(mask).to(device), clinical_rows


class PaddedInputs:
    """What both inputs share: a batch of bags padded to the longest, on the inputs' device."""

    device: torch.device

    def tensors(self, bags, clinical, rows):
        return padded_tensors(bags, clinical, rows, self.device)


class VectorInputs(PaddedInputs):
    """Instance feature vectors, on the CPU: a scaler (+ PCA) fitted on the training instances;
    in training, each real instance is hidden with probability ``instance_dropout``."""

    device = torch.device("cpu")
    # Each epoch's history scores the whole training part too (cheap for vectors).
    scores_training_bags = True

    def __init__(self, scale: bool, pca_components: int | None, instance_dropout: float):
        self.scale, self.pca_components = scale, pca_components
        self.instance_dropout = instance_dropout

    def autocast(self):
        return contextlib.nullcontext()

    def fit(self, bags) -> BagTransform | None:
        """Scaler (+ PCA) on the training instances only: inside CV, the training fold's."""
        if not self.scale and self.pca_components is None:
            return None
        return BagTransform(n_components=self.pca_components, scale=self.scale,
                            random_state=0).fit(bags)

    @staticmethod
    def prepare(bags, transform: BagTransform | None) -> list[np.ndarray]:
        transformed = bags if transform is None else transform.transform(bags)
        return [bag.astype(np.float32) for bag in transformed]

    def training_tensors(self, bags, clinical, rows, generator):
        """A training batch: :meth:`tensors` with instance dropout applied to the mask."""
        x, mask, clinical_rows = self.tensors(bags, clinical, rows)
        return x, self.drop_instances(mask, generator), clinical_rows

    def drop_instances(self, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each real instance hidden with probability ``instance_dropout``; a bag that would
        lose them all keeps them all."""
        if not self.instance_dropout:
            return mask
        kept = mask & (torch.rand(mask.shape, generator=generator) >= self.instance_dropout)
        emptied = ~kept.any(dim=1)
        kept[emptied] = mask[emptied]
        return kept

    @staticmethod
    def watch(batches, evaluate):
        """The training loop's callbacks, as they are (image inputs time them)."""
        return batches, evaluate


class ImageInputs(PaddedInputs):
    """Pixels-store images (``(n_i, 3 * S * S)`` uint8 rows) on ``device`` (``auto``: CUDA when
    torch sees one), with bfloat16 autocast on CUDA. Each training step samples at most
    ``max_instances`` images per bag afresh and augments them (flips, 90° turns, stain jitter);
    each epoch's history gains ``train_images_per_s``."""

    scores_training_bags = False  # a forward pass over every training image per epoch

    def __init__(self, device: str, side: int, max_instances: int, augment: bool,
                 stain_jitter: float):
        self.device = torch_device(device)
        self.side, self.max_instances = side, int(max_instances)
        self.augment, self.stain_jitter = augment, float(stain_jitter)
        self.throughput = Throughput()

    def autocast(self):
        return precision(self.device)

    @staticmethod
    def fit(bags) -> None:
        return None

    @staticmethod
    def prepare(bags, transform: None) -> list[np.ndarray]:
        return bags

    def training_tensors(self, bags, clinical, rows, generator):
        """At most ``max_instances`` images per bag, drawn afresh each step, augmented."""
        sampled = []
        for row in rows:
            bag = bags[row]
            if len(bag) > self.max_instances:
                keep = torch.randperm(len(bag), generator=generator)[:self.max_instances]
                bag = bag[np.sort(keep.numpy())]
            sampled.append(bag)
        if self.augment:
            sizes = np.cumsum([len(bag) for bag in sampled])[:-1]
            stacked = augment(torch.from_numpy(np.concatenate(sampled)), self.side,
                              self.stain_jitter, generator)
            sampled = np.split(stacked.numpy(), sizes)
        self.throughput.count(sum(len(bag) for bag in sampled))
        return self.tensors(sampled, None if clinical is None else clinical[rows],
                            np.arange(len(rows)))

    def watch(self, batches, evaluate):
        """The training loop's callbacks, timed: each history record gains the epoch's training
        images per second."""
        return self.throughput.batches(batches), self.throughput.evaluate(evaluate)

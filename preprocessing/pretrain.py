"""Instance-level pretraining: fine-tune a torchvision backbone on a folder-per-class set.

Layout ``ROOT/<split>/<CLASS>/*.jpg`` (e.g. EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL).
Two phases: the classifier head alone on a frozen backbone, then every layer at a low learning
rate. Training images are augmented (flips, rotation, zoom). The evaluation split gets
per-class one-vs-rest AUC, sensitivity, specificity, precision and a confusion matrix.

The result ``backbone.pt`` (``{"arch", "state_dict", "classes"}``) loads as a local weights
file: ``build_backbone(arch, weights="<out>/backbone.pt")`` or ``weights: <path>`` in an
extractor config.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from milbench.io import atomic_write, atomic_write_json
from milbench.training import seeded, train
from preprocessing.backbones import SPECS, _get_attr, build_classifier
from preprocessing.images import IMAGENET_MEAN, IMAGENET_STD, read_rgb, resize
from preprocessing.stain import IMAGE_SUFFIXES


@dataclass(frozen=True)
class FolderDataset:
    """Sorted ``(path, class index)`` pairs of one split; classes are the sorted folder names."""

    split_dir: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    @classmethod
    def scan(cls, split_dir: str | os.PathLike, classes: tuple[str, ...] | None = None
             ) -> FolderDataset:
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"dataset split folder not found: {split_dir}")
        found = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
        classes = classes or found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has classes {unknown} not in training classes "
                             f"{list(classes)}")
        samples = tuple(
            (path, index)
            for index, name in enumerate(classes) if (split_dir / name).is_dir()
            for path in sorted((split_dir / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        )
        if not samples:
            raise ValueError(f"no images under {split_dir}/<CLASS>/")
        return cls(split_dir, classes, samples)


class _TorchFolder(torch.utils.data.Dataset):
    def __init__(self, folder: FolderDataset, input_size: int, augment: bool) -> None:
        self.folder = folder
        self.input_size = input_size
        steps: list = []
        if augment:
            steps = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(20),
                     v2.RandomResizedCrop(input_size, scale=(0.75, 1.0), ratio=(0.9, 1.1),
                                          antialias=True)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[item]
        image = torch.from_numpy(np.ascontiguousarray(resize(read_rgb(path), self.input_size)))
        return self.transform(image.permute(2, 0, 1)), label


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           classes: tuple[str, ...]) -> dict:
    """Per-class one-vs-rest AUC, sensitivity, specificity, precision; confusion matrix."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    predicted = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    per_class = {}
    total = matrix.sum()
    for index, name in enumerate(classes):
        tp = matrix[index, index]
        fn = matrix[index].sum() - tp
        fp = matrix[:, index].sum() - tp
        tn = total - tp - fn - fp
        positives = labels == index
        auc = (float(roc_auc_score(positives, probabilities[:, index]))
               if 0 < positives.sum() < len(labels) else None)
        per_class[name] = {
            "auc": auc,
            "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
            "specificity": float(tn / (tn + fp)) if tn + fp else None,
            "precision": float(tp / (tp + fp)) if tp + fp else None,
            "support": int(positives.sum()),
        }
    return {"accuracy": float((predicted == labels).mean()), "per_class": per_class,
            "confusion_matrix": matrix.tolist(), "classes": list(classes)}


def _evaluate(model, loader) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, labels and class probabilities over ``loader`` (eval mode, no gradients)."""
    model.eval()
    losses, all_labels, all_probabilities = [], [], []
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            losses.append(float(nn.functional.cross_entropy(logits, labels)) * len(labels))
            all_labels.append(labels.numpy())
            all_probabilities.append(torch.softmax(logits, 1).numpy())
    labels = np.concatenate(all_labels)
    return sum(losses) / len(labels), labels, np.concatenate(all_probabilities)


def pretrain_backbone(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    arch: str = "resnet18",
    weights: str | None = None,
    input_size: int = 224,
    head_epochs: int = 3,
    finetune_epochs: int = 5,
    head_lr: float = 1e-3,
    finetune_lr: float = 1e-5,
    batch_size: int = 32,
    train_split: str = "train",
    eval_split: str | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> dict:
    """Fine-tune ``arch`` on ``ROOT/<split>/<CLASS>/``; write weights, metrics and history.

    ``eval_split`` defaults to the first of ``val``, ``validation``, ``test`` that exists.
    Returns the metrics dict (also in ``<out>/metrics.json``).
    """
    root, out_dir = Path(root), Path(out_dir)
    train_set = FolderDataset.scan(root / train_split)
    if eval_split is None:
        eval_split = next((s for s in ("val", "validation", "test") if (root / s).is_dir()),
                          None)
        if eval_split is None:
            raise FileNotFoundError(f"{root} has no val/validation/test split to evaluate on")
    eval_set = FolderDataset.scan(root / eval_split, train_set.classes)
    started = time.perf_counter()
    with seeded(seed) as generator:
        train_loader = torch.utils.data.DataLoader(
            _TorchFolder(train_set, input_size, augment=True), batch_size=batch_size,
            shuffle=True, generator=generator, num_workers=num_workers)
        eval_loader = torch.utils.data.DataLoader(
            _TorchFolder(eval_set, input_size, augment=False), batch_size=batch_size,
            num_workers=num_workers)
        model = build_classifier(arch, weights, num_classes=len(train_set.classes))
        head = _get_attr(model, SPECS[arch].head)

        def step(batch) -> torch.Tensor:
            images, labels = batch
            return nn.functional.cross_entropy(model(images), labels)

        def evaluate() -> dict:
            loss, labels, probabilities = _evaluate(model, eval_loader)
            return {"eval_loss": loss,
                    "eval_accuracy": float((probabilities.argmax(1) == labels).mean())}

        result = None
        # Phase 1 trains the new head on a frozen network; phase 2 fine-tunes everything.
        for phase, epochs, learning_rate, frozen in (
                ("head", head_epochs, head_lr, True),
                ("finetune", finetune_epochs, finetune_lr, False)):
            head_ids = {id(p) for p in head.parameters()}
            for parameter in model.parameters():
                parameter.requires_grad = not frozen or id(parameter) in head_ids
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                         lr=learning_rate)
            result = train(model, optimizer, step, lambda epoch: train_loader, epochs=epochs,
                           evaluate=evaluate, phase=phase, result=result)
        history = result.history
        _, labels, probabilities = _evaluate(model, eval_loader)
    metrics = classification_metrics(labels, probabilities, train_set.classes)
    metrics.update({"arch": arch, "initial_weights": weights, "eval_split": eval_split,
                    "n_train": len(train_set.samples), "n_eval": len(eval_set.samples),
                    "seconds": time.perf_counter() - started, "seed": seed})
    payload = {"arch": arch, "state_dict": model.state_dict(), "classes": list(train_set.classes)}
    atomic_write(out_dir / "backbone.pt", lambda tmp: torch.save(payload, tmp))
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / "history.json", history)
    return metrics

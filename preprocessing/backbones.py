"""torchvision CNN backbones by name, cut at the penultimate layer (one vector per image).

Weights are one of: ``None`` (random init, the default, never downloads), a torchvision
weights-enum member name such as ``"IMAGENET1K_V1"`` or ``"DEFAULT"`` (downloads through
torchvision's cache only when the backbone is built), or a local file (a state dict, or the
``{"arch", "state_dict", "classes"}`` file that :mod:`preprocessing.pretrain` writes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one architecture and where its classifier head sits."""

    weights_enum: str  # torchvision weights enum class name
    dim: int  # penultimate feature size
    head: str  # attribute path of the final classifier layer, replaced by Identity


SPECS: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("ResNet18_Weights", 512, "fc"),
    "resnet34": BackboneSpec("ResNet34_Weights", 512, "fc"),
    "resnet50": BackboneSpec("ResNet50_Weights", 2048, "fc"),
    "vgg16": BackboneSpec("VGG16_Weights", 4096, "classifier.6"),
    "vgg19": BackboneSpec("VGG19_Weights", 4096, "classifier.6"),
    "densenet121": BackboneSpec("DenseNet121_Weights", 1024, "classifier"),
    "efficientnet_b0": BackboneSpec("EfficientNet_B0_Weights", 1280, "classifier.1"),
}


def list_backbones() -> list[str]:
    return sorted(SPECS)


def _spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose from {list_backbones()}")
    return SPECS[name]


def is_weights_file(weights: str | os.PathLike | None) -> bool:
    """A weights value names a local file if it exists or looks like a path."""
    if weights is None:
        return False
    text = str(weights)
    return Path(text).exists() or "/" in text or text.endswith((".pt", ".pth"))


def _get_attr(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set_attr(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent_path, _, last = dotted.rpartition(".")
    parent = _get_attr(module, parent_path) if parent_path else module
    if last.isdigit():
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def check_weights(name: str, weights: str | os.PathLike) -> None:
    """Fail early (no download) on a weights name the architecture does not have."""
    if is_weights_file(weights):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        return
    enum_name = _spec(name).weights_enum
    available = [w.name for w in getattr(torchvision.models, enum_name)]
    if str(weights) not in available + ["DEFAULT"]:
        raise ValueError(f"{name} has no weights {weights!r}; choose from {available}, "
                         "'DEFAULT', a local file or null")


def build_classifier(name: str, weights: str | None = None, num_classes: int | None = None
                     ) -> nn.Module:
    """The full torchvision network, optionally with enum weights and a new ``num_classes`` head.

    Used by pretraining; a torchvision weights name downloads here (never at import time).
    """
    spec = _spec(name)
    constructor = getattr(torchvision.models, name)
    if weights is None:
        model = constructor(weights=None)
    elif is_weights_file(weights):
        raise ValueError("build_classifier takes enum weights; load local files with "
                         "build_backbone(name, weights=path)")
    else:
        check_weights(name, weights)
        enum = torchvision.models.get_weight(f"{spec.weights_enum}.{weights}")
        model = constructor(weights=enum)
    if num_classes is not None:
        head = _get_attr(model, spec.head)
        _set_attr(model, spec.head, nn.Linear(head.in_features, num_classes))
    return model


def load_weights_file(path: str | os.PathLike) -> tuple[dict, str | None]:
    """Read a weights file: a bare state dict or pretraining's dict; returns (state, arch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises assorted types for a bad file
        raise ValueError(f"cannot read backbone weights file {path}: {error}") from error
    if isinstance(payload, dict) and "state_dict" in payload:
        return payload["state_dict"], payload.get("arch")
    if isinstance(payload, dict):
        return payload, None
    raise ValueError(f"backbone weights file {path} holds a {type(payload).__name__}, "
                     "not a state dict")


class Backbone(nn.Module):
    """A torchvision network whose classifier head is ``Identity``: outputs ``(n, dim)``."""

    def __init__(self, name: str, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        spec = _spec(name)
        self.name = name
        self.dim = spec.dim
        if is_weights_file(weights):
            network = build_classifier(name, None)
            _set_attr(network, spec.head, nn.Identity())
            state, arch = load_weights_file(weights)
            if arch is not None and arch != name:
                raise ValueError(f"weights file {weights} was trained for {arch!r}, not {name!r}")
            # The file's classifier head (any number of classes) has no place here.
            head_prefix = spec.head + "."
            state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
            missing, unexpected = network.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"weights file {weights} does not fit {name}: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}")
        else:
            network = build_classifier(name, None if weights is None else str(weights))
            _set_attr(network, spec.head, nn.Identity())
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).flatten(1)


def build_backbone(name: str, weights: str | os.PathLike | None = None) -> Backbone:
    """Penultimate-layer feature extractor; ``.dim`` is the vector size. Starts in eval mode."""
    return Backbone(name, weights).eval()

"""Backbones build by name without downloads and emit vectors of the declared size."""

from __future__ import annotations

import pytest
import torch

from preprocessing.backbones import (
    SPECS,
    build_backbone,
    build_classifier,
    check_weights,
    is_weights_file,
)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg19"])
def test_declared_dimension_without_weights(name):
    torch.manual_seed(0)
    backbone = build_backbone(name)  # weights=None: nothing downloaded
    with torch.inference_mode():
        vectors = backbone(torch.rand(2, 3, 32, 32))
    assert vectors.shape == (2, SPECS[name].dim) == (2, backbone.dim)
    assert not backbone.training


def test_local_weights_file_round_trip(tmp_path):
    torch.manual_seed(0)
    classifier = build_classifier("resnet18", num_classes=3)
    path = tmp_path / "backbone.pt"
    torch.save({"arch": "resnet18", "state_dict": classifier.state_dict(), "classes": list("abc")},
               path)
    loaded = build_backbone("resnet18", weights=str(path))
    torch.testing.assert_close(loaded.network.conv1.weight, classifier.conv1.weight)
    bare = tmp_path / "bare.pth"
    torch.save(classifier.state_dict(), bare)
    assert build_backbone("resnet18", weights=bare).dim == 512
    with pytest.raises(ValueError, match="trained for 'resnet18'"):
        build_backbone("resnet34", weights=str(path))


def test_weight_errors(tmp_path):
    assert is_weights_file("x/y.pt") and not is_weights_file("IMAGENET1K_V1")
    assert not is_weights_file(None)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        build_backbone("resnet18", weights=junk)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match="no weights 'NOT_A_WEIGHT'"):
        build_backbone("resnet18", weights="NOT_A_WEIGHT")
    check_weights("resnet50", "IMAGENET1K_V2")  # a name lookup only: nothing downloaded

"""Two-phase fine-tuning on a tiny generated folder-per-class set; weights reload as backbone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from preprocessing.backbones import build_backbone
from preprocessing.images import write_rgb
from preprocessing.pretrain import classification_metrics, pretrain_backbone

COLOURS = {"LYMPHOCYTE": (90, 40, 140), "NEUTROPHIL": (200, 120, 150), "EOSINOPHIL": (230, 90, 40)}


def _write_set(root, per_class=6):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 3)):
        for name, colour in COLOURS.items():
            for index in range(count):
                image = np.clip(rng.normal(colour, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
                write_rgb(root / split / name / f"{index:03d}.jpg", image)


def test_pretrain_then_reload(tmp_path):
    _write_set(tmp_path / "cells")
    metrics = pretrain_backbone(tmp_path / "cells", tmp_path / "out", arch="resnet18",
                                input_size=32, head_epochs=2, finetune_epochs=1, batch_size=6,
                                head_lr=1e-2, finetune_lr=1e-4)
    assert metrics["classes"] == sorted(COLOURS) and metrics["eval_split"] == "test"
    assert np.array(metrics["confusion_matrix"]).sum() == 9
    for name in COLOURS:
        assert set(metrics["per_class"][name]) == {"auc", "sensitivity", "specificity",
                                                   "precision", "support"}
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["phase"] for h in history] == ["head", "head", "finetune"]
    backbone = build_backbone("resnet18", weights=tmp_path / "out" / "backbone.pt")
    with torch.inference_mode():
        assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, 512)


def test_metrics_by_hand():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    metrics = classification_metrics(labels, probabilities, ("a", "b"))
    assert metrics["confusion_matrix"] == [[1, 1], [0, 2]]
    b = metrics["per_class"]["b"]
    assert b["sensitivity"] == 1.0 and b["specificity"] == 0.5 and b["precision"] == 2 / 3
    assert b["auc"] == 1.0


def test_missing_eval_split(tmp_path):
    _write_set(tmp_path / "cells", per_class=1)
    shutil.rmtree(tmp_path / "cells" / "test")
    with pytest.raises(FileNotFoundError, match="no val/validation/test"):
        pretrain_backbone(tmp_path / "cells", tmp_path / "out", input_size=32)

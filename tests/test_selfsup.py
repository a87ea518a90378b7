"""The self-supervised (VICReg) cell encoder: its loss on known cases, its augmentations, training
that resumes exactly, and the extractor in a run, saved with the run for new patients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing import selfsup
from preprocessing.selfsup import REPRESENTATION, augment_views, fit_selfsup_encoder, vicreg_loss

SIDE = 32


def test_the_loss_rewards_invariant_spread_decorrelated_views_and_punishes_collapse():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(512, 8, generator=generator) * 2  # spread (std 2 > 1), nearly decorrelated
    good = vicreg_loss(z, z)
    assert good < 0.5
    collapsed = vicreg_loss(torch.zeros(512, 8), torch.zeros(512, 8))
    assert collapsed == pytest.approx(25 * (1 - 1e-2), rel=1e-3)  # the variance hinge, std sqrt(eps)
    shifted = vicreg_loss(z, z + 1)  # the views disagree by 1 everywhere: invariance term 25 * 1
    assert shifted - good == pytest.approx(25.0, rel=1e-4)


def test_augmented_views_are_seeded_images_of_the_same_shape():
    pixels = torch.randint(0, 256, (6, 3, SIDE, SIDE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    first = augment_views(pixels, SIDE, torch.Generator().manual_seed(5))
    again = augment_views(pixels, SIDE, torch.Generator().manual_seed(5))
    other = augment_views(pixels, SIDE, torch.Generator().manual_seed(6))
    assert first.shape == (6, 3, SIDE, SIDE) and first.dtype == torch.float32
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def _pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(24, 3 * SIDE * SIDE), dtype=np.uint8)


def test_training_interrupted_mid_run_resumes_to_the_same_encoder(tmp_path, monkeypatch,
                                                                 progress_bars):
    settings = {"input_size": SIDE, "epochs": 2, "batch_size": 8, "seed": 3, "progress": False}
    straight = fit_selfsup_encoder(_pixels, tmp_path / "straight", **settings)
    calls, real = [], selfsup.augment_views

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 8:  # the second epoch's second batch (three batches an epoch, two views)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(selfsup, "augment_views", interrupting)
    with pytest.raises(KeyboardInterrupt):
        fit_selfsup_encoder(_pixels, tmp_path / "resumed", **settings)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "encoder.pt").exists()
    monkeypatch.setattr(selfsup, "augment_views", real)
    resumed = fit_selfsup_encoder(_pixels, tmp_path / "resumed", **settings)
    # Straight, interrupted, resumed: the last bar starts after the checkpoint's one epoch.
    assert progress_bars == [(2 * 24, 0), (2 * 24, 0), (2 * 24, 24)]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    record = json.loads((tmp_path / "straight" / "train.json").read_text())
    assert record["method"] == "VICReg" and record["uses_test_images"] is True
    assert len(record["epoch_mean_loss"]) == 2


@pytest.mark.e2e
def test_a_run_reads_it_and_keeps_its_weights(tmp_path):
    import milbench

    config = Path(__file__).resolve().parent.parent / "configs" / "pipeline.yaml"
    extractor = (f"{{kind: selfsup, name: vicreg, input_size: {SIDE}, epochs: 1, "
                 "train_batch_size: 16, segmentation: null}")
    result = milbench.run(config, overrides=[
        "data.synthetic.preset=tiny", f"workdir={tmp_path}", "submission.enabled=false",
        "evaluation.n_splits=2", f"features.extractor={extractor}",
        "models=[{name: clinical_logreg}, {name: misvm}]"])
    features = json.loads((result.run_dir / "features.json").read_text())
    assert features["dim"] == REPRESENTATION and features["uses_test_images"] is True
    assert len(list((result.run_dir / "extractors").glob("selfsup-*.pt"))) == 1
    root = next((tmp_path / "data").glob("synthetic-tiny-*"))
    predictions = milbench.predict(result.run_dir, root, models=["misvm"], out=tmp_path / "out")
    written = result.test_predictions("misvm")
    np.testing.assert_allclose(predictions["score"], written["score"], rtol=0, atol=1e-9)

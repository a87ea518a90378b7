"""Stain matching reaches the reference mean/std; references come from named image sets."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.stain import (
    StainReference,
    image_set_paths,
    match_stain,
    reference_for,
    to_space,
    transfer_statistics,
)
from preprocessing.toy import draw_smear, write_toy_cohort


def test_transfer_statistics_exact():
    rng = np.random.default_rng(0)
    channels = rng.normal(100, 20, (32, 32, 3)).astype(np.float32)
    out = transfer_statistics(channels, (10.0, 50.0, 90.0), (2.0, 5.0, 9.0))
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), (10, 50, 90), atol=1e-3)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), (2, 5, 9), rtol=1e-4)


@pytest.mark.parametrize("space", ["rgb", "lab"])
def test_match_stain_reaches_target(space):
    image, _ = draw_smear(np.random.default_rng(1))
    target_image, _ = draw_smear(np.random.default_rng(2))
    # A different stain: shift and squeeze the colours of the target smear.
    target_image = np.clip(target_image * np.array([0.8, 0.95, 0.9]) + 10, 0, 255).astype(np.uint8)
    stats = to_space(target_image, space).reshape(-1, 3)
    reference = StainReference(space, tuple(stats.mean(0)), tuple(stats.std(0)))
    matched = to_space(match_stain(image, reference), space).reshape(-1, 3)
    # uint8 rounding and clipping leave a small residue.
    tolerance = 1.5 if space == "rgb" else 1.0
    np.testing.assert_allclose(matched.mean(0), stats.mean(0), atol=tolerance)
    np.testing.assert_allclose(matched.std(0), stats.std(0), atol=tolerance)


def test_reference_from_named_sets(tmp_path):
    cohort = write_toy_cohort(tmp_path / "data", n_patients=3, images_per_patient=2, n_test=1)
    train = reference_for("train", cohort=cohort)
    assert train.n_images == 4 and train.source == "train"
    everything = reference_for("all", "lab", cohort=cohort)
    assert everything.n_images == 6 and everything.space == "lab"
    folder = reference_for(str(tmp_path / "data" / "trainset"))
    np.testing.assert_allclose(folder.mean, train.mean)
    assert StainReference.from_dict(train.to_dict()) == train
    with pytest.raises(FileNotFoundError, match="neither"):
        image_set_paths(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown stain space"):
        reference_for("train", "hsv", cohort=cohort)

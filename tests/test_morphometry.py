"""Cytomorphometry: descriptors of drawn cells against their known geometry and colour, and the
extractor: keyed, deterministic, resumable, and read by a bag model in a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocessing.extract import extract_features
from preprocessing.morphometry import DIM, NAMES, describe
from preprocessing.store import FeatureStore
from preprocessing.toy import write_toy_cohort

SIDE = 96
CELL, NUCLEUS = (200, 170, 210), (90, 40, 120)


def _drawn(nucleus_axes=(15, 15), cell_radius=30) -> np.ndarray:
    """A round lilac cell with a dark purple nucleus (an ellipse), on a black background."""
    y, x = np.mgrid[:SIDE, :SIDE] - SIDE / 2 + 0.5
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    image[x ** 2 + y ** 2 <= cell_radius ** 2] = CELL
    a, b = nucleus_axes
    image[(x / a) ** 2 + (y / b) ** 2 <= 1] = NUCLEUS
    return image


def _named(vector) -> dict[str, float]:
    return dict(zip(NAMES, vector, strict=True))


def test_a_drawn_cell_measures_as_drawn():
    d = _named(describe(_drawn()))
    assert len(NAMES) == DIM
    assert d["cell_area"] == pytest.approx(np.pi * 30 ** 2 / SIDE ** 2, rel=0.02)
    assert d["nucleus_area"] == pytest.approx(np.pi * 15 ** 2 / SIDE ** 2, rel=0.03)
    assert d["nucleus_to_cell"] == pytest.approx(0.25, rel=0.05)
    assert d["cell_circularity"] == pytest.approx(1.0, abs=0.1) and d["cell_eccentricity"] < 0.2
    assert d["nucleus_solidity"] > 0.95 and d["nucleus_irregularity"] < 0.05
    # Colour moments of each compartment: the drawn colours, flat (no spread, no skew).
    for channel, value in zip("rgb", NUCLEUS, strict=True):
        assert d[f"nucleus_mean_{channel}"] == pytest.approx(value / 255)
        assert d[f"nucleus_std_{channel}"] == pytest.approx(0, abs=1e-9)
    assert d["cytoplasm_mean_r"] == pytest.approx(CELL[0] / 255)
    assert d["glcm_homogeneity"] == pytest.approx(1.0) and d["glcm_contrast"] == pytest.approx(0.0)
    assert d["unmeasurable"] == 0


def test_shape_descriptors_follow_the_nucleus():
    round_, long_ = _named(describe(_drawn((15, 15)))), _named(describe(_drawn((24, 8))))
    assert long_["nucleus_eccentricity"] > 0.9 > round_["nucleus_eccentricity"] + 0.5
    assert long_["nucleus_irregularity"] > round_["nucleus_irregularity"] + 0.1
    big = _named(describe(_drawn((22, 22))))
    assert big["nucleus_to_cell"] > round_["nucleus_to_cell"] * 1.8


def test_a_textured_nucleus_has_chromatin_contrast():
    image = _drawn()
    rng = np.random.default_rng(0)
    nucleus = np.all(image == NUCLEUS, axis=-1)
    noise = rng.integers(-30, 30, size=(nucleus.sum(), 1))
    image[nucleus] = np.clip(image[nucleus].astype(int) + noise, 0, 150).astype(np.uint8)
    textured, flat = _named(describe(image)), _named(describe(_drawn()))
    assert textured["glcm_contrast"] > flat["glcm_contrast"] + 1
    assert textured["nucleus_std_r"] > 0.02


def test_an_empty_image_is_flagged_not_measured():
    vector = describe(np.zeros((SIDE, SIDE, 3), dtype=np.uint8))
    assert vector[-1] == 1 and not vector[:-1].any()


CONFIG = {"kind": "morphometry", "name": "morphometry", "input_size": 64,
          "segmentation": "kmeans_saturation_hue"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_patients=4, images_per_patient=3,
                            size=96, n_test=1)


def _extract(cohort, cache, **kwargs):
    return extract_features(cohort, kwargs.pop("config", CONFIG), cache, progress=False,
                            batch_size=2, num_workers=0, commit_seconds=0.0, **kwargs)


def test_the_extractor_is_keyed_deterministic_and_resumable(cohort, tmp_path):
    store = _extract(cohort, tmp_path / "a")
    assert store.features().shape == (12, DIM) and np.isfinite(store.features()).all()
    again = _extract(cohort, tmp_path / "b")
    np.testing.assert_array_equal(again.features(), store.features())
    other = _extract(cohort, tmp_path / "a", config={**CONFIG, "input_size": 48})
    assert other.root != store.root  # another setting, another store

    def interrupt(rows_done):
        if rows_done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _extract(cohort, tmp_path / "c", on_batch=interrupt)
    resumed = _extract(cohort, tmp_path / "c")
    assert json.loads((resumed.root / "complete.json").read_text())["resumed_at_row"] == 4
    np.testing.assert_array_equal(resumed.features(), store.features())
    assert isinstance(resumed, FeatureStore)


def test_morphometry_needs_a_segmentation(cohort, tmp_path):
    with pytest.raises(ValueError, match="needs segmentation"):
        _extract(cohort, tmp_path, config={**CONFIG, "segmentation": None})


@pytest.mark.e2e
def test_a_bag_model_reads_it_in_a_run(tmp_path):
    import milbench

    config = Path(__file__).resolve().parent.parent / "configs" / "pipeline.yaml"
    result = milbench.run(config, overrides=[
        "data.synthetic.preset=tiny", f"workdir={tmp_path}", "submission.enabled=false",
        "evaluation.n_splits=2", "features.extractor={kind: morphometry, name: morphometry, "
        "input_size: 64, segmentation: kmeans_saturation_hue}",
        "models=[{name: clinical_logreg}, {name: misvm}]"])
    assert set(result.metrics["model"]) == {"clinical_logreg", "misvm"}
    assert json.loads((result.run_dir / "features.json").read_text())["dim"] == DIM

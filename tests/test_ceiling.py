"""The pixel ceiling: its figures from out-of-fold scores against hand-computed values, the truth
aligned with the bags by file name, and a seeded run on a tiny cohort that repeats itself."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pandas as pd
import pytest

from milbench.bench.ceiling import instance_truth, pixel_ceiling, summarize_ceiling
from milbench.data import load_challenge
from milbench.synth import generate_cohort
from milbench.synth.layout import AGE_REFERENCE_DATE


def test_the_figures_by_hand():
    # Two bags of three images: bag 0 (label 0) holds no atypical image, bag 1 (label 1) two.
    flags = np.array([0, 0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.2, 0.9, 0.3, 0.35])
    owners = np.array([0, 0, 0, 1, 1, 1])
    folds = np.array([0, 0, 1, 0, 1, 1])
    figures = summarize_ceiling(flags, scores, owners, np.array([0, 1]), folds)
    # Pairs (atypical, typical) ranked right: 0.9 beats all 4; 0.3 beats 0.1 and 0.2 only: 6/8.
    assert figures["instance_auc"] == pytest.approx(6 / 8)
    # Fold 0 holds 0.1, 0.4 (typical) and 0.9 (atypical): 1.0; fold 1 holds 0.2, 0.35 and 0.3: 1/2.
    assert figures["instance_auc_per_fold"] == pytest.approx([1.0, 0.5])
    # Predicted witness fractions 0.233 and 0.517 separate the two bags.
    assert figures["bag_auc"] == 1.0 and figures["bag_best_threshold_balanced_accuracy"] == 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("ceiling") / "tiny", "tiny", seed=0)


def test_the_truth_follows_each_bags_images_by_name(tiny):
    cohort = load_challenge(tiny, AGE_REFERENCE_DATE).train()
    truth = pd.read_csv(tiny / "truth" / "instances.csv", dtype={"patient_id": str}).set_index(
        ["patient_id", "image"])["atypical"]
    for patient, flags in zip(cohort.patients, instance_truth(tiny, cohort), strict=True):
        names = [Path(path).name for path in patient.image_paths]
        assert flags.tolist() == [truth[(patient.id, name)] for name in names]
    assert sum(len(f) for f in instance_truth(tiny, cohort)) == sum(p.n_images for p in cohort.patients)


def test_a_seeded_ceiling_repeats_itself(tiny, tmp_path):
    first = pixel_ceiling(tiny, tmp_path / "cache", input_size=32, n_splits=3, epochs=2, progress=False)
    again = pixel_ceiling(tiny, tmp_path / "cache", input_size=32, n_splits=3, epochs=2, progress=False)
    for figures in (first, again):
        figures.pop("seconds")
    assert first == again
    assert len(first["instance_auc_per_fold"]) == 3 and 0 <= first["instance_auc"] <= 1
    from milbench.report import _instance_ceilings

    assert json.loads((tiny / "truth" / "pixel_ceiling_32px.json").read_text()) == {**again, "seconds": ANY}
    assert any("pixel ceiling at 32 px" in line for line in _instance_ceilings(tiny))
    assert first["n_images"] == sum(p.n_images for p in load_challenge(tiny, AGE_REFERENCE_DATE)
                                    .train().patients)


def test_a_folder_without_truth_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no truth/instances.csv"):
        pixel_ceiling(tmp_path, tmp_path / "cache")


def test_a_computed_ceiling_leaves_the_cohort_usable(tmp_path):
    """The ceiling is written into truth/ after the cohort: a run must still accept the folder
    (a regression: its checksum check refused the cohort as changed), while any other new file
    is still caught."""
    from milbench.io import atomic_write_json
    from milbench.synth.difficulty import pixel_ceiling_path
    from milbench.synth.layout import verify_generated

    root = generate_cohort(tmp_path / "cohort", "tiny", seed=1)
    atomic_write_json(pixel_ceiling_path(root, 64), {"instance_auc": 0.8})
    assert verify_generated(root) == []
    (root / "truth" / "notes.txt").write_text("added by hand")
    assert verify_generated(root) == ["unexpected truth/notes.txt"]

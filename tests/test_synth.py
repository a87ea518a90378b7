"""Tests of the synthetic cohort generator: layout, quirks, truth, determinism and safety."""

from __future__ import annotations

import filecmp
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from milbench.synth import (
    PRESETS,
    generate_allidb2,
    generate_cohort,
    load_truth,
    read_manifest,
)
from milbench.synth import cohort as cohort_module
from milbench.synth.plan import plan_cohort
from milbench.synth.render import render_cell, sample_stain

CLINICAL_HEADER = "ID,LABEL,GENDER,DOB,LYMPH_COUNT"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("synth") / "tiny", "tiny", seed=0)


def _all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _first_line(path: Path) -> str:
    return path.read_text(encoding="utf-8").splitlines()[0]


def test_csv_headers_and_rows(tiny: Path) -> None:
    preset = PRESETS["tiny"]
    n_train = preset.n_train_tumoral + preset.n_train_reactive
    n_test = preset.n_test_tumoral + preset.n_test_reactive
    assert _first_line(tiny / "clinical_annotation.csv") == "," + CLINICAL_HEADER
    assert _first_line(tiny / "trainset" / "trainset_true.csv") == CLINICAL_HEADER
    assert _first_line(tiny / "testset" / "testset_data.csv") == CLINICAL_HEADER
    assert _first_line(tiny / "sample_submission.csv") == "Id,Predicted"

    everything = pd.read_csv(tiny / "clinical_annotation.csv", index_col=0)
    train = pd.read_csv(tiny / "trainset" / "trainset_true.csv")
    test = pd.read_csv(tiny / "testset" / "testset_data.csv")
    submission = pd.read_csv(tiny / "sample_submission.csv")
    assert list(everything.index) == list(range(n_train + n_test))
    assert len(train) == n_train and len(test) == n_test
    # Train rows first, then test rows, identical to the split files.
    pd.testing.assert_frame_equal(everything.reset_index(drop=True),
                                  pd.concat([train, test], ignore_index=True))
    assert set(train["LABEL"]) == {0, 1}
    assert (train["LABEL"] == 1).sum() == preset.n_train_tumoral
    assert (test["LABEL"] == -1).all()
    assert list(submission["Id"]) == list(test["ID"]) and (submission["Predicted"] == 0).all()
    assert everything["ID"].is_unique
    assert all(re.fullmatch(r"P\d+", i) for i in everything["ID"])


def test_clinical_quirks(tiny: Path) -> None:
    everything = pd.read_csv(tiny / "clinical_annotation.csv", index_col=0, dtype={"DOB": str})
    assert set(everything["GENDER"]) <= {"M", "F", "f"} and "f" in set(everything["GENDER"])
    dobs = everything["DOB"]
    slash = dobs.str.fullmatch(r"[1-9]\d?/[1-9]\d?/\d{4}")
    dashed = dobs.str.fullmatch(r"\d{2}-\d{2}-\d{4}")
    assert slash.any() and dashed.any() and (slash | dashed).all()
    # The DD-MM-YYYY rows form one contiguous block.
    rows = np.flatnonzero(dashed.to_numpy())
    assert rows.max() - rows.min() + 1 == rows.size
    counts = everything["LYMPH_COUNT"]
    assert counts.between(2.28, 295.0).all()
    assert (counts.round(2) == counts).all()


def test_images_match_tables(tiny: Path) -> None:
    truth = load_truth(tiny)
    for split, table_name in (("train", "trainset_true.csv"), ("test", "testset_data.csv")):
        table = pd.read_csv(tiny / f"{split}set" / table_name)
        folders = sorted(p.name for p in (tiny / f"{split}set").iterdir() if p.is_dir())
        assert folders == sorted(table["ID"])
        for patient in table["ID"]:
            names = sorted(p.name for p in (tiny / f"{split}set" / patient).iterdir())
            assert names == [f"{i:06d}.jpg" for i in range(len(names))]
            assert 4 <= len(names) <= 8
            listed = truth.instances[truth.instances["patient_id"] == patient]
            assert sorted(listed["image"]) == names and (listed["split"] == split).all()
            with Image.open(tiny / f"{split}set" / patient / names[0]) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (224, 224)
                assert not image.info.get("progressive")


def test_truth_consistent_with_labels(tiny: Path) -> None:
    truth = load_truth(tiny)
    test = pd.read_csv(tiny / "testset" / "testset_data.csv")
    train = pd.read_csv(tiny / "trainset" / "trainset_true.csv")
    assert set(truth.test_labels) == set(test["ID"])
    assert set(truth.test_labels.values()) == {0, 1}
    labels = {**dict(zip(train["ID"], train["LABEL"], strict=True)), **truth.test_labels}
    instances = truth.instances
    assert list(instances.columns) == ["patient_id", "image", "split", "atypical", "variant", "atypia"]
    # Easy presets: an atypical cell's atypia is its patient's signal strength, others' 0.
    assert np.allclose(instances["atypia"], 0.7 * instances["atypical"])
    assert set(instances["variant"]) <= {"typical", "atypical", "reactive"}
    assert (instances["atypical"] == (instances["variant"] == "atypical").astype(int)).all()
    rate = instances.groupby("patient_id")["atypical"].mean()
    for patient, label in labels.items():
        if label == 1:
            assert rate[patient] > 0  # every tumoral bag holds a witness
        else:
            assert rate[patient] <= 0.25  # at most the small reactive rate (on bags of <= 8)
    reactive = instances["patient_id"].map(labels) == 0
    assert instances.loc[reactive, "atypical"].mean() <= 0.1


def test_masks(tiny: Path) -> None:
    truth = load_truth(tiny)
    assert truth.mask_dir is not None
    for row in truth.instances.itertuples():
        stem = row.image.removesuffix(".jpg")
        cell = cv2.imread(str(truth.mask_dir / row.patient_id / f"{stem}_cell.png"),
                          cv2.IMREAD_UNCHANGED)
        nucleus = cv2.imread(str(truth.mask_dir / row.patient_id / f"{stem}_nucleus.png"),
                             cv2.IMREAD_UNCHANGED)
        assert cell.shape == nucleus.shape == (224, 224)
        assert set(np.unique(cell)) == {0, 255} and set(np.unique(nucleus)) == {0, 255}
        inside = (nucleus > 0) & (cell > 0)
        assert inside.sum() >= 0.99 * (nucleus > 0).sum()
        assert cell[112, 112] == 255


def test_cell_more_saturated_than_background(tiny: Path) -> None:
    truth = load_truth(tiny)
    for row in truth.instances.head(12).itertuples():
        image = cv2.imread(str(tiny / f"{row.split}set" / row.patient_id / row.image))
        saturation = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 1].astype(float)
        stem = row.image.removesuffix(".jpg")
        cell = cv2.imread(str(truth.mask_dir / row.patient_id / f"{stem}_cell.png"), 0) > 0
        nucleus = cv2.imread(str(truth.mask_dir / row.patient_id / f"{stem}_nucleus.png"), 0) > 0
        assert saturation[cell].mean() > saturation[~cell].mean() + 20
        # The nucleus is the darkest, most saturated thing: what segmentation latches onto.
        assert saturation[nucleus].mean() > np.percentile(saturation[~cell], 95)


def test_manifest(tiny: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny)
    assert manifest is not None
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0
    assert manifest["knobs"] == {}  # the overrides given; preset_spec holds every resolved knob
    assert manifest["preset_spec"]["witness_rate"] == 0.5
    assert manifest["preset_spec"]["signal_strength"] == 0.7
    truth = load_truth(tiny)
    assert manifest["counts"]["train"]["images"] == int((truth.instances["split"] == "train").sum())
    assert read_manifest(tmp_path) is None


def test_same_seed_same_bytes_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = generate_cohort(tmp_path / "again", "tiny", seed=0)
    parallel = generate_cohort(tmp_path / "parallel", "tiny", seed=0, workers=2)
    other = generate_cohort(tmp_path / "other", "tiny", seed=1)
    reference = _all_files(tiny)
    assert _all_files(again) == reference
    assert _all_files(parallel) == reference
    assert _all_files(other) != reference
    match, mismatch, errors = filecmp.cmpfiles(tiny, other, ["clinical_annotation.csv"],
                                               shallow=False)
    assert mismatch == ["clinical_annotation.csv"]


def test_refuses_non_empty_target_and_accepts_empty(tmp_path: Path) -> None:
    target = tmp_path / "cohort"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="cohort"):
        generate_cohort(target, "tiny")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_cohort(empty, "tiny", progress=True)
    assert (empty / "synth.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_generation_leaves_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(task: object) -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(cohort_module, "_render_patient", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_cohort(tmp_path / "cohort", "tiny")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"witness_rate": 1.5}, "witness_rate"),
        ({"signal_strength": -0.1}, "signal_strength"),
        ({"clinical_informativeness": math.nan}, "clinical_informativeness"),
        ({"preset": "huge"}, "challenge"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_knob_validation(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_cohort(tmp_path / "cohort", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_signal_strength_zero_makes_atypical_cells_typical() -> None:
    stain = sample_stain(np.random.default_rng(3))
    for seed in range(3):
        typical = render_cell(np.random.default_rng(seed), stain, "typical", 0.0)
        atypical = render_cell(np.random.default_rng(seed), stain, "atypical", 0.0)
        assert np.array_equal(typical.image, atypical.image)


def test_atypical_cells_are_larger_and_irregular() -> None:
    rng = np.random.default_rng(0)
    stain = sample_stain(rng)

    def nucleus_stats(variant: str) -> tuple[float, float]:
        areas, solidities = [], []
        for _ in range(12):
            mask = render_cell(rng, stain, variant, 1.0).nucleus_mask
            contour = max(cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0],
                          key=cv2.contourArea)
            areas.append(cv2.contourArea(contour))
            solidities.append(areas[-1] / cv2.contourArea(cv2.convexHull(contour)))
        return float(np.mean(areas)), float(np.mean(solidities))

    typical_area, typical_solidity = nucleus_stats("typical")
    atypical_area, atypical_solidity = nucleus_stats("atypical")
    assert atypical_area > 1.3 * typical_area
    assert atypical_solidity < typical_solidity


def test_challenge_plan_matches_real_statistics() -> None:
    preset = PRESETS["challenge"]
    seeds = np.random.SeedSequence(0).spawn(1)
    patients, _ = plan_cohort(preset, seeds[0], 0.5, 0.5)
    train = [p for p in patients if p.split == "train"]
    test = [p for p in patients if p.split == "test"]
    assert len(train) == 163 and sum(p.label for p in train) == 113 and len(test) == 42
    sizes = np.array([len(p.variants) for p in train])
    labels = np.array([p.label for p in train])
    assert sizes.min() >= 16 and sizes.max() <= 198 and 50 <= np.median(sizes) <= 85
    assert np.median(sizes[labels == 1]) > np.median(sizes[labels == 0])
    total = sizes.sum() + sum(len(p.variants) for p in test)
    assert 14_000 <= total <= 19_500
    counts = np.array([p.lymph_count for p in train])
    assert np.mean(labels[counts > 8]) > 0.9  # high counts nearly always tumoral
    assert np.median(counts[labels == 1]) > np.median(counts[labels == 0])


def test_allidb2(tmp_path: Path) -> None:
    root = generate_allidb2(tmp_path / "allidb", seed=0, n_per_class=3)
    files = sorted((root / "ALL_IDB2" / "img").iterdir())
    names = [p.name for p in files]
    assert [n[:5] for n in names] == [f"Im{i:03d}" for i in range(1, 7)]
    assert all(re.fullmatch(r"Im\d{3}_[01]\.tif", n) for n in names)
    assert sum(n.endswith("_1.tif") for n in names) == 3
    for path in files:
        with Image.open(path) as image:
            assert image.format == "TIFF" and image.mode == "RGB" and image.size == (257, 257)
    manifest = read_manifest(root)
    assert manifest is not None and manifest["counts"] == {"blast": 3, "healthy": 3}
    again = generate_allidb2(tmp_path / "again", seed=0, n_per_class=3)
    assert _all_files(again) == _all_files(root)
    with pytest.raises(FileExistsError):
        generate_allidb2(root, n_per_class=3)

"""Segmentation keeps the central cell on drawn smears; cache and errors behave."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.images import read_mask
from preprocessing.segmentation import (
    apply_mask,
    central_component,
    iou,
    list_variants,
    segment,
    segment_file,
    segmentation_paths,
)
from preprocessing.toy import draw_smear, write_toy_cohort

# Lower bounds on drawn smears (measured means over 10 images: saturation 0.79, saturation+hue
# 0.79, colour 0.75, grabcut 0.99). The drawn cytoplasm rim is barely saturated, so the k-means
# variants miss part of it; their bound is lower than GrabCut's.
IOU_BOUND = {"kmeans_saturation": 0.6, "kmeans_saturation_hue": 0.65, "kmeans_color3": 0.6,
             "grabcut": 0.9}
# Mean IoU bounds on the synthetic ``tiny`` preset (measured on all 76 images: saturation+hue
# 0.90, colour 0.84, grabcut 0.86, saturation 0.77: red cells touching the lymphocyte still
# merge into its mask now and then).
SYNTH_MEAN_IOU_BOUND = {"kmeans_saturation": 0.65, "kmeans_saturation_hue": 0.85,
                        "kmeans_color3": 0.78, "grabcut": 0.8}


@pytest.mark.parametrize("variant", sorted(IOU_BOUND))
def test_variant_keeps_central_cell(variant):
    scores = []
    for seed in range(5):
        image, truth = draw_smear(np.random.default_rng(seed))
        mask = segment(image, variant)
        assert mask.dtype == bool and mask.shape == truth.shape
        assert mask[112, 112], "the centre pixel belongs to the cell"
        scores.append(iou(mask, truth))
    assert min(scores) > IOU_BOUND[variant], scores


def test_variants_listed():
    assert set(list_variants()) == set(IOU_BOUND)
    with pytest.raises(ValueError, match="unknown segmentation variant"):
        segment(np.zeros((8, 8, 3), np.uint8), "otsu")


def test_deterministic():
    image, _ = draw_smear(np.random.default_rng(3))
    for variant in list_variants():
        assert np.array_equal(segment(image, variant), segment(image, variant))


def test_central_component_picks_nearest_when_centre_empty():
    mask = np.zeros((50, 50), bool)
    mask[0:5, 0:5] = True
    mask[30:35, 30:35] = True  # nearer to the centre (24.5, 24.5)
    kept = central_component(mask)
    assert kept[32, 32] and not kept[2, 2]
    assert not central_component(np.zeros((10, 10), bool)).any()


def test_apply_mask_and_iou():
    image = np.full((4, 4, 3), 200, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    masked = apply_mask(image, mask, background=7)
    assert (masked[mask] == 200).all() and (masked[~mask] == 7).all()
    assert iou(mask, mask) == 1.0 and iou(mask, ~mask) == 0.0


def test_segment_file_caches(tmp_path):
    cohort = write_toy_cohort(tmp_path / "data", n_patients=1, images_per_patient=1, n_test=0)
    source = cohort.patients[0].image_paths[0]
    mask_path, masked_path = segment_file(source, tmp_path / "seg", "kmeans_saturation")
    assert (mask_path, masked_path) == segmentation_paths(tmp_path / "seg", "kmeans_saturation",
                                                          source)
    assert read_mask(mask_path).any()
    stamp = masked_path.stat().st_mtime_ns
    segment_file(source, tmp_path / "seg", "kmeans_saturation")
    assert masked_path.stat().st_mtime_ns == stamp, "cached entry is reused"


@pytest.mark.e2e
def test_bench_on_synthetic_preset(tmp_path):
    synth = pytest.importorskip("milbench.synth")
    from milbench.bench.segmentation import bench_segmentation_command

    root = synth.generate_cohort(tmp_path / "tiny", preset="tiny", seed=0)
    variants = ["kmeans_saturation", "kmeans_saturation_hue", "kmeans_color3"]
    table = bench_segmentation_command(root, variants, out=tmp_path / "bench", limit=24,
                                       print_table=False).set_index("variant")
    for variant in variants:
        assert table.loc[variant, "mean_iou"] > SYNTH_MEAN_IOU_BOUND[variant], table
    assert (tmp_path / "bench" / "segmentation_grid.png").stat().st_size > 10_000
    assert (tmp_path / "bench" / "segmentation_bench.csv").is_file()

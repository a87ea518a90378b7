"""Tests for the slide classifier: EMD, assignment, DBSCAN search, cutoff, digits, benchmark."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milbench.slides import clustering
from milbench.slides.clustering import SlideClusterer
from milbench.slides.digits import Distortion, distorted_slide, stochastic_slide, sure_mask
from milbench.slides.emd import assign_clusters, emd
from milbench.slides.vae import fit_vae

CENTERS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def _references(rng: np.random.Generator) -> list[np.ndarray]:
    return [center + rng.normal(scale=0.5, size=(40, 2)) for center in CENTERS]


def _toy_slide(rng: np.random.Generator, flip: float = 0.3):
    """Well-separated clusters of classes 0 and 2; the classifier is wrong on ``flip`` of them."""
    truth = np.repeat([0, 2], [15, 12])
    latent = CENTERS[truth] + rng.normal(scale=0.4, size=(len(truth), 2))
    classifier = truth.copy()
    wrong = rng.choice(len(truth), size=int(flip * len(truth)), replace=False)
    classifier[wrong] = 1
    return latent, classifier, truth


def test_emd_of_identical_clouds_is_zero_and_translation_costs_its_length():
    cloud = np.random.default_rng(0).normal(size=(30, 4))
    assert emd(cloud, cloud) == pytest.approx(0.0, abs=1e-6)
    assert emd(cloud, cloud[::-1]) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, 4.0, 0.0, 0.0])
    assert emd(cloud, cloud + shift) == pytest.approx(5.0, rel=1e-6)


def test_emd_rejects_mismatched_clouds():
    with pytest.raises(ValueError, match="equal widths"):
        emd(np.zeros((3, 2)), np.zeros((3, 3)))


def test_assignment_one_to_one_then_replicated():
    costs = np.array([[1.0, 2.0], [1.5, 5.0]])
    assert assign_clusters(costs, "hungarian").tolist() == [1, 0]  # one-to-one beats greedy
    assert assign_clusters(costs, "nearest").tolist() == [0, 0]
    many = np.array([[0.0, 9.0], [0.1, 9.0], [0.2, 9.0]])  # 3 clusters, 2 classes
    assigned = assign_clusters(many, "hungarian")
    assert np.bincount(assigned, minlength=2).max() <= 2  # ceil(3 / 2) copies per class
    with pytest.raises(ValueError, match="assignment"):
        assign_clusters(costs, "greedy")


@pytest.mark.parametrize("search", ["grid", "bayes", "tpe"])
def test_dbscan_and_assignment_recover_toy_slide(search):
    rng = np.random.default_rng(1)
    clusterer = SlideClusterer(_references(rng), disagreement_cutoff=None, random_state=0)
    latent, classifier, truth = _toy_slide(rng)
    result = clusterer.classify(latent, classifier, search=search)
    assert (classifier != truth).sum() > 0
    np.testing.assert_array_equal(result.labels, truth)
    assert sorted(result.cluster_classes.values()) == [0, 2]
    assert not result.fell_back


def test_cutoff_falls_back_exactly():
    rng = np.random.default_rng(2)
    references = _references(rng)
    latent, classifier, truth = _toy_slide(rng)
    disagreements = int((classifier != truth).sum())
    kept = SlideClusterer(references, disagreement_cutoff=disagreements).classify(
        latent, classifier
    )
    np.testing.assert_array_equal(kept.labels, truth)
    assert not kept.fell_back
    below = SlideClusterer(references, disagreement_cutoff=disagreements - 1)
    restored = below.classify(latent, classifier)
    assert restored.fell_back
    np.testing.assert_array_equal(restored.labels, classifier)
    np.testing.assert_array_equal(restored.proposed, truth)


@pytest.mark.parametrize(("random", "guided"), [(10, 10), (3, 4)])
def test_bayesian_search_stays_within_budget(monkeypatch, random, guided):
    calls = []
    original = clustering._Slide.evaluate

    def counting(self, eps_quantile, min_samples):
        calls.append((eps_quantile, min_samples))
        return original(self, eps_quantile, min_samples)

    monkeypatch.setattr(clustering._Slide, "evaluate", counting)
    rng = np.random.default_rng(3)
    clusterer = SlideClusterer(_references(rng), bayes_random=random, bayes_guided=guided)
    latent, classifier, _ = _toy_slide(rng)
    result = clusterer.classify(latent, classifier, search="bayes")
    assert len(calls) == random + guided == result.n_evaluations
    low, high = clusterer.eps_quantile_range
    assert all(low <= q <= high and 2 <= m <= 10 for q, m in calls)


def test_grid_has_twenty_configurations_and_optimal_needs_truth():
    rng = np.random.default_rng(4)
    clusterer = SlideClusterer(_references(rng))
    latent, classifier, truth = _toy_slide(rng, flip=0.5)
    assert clusterer.classify(latent, classifier).n_evaluations == 20
    optimal = clusterer.classify(latent, classifier, search="optimal", truth=truth)
    assert (optimal.labels == truth).sum() >= (classifier == truth).sum()
    with pytest.raises(ValueError, match="true labels"):
        clusterer.classify(latent, classifier, search="optimal")


def test_search_is_deterministic_with_a_seed():
    rng = np.random.default_rng(5)
    references = _references(rng)
    latent, classifier, _ = _toy_slide(rng)
    first = SlideClusterer(references, random_state=7).classify(latent, classifier, "bayes")
    second = SlideClusterer(references, random_state=7).classify(latent, classifier, "bayes")
    assert [(e.eps_quantile, e.min_samples) for e in first.history] == [
        (e.eps_quantile, e.min_samples) for e in second.history
    ]
    np.testing.assert_array_equal(first.labels, second.labels)


def test_single_image_slide_keeps_classifier_label():
    rng = np.random.default_rng(6)
    result = SlideClusterer(_references(rng)).classify(np.array([[5.0, 5.0]]), np.array([1]))
    assert result.labels.tolist() == [1]


def test_vae_is_deterministic_and_leaves_global_rng_alone():
    import torch

    vectors = np.random.default_rng(0).normal(size=(40, 6))
    state = torch.random.get_rng_state()
    first = fit_vae(vectors, latent_dim=3, epochs=3, seed=1).encode(vectors)
    second = fit_vae(vectors, latent_dim=3, epochs=3, seed=1).encode(vectors)
    np.testing.assert_array_equal(first, second)
    assert first.shape == (40, 3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_digit_generators():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 16, size=(200, 8, 8))
    labels = np.repeat(np.arange(10), 20)
    sure = sure_mask(rng.uniform(size=200), labels)
    assert 0.6 < sure.mean() < 0.8
    for _ in range(5):
        slide = stochastic_slide(rng, images, labels, sure)
        assert 20 <= len(slide.labels) <= 100
        assert len(np.unique(labels[slide.indices][~sure[slide.indices]])) <= 1
        distorted = distorted_slide(rng, images, labels)
        assert 20 <= len(distorted.labels) <= 100 and distorted.images.shape[1:] == (8, 8)
    warped = Distortion(shear=0.3, rotation_degrees=15, thickness=1).apply(images[:3])
    assert warped.shape == (3, 8, 8) and warped.max() <= 16 + 1e-9 and warped.min() >= 0


@pytest.mark.e2e
def test_bench_command_writes_tables(tmp_path, monkeypatch):
    from milbench.bench import slides as bench

    real = bench.run_slides_benchmark

    def quick(n_slides, seed, mode, progress=False):
        return real(n_slides, seed, mode, progress=progress, cnn_epochs=2, vae_epochs=2)

    monkeypatch.setattr(bench, "run_slides_benchmark", quick)
    summary = bench.bench_slides_command(1, 0, tmp_path, "distorted")
    assert set(summary["method"]) == set(bench.METHODS)
    per_slide = pd.read_csv(tmp_path / "slides_per_slide.csv")
    assert len(per_slide) == 1 and per_slide["bayes_evaluations"].iloc[0] == 20
    assert "| distorted | bayes |" in (tmp_path / "slides_summary.md").read_text()
    with pytest.raises(ValueError, match="mode"):
        real(1, 0, "other")


def test_min_votes_restricts_clusters_to_predicted_classes():
    rng = np.random.default_rng(7)
    references = _references(rng)
    truth = np.repeat([0, 2], [15, 12])
    latent = CENTERS[truth] + rng.normal(scale=0.4, size=(len(truth), 2))
    classifier = np.where(truth == 2, 1, 0)  # the classifier never says 2
    free = SlideClusterer(references, disagreement_cutoff=None).classify(latent, classifier)
    assert set(free.labels) == {0, 2}
    restricted = SlideClusterer(references, disagreement_cutoff=None, min_votes=1)
    assert set(restricted.classify(latent, classifier).labels) <= {0, 1}

"""Tests for the ``cluster_emd`` bag model on a tiny seeded fixture of bags."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from milbench.models import create_model, list_models
from milbench.models.cluster_emd import BAG_FEATURES


@pytest.fixture(scope="module")
def fixture_bags():
    """A dozen bags of 2-7 instances; tumoral bags hold instances shifted by +3."""
    rng = np.random.default_rng(0)
    bags, labels = [], []
    for index in range(12):
        label = index % 2
        bag = rng.normal(size=(int(rng.integers(2, 8)), 4))
        if label:
            bag[: max(1, len(bag) // 2)] += 3.0
        bags.append(bag)
        labels.append(label)
    return bags, np.array(labels)


@pytest.fixture(scope="module")
def fitted(fixture_bags):
    bags, labels = fixture_bags
    return create_model("cluster_emd", random_state=0, vae_epochs=20).fit(bags, labels)


def test_registered_with_instances_tag():
    assert "cluster_emd" in list_models(tag="instances")


def test_fit_predict_shapes_and_separation(fixture_bags, fitted):
    bags, labels = fixture_bags
    proba = fitted.predict_proba(bags)
    assert proba.shape == (12, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (fitted.predict(bags) == labels).mean() >= 0.9
    assert fitted.decision_function(bags).shape == (12,)
    assert not fitted.oof_used_  # 6 bags per class: too few for out-of-fold bag features


def test_out_of_fold_bag_features_with_enough_bags():
    rng = np.random.default_rng(1)
    labels = np.arange(24) % 2
    bags = [rng.normal(size=(5, 3)) + 3.0 * label * (np.arange(5) < 2)[:, None] for label in labels]
    model = create_model("cluster_emd", random_state=0, vae_epochs=10).fit(bags, labels)
    assert model.oof_used_  # 12 bags per class >= 4 per fold x 3 folds
    assert (model.predict(bags) == labels).mean() >= 0.8


def test_pca_and_parallel_analysis():
    """PCA shrinks the instances before the head and the VAE; analysing bags in two processes
    gives exactly the single-process results."""
    rng = np.random.default_rng(1)
    labels = np.arange(24) % 2
    bags = [rng.normal(size=(5, 12)) + 3.0 * label * (np.arange(5) < 2)[:, None]
            for label in labels]
    serial = create_model("cluster_emd", random_state=0, vae_epochs=10, pca_components=3)
    serial.fit(bags, labels)
    assert serial.stage_.transform.n_components_ == 3
    assert serial.stage_.clusterer.references[0].shape[1] == serial.latent_dim
    assert (serial.predict(bags) == labels).mean() >= 0.8
    parallel = clone(serial).set_params(n_jobs=2).fit(bags, labels)
    np.testing.assert_array_equal(parallel.predict_proba(bags), serial.predict_proba(bags))
    np.testing.assert_array_equal(np.concatenate(parallel.instance_scores(bags)),
                                  np.concatenate(serial.instance_scores(bags)))
    with pytest.raises(ValueError, match="pca_components"):
        create_model("cluster_emd", pca_components=0).fit(bags, labels)


def test_bag_features_and_instance_scores(fixture_bags, fitted):
    bags, _ = fixture_bags
    features = fitted.bag_features(bags)
    assert list(features.columns) == list(BAG_FEATURES) and len(features) == 12
    assert features["tumoral_fraction"].between(0, 1).all()
    scores = fitted.instance_scores(bags)
    assert [len(s) for s in scores] == [len(b) for b in bags]
    assert all(set(np.unique(s)) <= {0.0, 1.0} for s in scores)


def test_invariant_to_instance_and_bag_order(fixture_bags, fitted):
    bags, _ = fixture_bags
    rng = np.random.default_rng(1)
    permutations = [rng.permutation(len(b)) for b in bags]
    shuffled = [b[p] for b, p in zip(bags, permutations, strict=True)]
    np.testing.assert_allclose(fitted.predict_proba(shuffled), fitted.predict_proba(bags))
    for original, moved, p in zip(
        fitted.instance_scores(bags), fitted.instance_scores(shuffled), permutations, strict=True
    ):
        np.testing.assert_array_equal(original[p], moved)
    order = rng.permutation(len(bags))
    np.testing.assert_allclose(
        fitted.predict_proba([bags[i] for i in order]), fitted.predict_proba(bags)[order]
    )


def test_deterministic_clone_and_pickle(fixture_bags, fitted):
    bags, labels = fixture_bags
    again = clone(fitted).fit(bags, labels)
    np.testing.assert_array_equal(again.predict_proba(bags), fitted.predict_proba(bags))
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_proba(bags), fitted.predict_proba(bags))
    assert clone(fitted).get_params() == fitted.get_params()


def test_errors(fixture_bags):
    bags, labels = fixture_bags
    model = create_model("cluster_emd")
    with pytest.raises(NotFittedError):
        model.predict_proba(bags)
    with pytest.raises(ValueError, match="search"):
        create_model("cluster_emd", search="random").fit(bags, labels)
    fitted = create_model("cluster_emd", oof_folds=0, vae_epochs=10).fit(bags, labels)
    assert not fitted.oof_used_
    with pytest.raises(ValueError, match="features"):
        fitted.predict_proba([np.zeros((3, 5))])


def test_single_instance_bags_and_bayesian_search():
    rng = np.random.default_rng(2)
    bags = [rng.normal(size=(1 + i % 3, 3)) + 2.0 * (i % 2) for i in range(6)]
    labels = np.arange(6) % 2
    def fitted():
        return create_model("cluster_emd", search="bayes", bayes_random=3, bayes_guided=2,
                            oof_folds=0, vae_epochs=5, random_state=1).fit(bags, labels)

    proba = fitted().predict_proba(bags)
    assert proba.shape == (6, 2) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(fitted().predict_proba(bags), proba)  # the search is seeded

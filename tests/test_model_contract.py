"""The bag-model contract, checked over every registered model (a new model is covered by
registering it). Checks that need a capability are skipped by the model's declared
its tags (instance scores, images) or ``hasattr`` (a feature width), never by model name."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from bag_fixtures import WITNESS_SHIFT, make_tiny_bags, make_tiny_image_bags
from recipe_model import register_recipe_model
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score

from milbench.models import create_model, list_models, model_class, model_tags
from milbench.models.base import has_capability
from milbench.models.registry import Tag
from milbench.models.zoo_pooling import ZOO_POOLINGS

# Small settings for models that would otherwise be slow on the test fixture; every other
# model runs with its defaults. Keys are parameter names, applied only where a model has them.
FAST_TRAINING = {"max_epochs": 25, "patience": 25}  # the neural networks
FAST_PARAMS = {**FAST_TRAINING, "vae_epochs": 20}


# The model of docs/adding-a-model.md, registered as its step 3 says: the suite runs the recipe.
register_recipe_model()
# Every registered model with its defaults, plus ensembles over instance-reading members (the
# registry's defaults are clinical members only).
CASES: dict[str, tuple[str, dict]] = {name: (name, {}) for name in list_models()}
CASES["voting_over_instances"] = ("voting", {"members": [
    "meanpool_svm", {"name": "dmil", "params": FAST_TRAINING}, "clinical_logreg"]})
CASES["stacker_over_instances"] = ("stacker", {"members": ["meanpool_svm", "misvm"],
                                               "inner_splits": 2})
# 9 training patients: a 2-patient validation split would stop at an epoch chosen by chance.
# (instance_cnn's XGBoost head is tested on a larger image fixture in test_instance_cnn.py: 3
# reactive patients are too few for trees.)
CASES["image_mil"] = ("image_mil", {"validation_fraction": 0})
# Kernel values are bag averages or cosines (at most 1): the 12-bag fixture needs a harder margin than C=1.
CASES["migraph"] = ("migraph", {"C": 10})
CASES["mi_kernel"] = ("mi_kernel", {"C": 10})
# The model zoo, as D-MIL aggregations (12 bags: no validation split, as above).
for _aggregation in ZOO_POOLINGS:
    CASES[f"dmil_{_aggregation}"] = ("dmil", {"aggregation": _aggregation,
                                              "validation_fraction": 0})
CASES["instance_cnn"] = ("instance_cnn", {"validation_fraction": 0})
# D-MIL with the mean-pool skip and weight averaging (both off in the registered defaults).
CASES["dmil_skip_swa"] = ("dmil", {"mean_skip": True, "swa_epochs": 10, "validation_fraction": 0})


# The end-to-end image models train a CNN on pixels, 8–16 s a check here: the quick loop
# (``pytest -m "not e2e"``) leaves their cases to the full run.
END_TO_END_CASES = {"image_mil", "instance_cnn"}
CASE_PARAMS = [pytest.param(case, marks=pytest.mark.e2e) if case in END_TO_END_CASES else case
               for case in CASES]


def _make(case: str, **extra):
    name, case_params = CASES[case]
    model = create_model(name, **case_params)
    resources = {"source_features": str(SOURCE_FEATURES)}
    params = {k: v for k, v in {**FAST_PARAMS, **resources, **extra}.items() if k in model.get_params()}
    return model.set_params(**params)


def _write_source_features(path):
    """An instance-labelled source set in the fixture's feature space (models bootstrapped from
    one, e.g. the semi-supervised model, take it as ``source_features``)."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(40, 4))
    features[:, 0] = np.clip(features[:, 0], -1.5, 1.5)
    labels = np.arange(40) % 2
    features[labels == 1, 0] = WITNESS_SHIFT + rng.normal(0.0, 0.3, size=20)
    np.savez(path, X=features, y=labels)
    return path


SOURCE_FEATURES = _write_source_features(
    Path(tempfile.mkdtemp(prefix="milbench-contract-")) / "source_features.npz")


# The fixture of each kind of bag a model reads (``Tag.IMAGES`` or not): instance vectors, or
# the tiny preset's images as 32 px pixels-store rows.
FIXTURES = {"vectors": make_tiny_bags, "pixels": make_tiny_image_bags}
_fixtures: dict[str, tuple] = {}


def data_for(case: str) -> tuple:
    kind = "pixels" if Tag.IMAGES in model_tags(CASES[case][0]) else "vectors"
    if kind not in _fixtures:
        _fixtures[kind] = FIXTURES[kind]()
    return _fixtures[kind]


@pytest.fixture
def tiny(request):
    """The bags of the test's model (``name`` or ``fitted`` parameter)."""
    params = request.node.callspec.params
    return data_for(params["name"] if "name" in params else params["fitted"])


def _random_bag(bags, size: int, seed: int) -> np.ndarray:
    """A random bag shaped and typed like ``bags``' rows."""
    rng = np.random.default_rng(seed)
    if bags[0].dtype == np.uint8:
        return rng.integers(0, 256, size=(size, bags[0].shape[1]), dtype=np.uint8)
    return rng.normal(size=(size, bags[0].shape[1]))


@pytest.fixture(scope="module", params=CASE_PARAMS)
def fitted(request):
    bags, labels, clinical, _ = data_for(request.param)
    model = _make(request.param, random_state=0)
    returned = model.fit(bags, labels, clinical)
    return request.param, model, returned


def _proba(model, bags, clinical):
    proba = model.predict_proba(bags, clinical)
    assert proba.shape == (len(bags), 2)
    return proba[:, 1]


def test_registry_lists_models():
    names = list_models()
    assert {"misvm", "mi_svm", "meanpool_svm", "dmil"} <= set(names)


def test_fit_returns_self_and_learns_fixture(fitted, tiny):
    name, model, returned = fitted
    bags, labels, clinical, _ = tiny
    assert returned is model
    assert list(model.classes_) == [0, 1]
    proba = model.predict_proba(bags, clinical)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert np.all((proba >= 0) & (proba <= 1))
    predictions = model.predict(bags, clinical)
    assert set(np.unique(predictions)) <= {0, 1}
    # The fixture is easy (instances and clinical table both separate the classes).
    assert balanced_accuracy_score(labels, predictions) >= 0.75, name


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_clone_and_params_round_trip(name):
    model = _make(name, random_state=3)
    params = model.get_params()
    cloned = clone(model)
    assert cloned.get_params() == params
    assert model.set_params(**params) is model
    assert model.get_params() == params
    assert cloned.get_params()["random_state"] == 3


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_not_fitted_error(name, tiny):
    bags, _, clinical, _ = tiny
    model = _make(name)
    with pytest.raises(NotFittedError):
        model.predict_proba(bags, clinical)
    with pytest.raises(NotFittedError):
        model.predict(bags, clinical)
    if has_capability(model, Tag.INSTANCE_SCORES):
        with pytest.raises(NotFittedError):
            model.instance_scores(bags)


def test_a_saved_model_reloads_and_predicts_bit_for_bit(fitted, tiny, tmp_path):
    from milbench.saved import load_saved_model, save_model

    name, model, _ = fitted
    bags, _, clinical, _ = tiny
    save_model(model, tmp_path, name, {"spec": {"name": CASES[name][0]}}, {})
    restored = load_saved_model(tmp_path, name)
    np.testing.assert_array_equal(_proba(restored, bags, clinical), _proba(model, bags, clinical))
    if has_capability(model, Tag.INSTANCE_SCORES):
        for again, scores in zip(restored.instance_scores(bags, clinical),
                                 model.instance_scores(bags, clinical), strict=True):
            np.testing.assert_array_equal(again, scores)


def test_pickle_round_trip(fitted, tiny):
    _, model, _ = fitted
    bags, _, clinical, _ = tiny
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_allclose(
        _proba(restored, bags, clinical), _proba(model, bags, clinical), rtol=0, atol=1e-12
    )
    if has_capability(model, Tag.INSTANCE_SCORES):
        for a, b in zip(restored.instance_scores(bags), model.instance_scores(bags), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_instance_order_invariance(fitted, tiny):
    _, model, _ = fitted
    bags, _, clinical, _ = tiny
    rng = np.random.default_rng(1)
    orders = [rng.permutation(len(bag)) for bag in bags]
    shuffled = [bag[order] for bag, order in zip(bags, orders, strict=True)]
    np.testing.assert_allclose(
        _proba(model, shuffled, clinical), _proba(model, bags, clinical), atol=1e-5
    )
    if has_capability(model, Tag.INSTANCE_SCORES):
        original = model.instance_scores(bags)
        permuted = model.instance_scores(shuffled)
        for scores, moved, order in zip(original, permuted, orders, strict=True):
            np.testing.assert_allclose(moved, scores[order], atol=1e-5)


def test_padding_invariance(fitted, tiny):
    """A bag scored alone equals the same bag scored in a batch padded to a much larger bag."""
    _, model, _ = fitted
    bags, _, clinical, _ = tiny
    big = _random_bag(bags, 30, 2)
    batch = [big, *bags]
    batch_clinical = clinical.iloc[np.r_[0, np.arange(len(bags))]].reset_index(drop=True)
    in_batch = _proba(model, batch, batch_clinical)[1:]
    alone = np.array(
        [
            _proba(model, [bag], clinical.iloc[[i]].reset_index(drop=True))[0]
            for i, bag in enumerate(bags)
        ]
    )
    np.testing.assert_allclose(in_batch, alone, atol=1e-5)
    if has_capability(model, Tag.INSTANCE_SCORES):
        batched_scores = model.instance_scores(batch)[1:]
        for i, bag in enumerate(bags):
            np.testing.assert_allclose(
                batched_scores[i], model.instance_scores([bag])[0], atol=1e-5
            )


def test_bag_order_invariance(fitted, tiny):
    _, model, _ = fitted
    bags, _, clinical, _ = tiny
    order = np.random.default_rng(3).permutation(len(bags))
    permuted_bags = [bags[i] for i in order]
    permuted_clinical = clinical.iloc[order].reset_index(drop=True)
    np.testing.assert_allclose(
        _proba(model, permuted_bags, permuted_clinical),
        _proba(model, bags, clinical)[order],
        atol=1e-6,
    )
    if has_capability(model, Tag.INSTANCE_SCORES):
        scores, permuted_scores = model.instance_scores(bags), model.instance_scores(permuted_bags)
        for position, index in enumerate(order):
            np.testing.assert_allclose(permuted_scores[position], scores[index], atol=1e-6)


def test_instance_scores_one_per_instance(fitted, tiny):
    _, model, _ = fitted
    bags, _, _, _ = tiny
    if not has_capability(model, Tag.INSTANCE_SCORES):
        pytest.skip("model has no instance notion")
    scores = model.instance_scores(bags)
    assert [len(s) for s in scores] == [len(b) for b in bags]
    assert all(np.all(np.isfinite(s)) for s in scores)


def test_declared_outputs_are_the_methods_the_model_has(fitted):
    import inspect

    name, model, _ = fitted
    for tag, method, parameters in ((Tag.INSTANCE_SCORES, "instance_scores", ["bags", "clinical"]),
                                    (Tag.BAG_FEATURES, "bag_features", ["bags"])):
        if has_capability(model, tag):
            assert list(inspect.signature(getattr(model, method)).parameters) == parameters
        elif Tag.SELECTION not in model_tags(CASES[name][0]):
            # A model offers an output only where it declares it (a selection forwards the
            # chosen model's, which its tags then carry).
            assert not hasattr(model, method), f"{method} without {tag.value} in its tags"


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_the_registry_reads_the_tags_the_class_declares(name):
    """By name, from source (no import), the registry answers what the class declares."""
    model_name = CASES[name][0]
    assert model_tags(model_name) == model_class(model_name).mil_tags


def test_clear_errors(fitted, tiny):
    name, model, _ = fitted
    bags, labels, clinical, _ = tiny
    with pytest.raises(ValueError, match="0 or 1"):
        clone(model).fit(bags, np.where(labels == 1, 2, 0), clinical)
    with pytest.raises(ValueError):
        clone(model).fit(bags, labels[:-1], clinical)
    if hasattr(model, "n_features_in_"):
        with pytest.raises(ValueError, match="features"):
            model.predict_proba([bag[:, :-1] for bag in bags], clinical)
        with pytest.raises(ValueError, match="no instances"):
            clone(model).fit([*bags[:-1], np.empty((0, bags[0].shape[1]))], labels, clinical)


def _snapshot(model) -> str:
    return joblib.hash(model)


def test_predict_does_not_change_the_estimator(fitted, tiny):
    _, model, _ = fitted
    bags, _, clinical, _ = tiny
    before = _snapshot(model)
    model.predict_proba(bags, clinical)
    model.predict(bags, clinical)
    if has_capability(model, Tag.INSTANCE_SCORES):
        model.instance_scores(bags, clinical)
    assert _snapshot(model) == before


def test_same_seed_same_model_and_fitting_changes_no_parameter_nor_input(fitted, tiny):
    """A new model with the fixture model's seed predicts exactly what it predicts; fitted again,
    it predicts the same. Fitting overwrites none of its parameters and changes none of its inputs.
    (One test, so that the quick loop fits each model twice here, not six times.)"""
    name, fixture_model, _ = fitted
    bags, labels, clinical, _ = tiny
    inputs = ([bag.copy() for bag in bags], labels.copy(), clinical.copy())
    model = _make(name, random_state=0)
    params = {k: joblib.hash(v) for k, v in model.get_params().items()}
    first = _proba(model.fit(bags, labels, clinical), bags, clinical)
    np.testing.assert_array_equal(first, _proba(fixture_model, bags, clinical))
    assert {k: joblib.hash(v) for k, v in model.get_params().items()} == params  # nothing overwritten
    second = _proba(model.fit(bags, labels, clinical), bags, clinical)
    np.testing.assert_array_equal(first, second)
    for before, after in zip(inputs[0], bags, strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(inputs[1], labels)
    pd.testing.assert_frame_equal(inputs[2], clinical)


def test_clinical_none_follows_the_tags(fitted, tiny):
    """``clinical`` required: fitting without it fails naming it. Optional: the model fits and
    predicts without it. Not read: the table changes nothing (against the fixture's model, fitted
    with the table and the same seed)."""
    name, fixture_model, _ = fitted
    bags, labels, clinical, _ = tiny
    tags = model_tags(CASES[name][0])
    model = _make(name, random_state=0)
    if Tag.CLINICAL in tags:
        with pytest.raises(ValueError, match="clinical"):
            model.fit(bags, labels, None)
        return
    without = _proba(model.fit(bags, labels, None), bags, None)
    if Tag.CLINICAL_OPTIONAL not in tags:
        np.testing.assert_array_equal(without, _proba(fixture_model, bags, clinical))

"""inner_cv: parameters chosen by an inner CV on the training bags, then refitted on all of them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from bag_fixtures import make_tiny_bags

from milbench.bench.mil import paper_method
from milbench.models import create_model
from milbench.models.base import has_capability, tags_of
from milbench.models.registry import Tag
from milbench.models.spec import ModelSpec

# gamma=1000 on standardised mean bags makes the RBF kernel the identity: the SVM memorises its
# training bags and scores every new bag alike, so its inner balanced accuracy is about 0.5.
GOOD, BAD = {"gamma": "scale"}, {"gamma": 1000.0}


@pytest.fixture(scope="module")
def data():
    bags, labels, clinical, _ = make_tiny_bags(n_bags=40, seed=1)
    return bags, labels, clinical


def _selector(**params):
    defaults = {"model": "meanpool_svm", "grid": {"gamma": [1000.0, "scale"]}, "random_state": 0}
    return create_model("inner_cv", **{**defaults, **params})


def test_picks_the_candidate_that_generalises_and_refits_it(data):
    bags, labels, clinical = data
    selector = _selector().fit(bags, labels, clinical)
    # The good candidate is listed second, so picking the first would fail here.
    assert selector.best_params_ == GOOD
    results = selector.cv_results_.set_index(selector.cv_results_["params"].map(str))
    assert results.loc[str(GOOD), "mean"] > 0.7
    assert results.loc[str(BAD), "mean"] < 0.55
    assert all(len(scores) == 3 for scores in selector.cv_results_["scores"])
    direct = create_model("meanpool_svm", random_state=0, **GOOD).fit(bags, labels, clinical)
    np.testing.assert_array_equal(selector.predict_proba(bags), direct.predict_proba(bags))
    np.testing.assert_array_equal(selector.predict(bags), direct.predict(bags))


def test_fixed_params_apply_to_every_candidate(data):
    bags, labels, clinical = data
    selector = _selector(model={"name": "meanpool_svm", "params": {"C": 0.5}}).fit(
        bags, labels, clinical)
    assert selector.best_estimator_.C == 0.5
    assert {row["gamma"] for row in selector.cv_results_["params"]} == {1000.0, "scale"}


def test_equal_means_keep_the_first_candidate(data):
    bags, labels, clinical = data
    selector = _selector(grid={"C": [2.0, 2]}).fit(bags, labels, clinical)
    assert selector.cv_results_["mean"].nunique() == 1
    assert selector.best_params_ == {"C": 2.0} and isinstance(selector.best_params_["C"], float)


def test_uses_only_the_bags_it_is_given(data):
    """Appending bags that fit never sees cannot change the choice: it is made inside fit."""
    bags, labels, clinical = data
    first = _selector().fit(bags[:30], labels[:30])
    other = make_tiny_bags(n_bags=40, seed=9)[0]
    again = _selector().fit(bags[:30], labels[:30])
    np.testing.assert_array_equal(first.predict_proba(other), again.predict_proba(other))
    assert [row["mean"] for row in first.cv_results_.to_dict("records")] == [
        row["mean"] for row in again.cv_results_.to_dict("records")]


def test_exposes_the_chosen_models_capabilities_only(data):
    bags, labels, clinical = data
    unfitted = _selector(model="misvm", grid={"C": [1.0, 10.0]})
    assert tags_of(unfitted) == {Tag.SELECTION, Tag.CLINICAL_OPTIONAL}  # nothing chosen yet
    fitted = unfitted.fit(bags, labels)
    assert has_capability(fitted, Tag.INSTANCE_SCORES) and has_capability(fitted, Tag.BAG_FEATURES)
    pd.testing.assert_frame_equal(fitted.bag_features(bags),
                                  fitted.best_estimator_.bag_features(bags))
    scores = fitted.instance_scores(bags)
    assert [len(s) for s in scores] == [len(b) for b in bags]
    np.testing.assert_array_equal(np.concatenate(scores),
                                  np.concatenate(fitted.best_estimator_.instance_scores(bags)))
    meanpool = _selector().fit(bags, labels)  # meanpool_svm has no instance scores
    assert not has_capability(meanpool, Tag.INSTANCE_SCORES)
    with pytest.raises(AttributeError, match="chosen 'meanpool_svm' has no instance_scores"):
        meanpool.instance_scores(bags)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"grid": {"no_such_parameter": [1]}}, "no_such_parameter"),
        ({"metric": "accuracy_typo"}, "metric must be one of"),
        ({"inner_splits": 1}, "inner_splits"),
        ({"model": "no_such_model"}, "unknown model"),
        ({"model": {"name": "meanpool_svm", "params": {"Cc": 1.0}}}, "unknown parameter 'Cc'"),
    ],
)
def test_bad_settings_fail_before_training(data, params, message):
    bags, labels, _ = data
    with pytest.raises((ValueError, KeyError), match=message):
        _selector(**params).fit(bags, labels)


def test_benchmark_names_the_wrapped_models_paper():
    spec = ModelSpec(name="inner_cv", params={
        "model": {"name": "dmil", "params": {"max_epochs": 50, "validation_fraction": 0}},
        "grid": {"norm": ["layer", "none"]}})
    assert paper_method(spec) == "Attention MIL (Ilse 2018)"


def test_optuna_search_draws_trials_from_the_space_and_refits_the_best(data):
    bags, labels, clinical = data
    space = {"gamma": {"low": 1e-3, "high": 1e3, "log": True}, "C": [0.5, 1.0]}
    selector = _selector(grid=None, search="optuna", space=space, n_trials=6).fit(
        bags, labels, clinical)
    results = selector.cv_results_
    assert len(results) == 6 and all(len(scores) == 3 for scores in results["scores"])
    assert all(1e-3 <= row["gamma"] <= 1e3 and row["C"] in (0.5, 1.0) for row in results["params"])
    best = int(np.argmax(results["mean"].to_numpy()))
    assert selector.best_params_ == results["params"][best]
    assert results["mean"].max() > 0.7 > results["mean"].min()  # the search tells them apart
    direct = create_model("meanpool_svm", random_state=0, **selector.best_params_).fit(
        bags, labels, clinical)
    np.testing.assert_array_equal(selector.predict_proba(bags), direct.predict_proba(bags))
    again = _selector(grid=None, search="optuna", space=space, n_trials=6).fit(bags, labels, clinical)
    assert again.cv_results_["params"].tolist() == results["params"].tolist()  # seeded


@pytest.mark.parametrize(("params", "message"), [
    ({"search": "optuna", "space": {"gamma": [1.0, "scale"]}}, "grid must be empty"),
    ({"grid": None, "search": "optuna", "space": {"gama": [1.0]}}, r"space\.gama: .*no parameter"),
    ({"grid": None, "search": "optuna", "space": {"C": {"low": 2, "high": 1}}}, r"space\.C: low"),
    ({"grid": None, "search": "optuna", "space": {"C": {"low": 0, "high": 1, "log": True}}},
     "log range needs low > 0"),
    ({"grid": None, "search": "random"}, "search must be one of"),
    ({"space": {"C": [1.0]}}, "space is read by search 'optuna' only"),
])
def test_a_bad_search_fails_before_training_naming_the_key(data, params, message):
    bags, labels, clinical = data
    with pytest.raises(ValueError, match=message):
        _selector(**params).fit(bags, labels, clinical)


def test_a_misspelled_space_parameter_fails_when_the_config_loads():
    with pytest.raises(ValueError, match=r"model 'inner_cv': space\.gama"):
        ModelSpec(name="inner_cv", params={"model": "meanpool_svm", "search": "optuna",
                                           "space": {"gama": {"low": 0.1, "high": 1.0}}})

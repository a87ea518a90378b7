"""The clinical-only baselines learn the clinical signal and follow the estimator contract."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from milbench.models import create_model, list_models


def clinical_data(n=80, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3 != 0
    table = np.column_stack([
        rng.normal(60, 8, n) + 12 * y,
        np.exp(rng.normal(1.3, 0.4, n) + 1.5 * y),
        rng.integers(0, 2, n).astype(float),
    ])
    return [np.zeros((3, 0))] * n, y.astype(int), table


@pytest.mark.parametrize("name", list_models("clinical_*"))
def test_learns_and_generalises(name):
    bags, y, table = clinical_data(seed=0)
    model = create_model(name, random_state=0).fit(bags, y, table)
    test_bags, test_y, test_table = clinical_data(seed=1)
    accuracy = (model.predict(test_bags, test_table) == test_y).mean()
    assert accuracy > 0.85
    proba = model.predict_proba(test_bags, test_table)
    assert proba.shape == (80, 2) and np.allclose(proba.sum(axis=1), 1)
    restored = pickle.loads(pickle.dumps(model))
    assert np.array_equal(restored.predict_proba(test_bags, test_table), proba)
    assert clone(model).get_params() == model.get_params()


@pytest.mark.parametrize("name", list_models("clinical_*"))
def test_errors(name):
    bags, y, table = clinical_data()
    with pytest.raises(NotFittedError):
        create_model(name).predict_proba(bags, table)
    with pytest.raises(ValueError, match="needs the clinical table"):
        create_model(name).fit(bags, y, None)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        create_model(name).fit(bags, y * 2, table)
    with pytest.raises(ValueError, match=r"shape \(80, 3\)"):
        create_model(name).fit(bags, y, table[:, :2])


def test_unknown_model_lists_registered_ones():
    with pytest.raises(KeyError, match="registered models: .*clinical_logreg"):
        create_model("nope")


def test_a_plugin_model_registers_is_created_listed_and_unregistered():
    from milbench.models import Tag, model_tags, register_model, unregister_model
    from milbench.models.clinical import ClinicalLogistic

    class Plugin(ClinicalLogistic):
        mil_tags = frozenset({Tag.CLINICAL})

    class Misdeclared(ClinicalLogistic):
        mil_tags = frozenset({"clinical"})

    register_model("plugin_logreg")(Plugin)
    try:
        assert isinstance(create_model("plugin_logreg", C=0.5), Plugin)
        assert "plugin_logreg" in list_models("plugin_*", tag="clinical")
        assert model_tags("plugin_logreg") == {Tag.CLINICAL}
        with pytest.raises(ValueError, match="already registered"):
            register_model("plugin_logreg")(ClinicalLogistic)
        with pytest.raises(ValueError, match="not Tag members"):
            register_model("other")(Misdeclared)
    finally:
        unregister_model("plugin_logreg")
    assert "plugin_logreg" not in list_models()
    with pytest.raises(ValueError, match="built-in"):
        unregister_model("clinical_logreg")
    with pytest.raises(KeyError, match="unknown model"):
        unregister_model("plugin_logreg")

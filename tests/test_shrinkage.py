"""Shrinkage towards the clinical model: it stays on the clinical model when the image model
adds nothing out of fold, and moves to the image model when that one carries the signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from bag_fixtures import make_tiny_bags

from milbench.models import create_model
from milbench.models.base import CLINICAL_COLUMNS


def _noise_bags(bags, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=bag.shape) for bag in bags]


def test_uninformative_images_leave_the_clinical_model_alone():
    bags, labels, clinical, _ = make_tiny_bags(n_bags=24)
    noise = _noise_bags(bags)
    model = create_model("shrinkage", random_state=0).fit(noise, labels, clinical)
    assert model.weight_ == 0.0
    assert model.weight_scores_[0.0] == max(model.weight_scores_.values())
    alone = create_model("clinical_logreg", random_state=0).fit(noise, labels, clinical)
    np.testing.assert_array_equal(model.predict_proba(noise, clinical),
                                  alone.predict_proba(noise, clinical))


def test_informative_images_take_the_weight():
    bags, labels, _, _ = make_tiny_bags(n_bags=24)
    rng = np.random.default_rng(2)
    useless = pd.DataFrame(rng.normal(size=(24, 3)) ** 2 + 1, columns=list(CLINICAL_COLUMNS))
    useless["male"] = rng.integers(0, 2, 24).astype(float)
    model = create_model("shrinkage", members=["clinical_logreg", "misvm"],
                         random_state=0).fit(bags, labels, useless)
    assert model.weight_ >= 0.5 and model.weight_scores_[model.weight_] > model.weight_scores_[0.0]
    assert (model.predict(bags, useless) == labels).mean() >= 0.9


@pytest.mark.parametrize("params, message", [
    ({"members": ["clinical_logreg"]}, "two models"),
    ({"grid": [0.5, 1.5]}, r"weights in \[0, 1\]"),
    ({"inner_repeats": 0}, "inner_repeats"),
])
def test_bad_parameters_are_refused(params, message):
    bags, labels, clinical, _ = make_tiny_bags()
    with pytest.raises(ValueError, match=message):
        create_model("shrinkage", **params).fit(bags, labels, clinical)

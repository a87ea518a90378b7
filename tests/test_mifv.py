"""miFV: the Fisher vector of a bag against hand-computed values on a 2-component mixture, the
encoding's invariances, and the model learning a bag-level distribution difference."""

from __future__ import annotations

import numpy as np
import pytest

from milbench.models import create_model
from milbench.models.mifv import fisher_vector

# A 1-D mixture: two components at -1 and +1, unit variances, equal weights.
WEIGHTS, MEANS, VARIANCES = np.array([0.5, 0.5]), np.array([[-1.0], [1.0]]), np.array([[1.0], [1.0]])


def _normalised(raw):
    powered = np.sign(raw) * np.sqrt(np.abs(raw))
    return powered / np.linalg.norm(powered)


def test_fisher_vector_of_an_instance_halfway_between_the_components():
    # x = 0, posteriors 1/2 each: G_w = 0; G_mu = 1/2 * (0 -/+ 1) / sqrt(1/2) = +/- 1/sqrt(2);
    # G_sigma = 1/2 * ((0 -/+ 1)^2 - 1) / sqrt(2 * 1/2) = 0.
    vector = fisher_vector(np.array([[0.0]]), WEIGHTS, MEANS, VARIANCES, np.array([[0.5, 0.5]]))
    np.testing.assert_allclose(vector, [0, 0, 1 / np.sqrt(2), -1 / np.sqrt(2), 0, 0], atol=1e-12)


def test_fisher_vector_with_unequal_posteriors():
    # x = 1, posteriors 0.2 and 0.8, sqrt(w) = sqrt(1/2), sqrt(2w) = 1:
    #   G_w     = (0.2 - 0.5, 0.8 - 0.5) / sqrt(1/2)
    #   G_mu    = (0.2 * (1 + 1), 0.8 * (1 - 1)) / sqrt(1/2)
    #   G_sigma = (0.2 * (2^2 - 1), 0.8 * (0^2 - 1)) / 1
    raw = np.array([-0.3 / np.sqrt(0.5), 0.3 / np.sqrt(0.5), 0.4 / np.sqrt(0.5), 0.0, 0.6, -0.8])
    vector = fisher_vector(np.array([[1.0]]), WEIGHTS, MEANS, VARIANCES, np.array([[0.2, 0.8]]))
    np.testing.assert_allclose(vector, _normalised(raw), atol=1e-12)
    np.testing.assert_allclose(vector[:3], [-0.38828, 0.38828, 0.44834], atol=1e-5)  # by hand


def test_fisher_vector_averages_over_instances_in_any_order():
    bag = np.array([[0.0], [1.0]])
    posteriors = np.array([[0.5, 0.5], [0.2, 0.8]])
    forward = fisher_vector(bag, WEIGHTS, MEANS, VARIANCES, posteriors)
    np.testing.assert_allclose(fisher_vector(bag[::-1], WEIGHTS, MEANS, VARIANCES, posteriors[::-1]),
                               forward, atol=1e-12)
    doubled = fisher_vector(np.vstack([bag, bag]), WEIGHTS, MEANS, VARIANCES, np.vstack([posteriors] * 2))
    np.testing.assert_allclose(doubled, forward, atol=1e-12)  # a mean over the bag's instances
    assert np.linalg.norm(forward) == pytest.approx(1.0)


def test_mifv_separates_bags_by_their_instance_distribution():
    rng = np.random.default_rng(0)
    # Both classes share the instance range; positive bags hold a second mode at +3.
    bags = [np.vstack([rng.normal(0, 1, size=(8, 3)), rng.normal(3, 0.3, size=(4 * (i % 2), 3))])
            for i in range(40)]
    labels = np.arange(40) % 2
    model = create_model("mifv", n_components=2, random_state=0).fit(bags[:30], labels[:30])
    assert (model.predict(bags[30:]) == labels[30:]).all()
    assert model.encode(bags[:2]).shape == (2, 2 * (1 + 2 * 3))


def test_bad_parameters_are_refused():
    bags = [np.zeros((2, 2)), np.ones((2, 2))]
    for params, message in (({"n_components": 0}, "n_components"), ({"C": -1}, "C must"),
                            ({"reg_covar": 0}, "reg_covar")):
        with pytest.raises(ValueError, match=message):
            create_model("mifv", **params).fit(bags, np.array([0, 1]))

"""miGraph: a clique of near-duplicate instances weighs as one instance, the bag kernel is a
normalised weighted instance kernel, and the SVM on it separates the tiny set."""

from __future__ import annotations

import numpy as np
import pytest
from bag_fixtures import make_tiny_bags

from milbench.models import create_model
from milbench.models.migraph import instance_weights


def test_a_clique_of_near_duplicates_counts_as_one_instance():
    bag = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [5.0, 5.0]])
    np.testing.assert_allclose(instance_weights(bag, delta=1.0), [1 / 3, 1 / 3, 1 / 3, 1.0])
    np.testing.assert_allclose(instance_weights(bag[:1], delta=1.0), [1.0])


def test_bag_kernel_is_a_normalised_weighted_instance_kernel():
    bags, labels, _, _ = make_tiny_bags()
    model = create_model("migraph", C=10).fit(bags, labels)
    gram = model._kernel(model.train_bags_, model.train_bags_)
    np.testing.assert_allclose(gram, gram.T, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(gram) > -1e-9)  # a valid (PSD) kernel
    assert np.all((gram > 0) & (gram <= 1 + 1e-12))
    # A bag of identical instances has kernel 1 with itself.
    same = [np.repeat(model.train_bags_[0][:1], 3, axis=0)]
    np.testing.assert_allclose(model._kernel(same, same), [[1.0]])
    assert (model.predict(bags) == labels).all()


def test_bad_parameters_are_refused():
    bags, labels, _, _ = make_tiny_bags()
    for params, message in (({"C": 0}, "C must"), ({"gamma": "auto"}, "gamma"),
                            ({"delta": -1}, "delta")):
        with pytest.raises(ValueError, match=message):
            create_model("migraph", **params).fit(bags, labels)


def test_mi_kernel_is_the_normalised_set_kernel():
    bags, labels, _, _ = make_tiny_bags()
    model = create_model("mi_kernel", C=10).fit(bags, labels)
    gram = model._kernel(model.train_bags_, model.train_bags_)
    np.testing.assert_allclose(gram, gram.T, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(gram) > -1e-9)  # a valid (PSD) kernel
    np.testing.assert_allclose(np.diag(gram), 1.0)  # every bag, whatever its size
    np.testing.assert_allclose(model._kernel(model.train_bags_), gram)  # stored training side
    # The set kernel sums the instance kernel over all pairs, then normalises in feature space.
    x, y = model.train_bags_[0], model.train_bags_[1]
    pair = lambda a, b: np.exp(-model.gamma_ * ((a[:, None] - b[None]) ** 2).sum(-1)).sum()  # noqa: E731
    assert gram[0, 1] == pytest.approx(pair(x, y) / np.sqrt(pair(x, x) * pair(y, y)))
    # A bag with its instances repeated is the same set to the normalised kernel.
    assert model._kernel([np.vstack([x, x])], [x])[0, 0] == pytest.approx(1.0)
    assert (model.predict(bags) == labels).all()

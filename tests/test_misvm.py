"""MI-SVM / mi-SVM / mean-pooled SVM: witness recovery, convergence, calibration, positive rate."""

from __future__ import annotations

import numpy as np
import pytest
from bag_fixtures import make_tiny_bags

from milbench.models import create_model
from milbench.models.misvm import MISVM, MeanPoolSVM, MiSVM, _fit_score_calibration


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_bags(n_bags=16, seed=4)


# A hard-margin RBF (large C) can fit the mean starting points exactly and keep arbitrary
# witnesses (MI-SVM's local optima), so the RBF case uses a soft margin.
@pytest.mark.parametrize(("kernel", "C"), [("linear", 10.0), ("rbf", 1.0)])
def test_misvm_converges_to_known_witnesses(tiny, kernel, C):
    bags, labels, _, witness_rows = tiny
    model = MISVM(kernel=kernel, C=C, random_state=0).fit(bags, labels)
    assert model.converged_
    assert 2 <= model.n_iter_ <= 5  # mean start, one witness pass, one confirming pass or so
    scores = model.instance_scores(bags)
    for bag_scores, label, row in zip(scores, labels, witness_rows, strict=True):
        if label == 1:
            assert int(np.argmax(bag_scores)) == row
    assert len(model.witness_rows_) == labels.sum()
    np.testing.assert_array_equal(model.predict(bags), labels)


def test_mi_svm_labels_witness_positive_and_others_negative(tiny):
    bags, labels, _, witness_rows = tiny
    model = MiSVM(kernel="linear", C=10.0, calibration_folds=None).fit(bags, labels)
    assert model.converged_
    rates = model.bag_features(bags)["positive_rate"].to_numpy()
    scores = model.instance_scores(bags)
    # Every witness is labelled positive, no instance of a negative bag is, and positive bags
    # stay mostly negative (mi-SVM may keep a neighbour of the witness: a local optimum).
    for bag_scores, label, row, rate in zip(scores, labels, witness_rows, rates, strict=True):
        if label == 1:
            assert bag_scores[row] > 0 and 1 / len(bag_scores) <= rate <= 0.5
        else:
            assert rate == 0.0
    np.testing.assert_array_equal(model.predict(bags), labels)


def test_max_iters_caps_the_alternation(tiny):
    bags, labels, _, _ = tiny
    model = MISVM(kernel="linear", max_iters=1).fit(bags, labels)
    assert model.n_iter_ == 1 and not model.converged_


def test_calibrated_threshold_rescues_a_shifted_decision():
    """All decision values below zero (a too-weak C) must not collapse predictions to one class:
    the calibrated threshold sits between the training bags' scores."""
    bags, labels, _, _ = make_tiny_bags(n_bags=16, seed=5)
    model = MISVM(kernel="rbf", C=1e-4, gamma=0.05).fit(bags, labels)
    scores = model.decision_function(bags)
    assert np.all(scores < 0)  # the SVM's own sign would call every bag negative
    assert set(model.predict(bags)) == {0, 1}
    assert (model.predict(bags) == labels).mean() >= 0.9


def test_bag_score_is_max_instance_score(tiny):
    bags, labels, _, _ = tiny
    model = create_model("mi_svm", kernel="rbf", random_state=0).fit(bags, labels)
    np.testing.assert_allclose(
        model.decision_function(bags), [s.max() for s in model.instance_scores(bags)]
    )
    proba = model.predict_proba(bags)[:, 1]
    # Calibration is monotone in the bag score.
    order = np.argsort(model.decision_function(bags))
    assert np.all(np.diff(proba[order]) >= -1e-12)


def test_pca_and_scaling_are_fitted_on_training_instances(tiny):
    bags, labels, _, _ = tiny
    model = MISVM(kernel="linear", pca_components=100).fit(bags, labels)
    # PCA is capped at the feature width; the scaler saw exactly the training instances.
    assert model.transform_.pca_.n_components_ == bags[0].shape[1]
    assert model.transform_.scaler_.n_samples_seen_ == sum(len(b) for b in bags)
    unscaled = MISVM(kernel="linear", scale=False).fit(bags, labels)
    assert unscaled.transform_ is None


def test_invalid_parameters_raise(tiny):
    bags, labels, _, _ = tiny
    with pytest.raises(ValueError, match="kernel"):
        MISVM(kernel="poly").fit(bags, labels)
    with pytest.raises(ValueError, match="C must be positive"):
        MiSVM(C=0).fit(bags, labels)
    with pytest.raises(ValueError, match="pooling"):
        MeanPoolSVM(pooling="median").fit(bags, labels)
    with pytest.raises(ValueError, match="single class"):
        MISVM().fit(bags, np.ones(len(bags), int))


def test_meanpool_svm_mean_std_pooling(tiny):
    bags, labels, _, _ = tiny
    model = MeanPoolSVM(pooling="mean_std").fit(bags, labels)
    assert model.scaler_.n_features_in_ == 2 * bags[0].shape[1]
    assert (model.predict(bags) == labels).mean() >= 0.8


def test_calibration_uses_out_of_fold_bag_scores(tiny):
    bags, labels, _, _ = tiny
    model = MISVM(kernel="linear", calibration_folds=3, random_state=0).fit(bags, labels)
    held_out = model._held_out_scores(bags, labels)
    training = model.decision_function(bags)
    assert not np.allclose(held_out, training)
    refit = _fit_score_calibration(held_out, labels)
    np.testing.assert_allclose(
        model.calibration_.predict_proba(training.reshape(-1, 1)),
        refit.predict_proba(training.reshape(-1, 1)),
    )
    with pytest.raises(ValueError, match="calibration_folds"):
        MISVM(calibration_folds=1).fit(bags, labels)


def test_calibration_never_reverses_the_bag_score(tiny, monkeypatch):
    bags, labels, _, _ = tiny
    reference = MISVM(kernel="linear", calibration_folds=None).fit(bags, labels)
    # Held-out scores that rank the bags backwards must not flip the model's ranking.
    monkeypatch.setattr(
        MISVM, "_held_out_scores", lambda self, b, y: -reference.decision_function(b)
    )
    model = MISVM(kernel="linear", calibration_folds=3).fit(bags, labels)
    assert model.calibration_[-1].coef_[0, 0] > 0
    np.testing.assert_allclose(model.predict_proba(bags), reference.predict_proba(bags))


def test_calibration_source_is_recorded(tiny):
    bags, labels, _, _ = tiny
    assert MISVM(kernel="linear", calibration_folds=None).fit(bags, labels).calibrated_on_ == "training"
    assert MISVM(kernel="linear").fit(bags, labels).calibrated_on_ in {"out_of_fold", "training"}
    assert MISVM(kernel="linear", calibration_folds=3).fit(bags * 3, np.tile(labels, 3)).calibrated_on_ == (
        "out_of_fold")


def test_scale_c_divides_c_by_the_number_of_svm_examples(tiny):
    bags, labels, _, _ = tiny
    model = MISVM(kernel="linear", C=2.0, scale_C=True, calibration_folds=None).fit(bags, labels)
    n_negative = sum(len(bag) for bag, label in zip(bags, labels, strict=True) if label == 0)
    # MI-SVM trains on the negative instances plus one witness per positive bag.
    assert model.svm_.C == pytest.approx(2.0 / (n_negative + int(np.sum(labels))))
    assert MISVM(kernel="linear", C=2.0, calibration_folds=None).fit(bags, labels).svm_.C == 2.0

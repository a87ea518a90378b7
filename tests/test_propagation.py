"""Single-instance learning (SIL): bag labels propagated to the instances find the witnesses,
the bag features summarise the instance scores, the threshold is the reactive scores' quantile;
and the instance-stage base it shares with the one-class SVM: the logistic layer trains on
out-of-fold bag features."""

from __future__ import annotations

import numpy as np
import pytest
from bag_fixtures import make_tiny_bags

from milbench.models import create_model
from milbench.models.oneclass import OneClassMIL
from milbench.models.propagation import BAG_FEATURES, PropagatedInstanceMIL


def test_propagated_labels_rank_the_witness_first():
    bags, labels, _, witnesses = make_tiny_bags(n_bags=20)
    model = create_model("sil", random_state=0, use_clinical=False).fit(bags, labels)
    scores = model.instance_scores(bags)
    assert [len(s) for s in scores] == [len(b) for b in bags]
    # The witness (far out along feature 0, only in positive bags) scores above its bag's median
    # in every positive bag and is the top instance in most (20 noisy bags).
    positive = [(s, w) for s, w in zip(scores, witnesses, strict=True) if w >= 0]
    assert all(s[w] > np.median(s) for s, w in positive)
    assert np.mean([np.argmax(s) == w for s, w in positive]) >= 0.8
    # The instance classifier's weight sits on the witness feature.
    weights = model.stage_.classifier.coef_[0]
    assert np.argmax(np.abs(weights)) == 0 and weights[0] > 0
    assert (model.predict(bags) == labels).mean() >= 0.8


def test_bag_features_are_the_instance_scores_summaries():
    bags, labels, _, _ = make_tiny_bags(n_bags=20)
    model = create_model("sil", quantile=0.75, random_state=0, use_clinical=False).fit(bags, labels)
    features = model.bag_features(bags)
    assert list(features.columns) == list(BAG_FEATURES)
    scores = model.stage_.scores(bags)
    np.testing.assert_allclose(features["mean_score"], [s.mean() for s in scores])
    np.testing.assert_allclose(features["high_score"], [np.quantile(s, 0.75) for s in scores])
    threshold = model.stage_.threshold
    np.testing.assert_allclose(features["positive_fraction"], [np.mean(s > threshold) for s in scores])
    # τ is the quantile of the reactive training instances' own scores.
    reactive = np.concatenate([s for s, label in zip(scores, labels, strict=True) if not label])
    assert np.mean(reactive <= threshold) == pytest.approx(0.75, abs=0.05)


@pytest.mark.parametrize("name, cls", [("sil", PropagatedInstanceMIL),
                                       ("oneclass_svm", OneClassMIL)])
def test_logistic_layer_trains_on_out_of_fold_features(name, cls, monkeypatch):
    """Both instance-stage models: three inner stages on two thirds of the bags each, then the
    final stage on all of them; the logistic layer reads the bag features and the clinical table."""
    bags, labels, clinical, _ = make_tiny_bags(n_bags=18)
    stages = []
    original = cls._fit_stage

    def recording(self, fit_bags, fit_labels, seed):
        stages.append(len(fit_bags))
        return original(self, fit_bags, fit_labels, seed)

    monkeypatch.setattr(cls, "_fit_stage", recording)
    model = create_model(name, oof_folds=3, random_state=0).fit(bags, labels, clinical)
    assert stages == [12, 12, 12, 18]
    assert model.uses_clinical_
    assert model.estimator_[-1].coef_.shape == (1, len(cls.BAG_FEATURES) + 3)


def test_at_most_max_instances_train_each_instance_classifier():
    bags, labels, _, _ = make_tiny_bags(n_bags=20)
    model = create_model("sil", max_instances=10, random_state=0, use_clinical=False)
    model.fit(bags, labels)
    assert sum(len(b) for b in bags) > 10
    assert model.stage_.classifier.n_features_in_ == bags[0].shape[1]
    again = create_model("sil", max_instances=10, random_state=0, use_clinical=False).fit(bags, labels)
    np.testing.assert_array_equal(model.predict_proba(bags), again.predict_proba(bags))


def test_bad_settings_are_refused():
    bags, labels, _, _ = make_tiny_bags()
    for params, message in (({"instance_C": 0}, "instance_C"), ({"quantile": 1.0}, "quantile"),
                            ({"oof_folds": 1}, "oof_folds"), ({"max_instances": 1}, "max_instances"),
                            ({"use_clinical": True}, "clinical")):
        with pytest.raises(ValueError, match=message):
            create_model("sil", **params).fit(bags, labels)

"""The naive instance-level CNN: it learns which images carry the label, pools them as asked,
and its XGBoost head learns from out-of-fold bag scores and the clinical attributes."""

from __future__ import annotations

import numpy as np
import pytest
from test_image_mil import _image_bags

from milbench.models import create_model
from milbench.models.instance_cnn import InstanceCNN


def _model(**params):
    settings = {"backbone": "conv_ae", "latent": 64, "max_epochs": 15, "validation_fraction": 0,
                "batch_size": 8, "learning_rate": 1e-3, "random_state": 0, "device": "cpu"}
    return create_model("instance_cnn", **{**settings, **params})


def test_learns_a_tiny_set_and_scores_the_marked_images_highest():
    bags, labels, _ = _image_bags()
    model = _model().fit(bags, labels)
    assert (model.predict(bags) == labels).all()
    assert all(record["train_images_per_s"] > 0 for record in model.history_)
    scores = model.instance_scores(bags)
    for bag, label, image_scores in zip(bags, labels, scores, strict=True):
        assert image_scores.shape == (len(bag),)
        if label:  # the bright-square images (the first half) score above the others
            marked = max(1, len(bag) // 2)
            assert image_scores[:marked].min() > image_scores[marked:].max()
    # The bag score pools the image probabilities: mean here, max when asked.
    np.testing.assert_allclose(model.predict_proba(bags)[:, 1], [s.mean() for s in scores])
    maxed = _model(pooling="max", max_epochs=2)
    maxed.fit(bags, labels)
    np.testing.assert_allclose(maxed.predict_proba(bags)[:, 1],
                               [s.max() for s in maxed.instance_scores(bags)])


def test_xgboost_head_reads_out_of_fold_scores_and_the_clinical_table(monkeypatch):
    bags, labels, clinical = _image_bags(n_bags=16)
    fitted_on = []
    original = InstanceCNN._fit_network

    def recording(self, fit_bags, fit_labels, seed):
        fitted_on.append(len(fit_bags))
        return original(self, fit_bags, fit_labels, seed)

    monkeypatch.setattr(InstanceCNN, "_fit_network", recording)
    model = _model(head="xgboost", oof_folds=2, max_epochs=3).fit(bags, labels, clinical)
    # The final CNN on every bag, then one per inner fold on the rest: the head's training
    # scores come from CNNs that never saw those bags.
    assert fitted_on == [16, 8, 8]
    proba = model.predict_proba(bags, clinical)[:, 1]
    changed = clinical.assign(lymph_count=clinical["lymph_count"].to_numpy()[::-1])
    assert not np.allclose(model.predict_proba(bags, changed)[:, 1], proba)
    blind = _model(head="xgboost", oof_folds=2, max_epochs=3, use_clinical=False).fit(
        bags, labels, clinical)
    np.testing.assert_array_equal(blind.predict_proba(bags, clinical),
                                  blind.predict_proba(bags, changed))


def test_bad_settings_are_refused_before_training():
    bags, labels, clinical = _image_bags()
    with pytest.raises(ValueError, match="head xgboost"):
        _model(use_clinical=True).fit(bags, labels, clinical)
    with pytest.raises(ValueError, match="pooling"):
        _model(pooling="attention").fit(bags, labels)
    with pytest.raises(ValueError, match="pixels store"):
        _model().fit([bag.astype(float) for bag in bags], labels)
    with pytest.raises(ValueError, match="images_per_bag"):
        _model(images_per_bag=0).fit(bags, labels)

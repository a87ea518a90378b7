"""The one-class SVM bag model: reactive instances define normal, witnesses stand out, the
threshold is the reactive margins' quantile (its out-of-fold logistic layer is tested with
SIL's, in test_propagation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from bag_fixtures import make_tiny_bags
from test_image_mil import _image_bags

from milbench.models import create_model
from milbench.models.oneclass import BAG_FEATURES


def test_witness_instances_lie_outside_the_reactive_population():
    bags, labels, clinical, witnesses = make_tiny_bags(n_bags=20)
    model = create_model("oneclass_svm", random_state=0, use_clinical=False).fit(bags, labels)
    # One-class margins flag whatever is unusual, in any direction: the witness is the bag's
    # most outlying instance in most positive bags, and above the bag's median in all.
    tops = []
    for scores, witness in zip(model.instance_scores(bags), witnesses, strict=True):
        if witness >= 0:
            assert scores[witness] > np.median(scores)
            tops.append(np.argmax(scores) == witness)
    assert np.mean(tops) >= 0.7
    features = model.bag_features(bags)
    assert list(features.columns) == list(BAG_FEATURES)
    assert features.loc[labels == 1, "outlier_fraction"].min() > 0
    # τ is the quantile of the reactive training instances' own margins.
    reactive = [bag for bag, label in zip(bags, labels, strict=True) if not label]
    margins = np.concatenate(model.stage_.margins(reactive))
    assert np.mean(margins < model.stage_.threshold) == pytest.approx(model.quantile, abs=0.05)
    assert (model.predict(bags) == labels).mean() >= 0.8


def test_reads_pixels_store_rows_too():
    bags, labels, _ = _image_bags(n_bags=16)
    model = create_model("oneclass_svm", pca_components=8, random_state=0).fit(bags, labels)
    # The bright-square images of tumoral bags are the outliers.
    for bag, label, scores in zip(bags, labels, model.instance_scores(bags), strict=True):
        if label:
            marked = max(1, len(bag) // 2)
            assert scores[:marked].mean() > scores[marked:].mean()


def test_bad_settings_are_refused():
    bags, labels, _, _ = make_tiny_bags()
    for params, message in (({"nu": 0}, "nu"), ({"quantile": 1.0}, "quantile"),
                            ({"oof_folds": 1}, "oof_folds"), ({"use_clinical": True}, "clinical")):
        with pytest.raises(ValueError, match=message):
            create_model("oneclass_svm", **params).fit(bags, labels)

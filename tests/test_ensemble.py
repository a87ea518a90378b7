"""The stacker learns only from out-of-fold member outputs; the voting ensemble's rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.validation import check_is_fitted

from milbench.models import create_model, registry
from milbench.models.base import BagClassifier


class Memorizer(BagClassifier):
    """Returns the training label for a bag it was trained on and 0.5 for any other bag: in-sample
    outputs are perfect, out-of-sample ones carry no information."""

    def __init__(self, random_state=None):
        self.random_state = random_state

    def fit(self, bags, y, clinical=None):
        self.memory_ = {np.asarray(b).tobytes(): int(label) for b, label in zip(bags, y, strict=True)}
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, bags, clinical=None):
        check_is_fitted(self)
        p = np.array([self.memory_.get(np.asarray(b).tobytes(), 0.5) for b in bags], dtype=float)
        return np.column_stack([1 - p, p])


class ConstantVote(BagClassifier):
    def __init__(self, value: float = 1.0, random_state=None):
        self.value = value
        self.random_state = random_state

    def fit(self, bags, y, clinical=None):
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, bags, clinical=None):
        check_is_fitted(self)
        return np.tile([1 - self.value, self.value], (len(bags), 1))


@pytest.fixture
def test_models():
    """The test models, registered as a plug-in registers its own, and removed afterwards."""
    models = {"memorizer": Memorizer, "constant": ConstantVote, "seeded": SeededVote}
    for name, cls in models.items():
        registry.register_model(name)(cls)
    yield
    for name in models:
        registry.unregister_model(name)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 != 0).astype(int)
    bags = [rng.normal(size=(3, 2)) + y[i] for i in range(n)]
    clinical = pd.DataFrame({"age": rng.normal(60, 8, n) + 10 * y,
                             "lymph_count": np.exp(rng.normal(1.3, 0.4, n) + 1.2 * y),
                             "male": rng.integers(0, 2, n).astype(float)})
    return bags, y, clinical


def test_stacker_meta_features_are_out_of_fold(test_models):
    bags, y, clinical = data()
    stacker = create_model("stacker", members=["memorizer", "clinical_logreg"], random_state=0)
    stacker.fit(bags, y, clinical)
    # In-sample the memorizer would hand the meta-classifier the labels; out of fold it cannot.
    assert (stacker.oof_design_["memorizer:proba"] == 0.5).all()
    assert list(stacker.feature_names_) == [
        "memorizer:proba", "clinical_logreg:proba",
        "clinical:age", "clinical:log_lymph_count", "clinical:male"]
    # The refitted members do see all training bags, for prediction on new ones.
    assert set(stacker.meta_features(bags, clinical)["memorizer:proba"]) == {0.0, 1.0}


def test_stacker_inputs_choose_each_members_outputs():
    # The seed's MI-SVM stacker: the positive-instance rate and the clinical attributes only.
    bags, y, clinical = data()
    members = [{"name": "misvm", "params": {"kernel": "linear"}}, "clinical_logreg"]
    stacker = create_model("stacker", members=members, inputs={"misvm": ["positive_rate"]},
                           random_state=0).fit(bags, y, clinical)
    assert stacker.feature_names_ == [
        "misvm:positive_rate", "clinical_logreg:proba",
        "clinical:age", "clinical:log_lymph_count", "clinical:male"]
    rates = stacker.oof_design_["misvm:positive_rate"]
    assert rates.between(0, 1).all() and rates.nunique() > 2
    assert list(stacker.meta_features(bags, clinical).columns) == stacker.feature_names_
    everything = create_model("stacker", members=members, random_state=0).fit(bags, y, clinical)
    assert everything.feature_names_[:2] == ["misvm:proba", "misvm:positive_rate"]
    with pytest.raises(ValueError, match=r"inputs for 'misvm': \['count_1'\] asked; the member "
                                         r"gives \['proba', 'positive_rate'\]"):
        create_model("stacker", members=members, inputs={"misvm": ["count_1"]}).fit(
            bags, y, clinical)
    with pytest.raises(ValueError, match=r"inputs name \['svm'\], which are not members"):
        create_model("stacker", members=members, inputs={"svm": ["proba"]}).fit(bags, y, clinical)


@pytest.mark.parametrize("meta", ["xgboost", "lightgbm", "logistic", "auto"])
def test_stacker_learns_and_is_deterministic(meta):
    bags, y, clinical = data(60, seed=1)
    test_bags, test_y, test_clinical = data(60, seed=2)
    params = dict(members=["clinical_logreg"], meta=meta, random_state=3)
    first = create_model("stacker", **params).fit(bags, y, clinical)
    second = create_model("stacker", **params).fit(bags, y, clinical)
    proba = first.predict_proba(test_bags, test_clinical)
    assert np.array_equal(proba, second.predict_proba(test_bags, test_clinical))
    assert (first.predict(test_bags, test_clinical) == test_y).mean() > 0.8
    with pytest.raises(ValueError, match="meta must be one of"):
        create_model("stacker", meta="svm").fit(bags, y, clinical)


def test_stacker_auto_meta_keeps_clinical_only_when_members_add_nothing(test_models):
    bags, y, clinical = data(60, seed=1)
    # A member that knows nothing out of fold: the clinical-only logistic regression is chosen
    # (it ties or beats the others, and ties go to the simplest) and reads only clinical columns.
    stacker = create_model("stacker", members=["memorizer"], meta="auto", random_state=0)
    stacker.fit(bags, y, clinical)
    assert set(stacker.meta_scores_) == {"clinical_logistic", "logistic", "xgboost"}
    best = max(stacker.meta_scores_.values())
    assert stacker.meta_scores_[stacker.meta_choice_] == best
    assert stacker.meta_choice_ == "clinical_logistic"
    assert stacker.meta_columns_ == ["clinical:age", "clinical:log_lymph_count", "clinical:male"]
    with pytest.raises(ValueError, match="use_clinical"):
        create_model("stacker", members=["memorizer"], meta="auto", use_clinical=False).fit(
            bags, y, clinical)


def test_stacker_auto_meta_uses_an_informative_member():
    bags, y, clinical = data(60, seed=1)
    # Clinical columns of pure noise; the bag model sees the label in the instances.
    noise = np.random.default_rng(5)
    clinical = pd.DataFrame({"age": noise.normal(60, 8, 60),
                             "lymph_count": np.exp(noise.normal(1.3, 0.4, 60)),
                             "male": noise.integers(0, 2, 60).astype(float)})
    stacker = create_model("stacker", members=["meanpool_svm"], meta="auto", random_state=0)
    stacker.fit(bags, y, clinical)
    assert stacker.meta_choice_ in ("logistic", "xgboost")
    assert stacker.meta_scores_[stacker.meta_choice_] > stacker.meta_scores_["clinical_logistic"] + 0.2


def test_voting_soft_hard_and_tie_rule(test_models):
    bags, y, clinical = data(6)
    members = [{"name": "constant", "params": {"value": v}, "label": f"c{i}"}
               for i, v in enumerate([0.9, 0.2, 0.3])]
    soft = create_model("voting", members=members, voting="soft").fit(bags, y, clinical)
    assert np.allclose(soft.predict_proba(bags, clinical)[:, 1], (0.9 + 0.2 + 0.3) / 3)
    assert (soft.predict(bags, clinical) == 0).all()
    hard = create_model("voting", members=members, voting="hard").fit(bags, y, clinical)
    assert np.allclose(hard.predict_proba(bags, clinical)[:, 1], 1 / 3)
    weighted = create_model("voting", members=members, voting="hard", weights=[2, 1, 0]).fit(bags, y)
    assert (weighted.predict(bags) == 1).all()  # 2/3 of the weight votes tumoral
    # Tie: two members, one vote each; the soft average (0.9 + 0.3) / 2 = 0.6 decides -> 1.
    tie = create_model("voting", members=[members[0], members[2]], voting="hard").fit(bags, y)
    assert np.allclose(tie.predict_proba(bags)[:, 1], 0.5) and (tie.predict(bags) == 1).all()
    # Tie with soft average 0.45 -> 0; exactly 0.5 -> 1.
    low = [members[2], {"name": "constant", "params": {"value": 0.6}, "label": "x"}]
    assert (create_model("voting", members=low, voting="hard").fit(bags, y).predict(bags) == 0).all()
    even = [members[2], {"name": "constant", "params": {"value": 0.7}, "label": "x"}]
    assert (create_model("voting", members=even, voting="hard").fit(bags, y).predict(bags) == 1).all()

class SeededVote(ConstantVote):
    """Votes its seed's share: tumoral probability (seed mod 10) / 10."""

    def predict_proba(self, bags, clinical=None):
        check_is_fitted(self)
        value = (self.random_state % 10) / 10
        return np.tile([1 - value, value], (len(bags), 1))


def test_voting_over_seeds_averages_each_members_copies(test_models):
    bags, y, _ = data(6)
    members = ["seeded", {"name": "constant", "params": {"value": 0.9}, "label": "c"}]
    model = create_model("voting", members=members, seeds=3, random_state=4).fit(bags, y)
    # Member-major copies, seeded 4, 5, 6: the seeded member's mean is 0.5, the constant's 0.9.
    assert [copy.random_state for copy in model.members_] == [4, 5, 6, 4, 5, 6]
    assert np.allclose(model.predict_proba(bags)[:, 1], (0.5 + 0.9) / 2)
    hard = create_model("voting", members=members, voting="hard", seeds=3, weights=[1, 0],
                        random_state=4).fit(bags, y)
    assert np.allclose(hard.predict_proba(bags)[:, 1], 2 / 3)  # copies 5, 6 (0.5, 0.6) vote 1
    # One seed: as before, the ensemble's seed for every member.
    single = create_model("voting", members=members, random_state=4).fit(bags, y)
    assert [copy.random_state for copy in single.members_] == [4, 4]
    with pytest.raises(ValueError, match="seeds must be a positive integer, got 0"):
        create_model("voting", members=members, seeds=0).fit(bags, y)


def test_ensemble_member_errors(test_models):
    bags, y, clinical = data(6)
    with pytest.raises(ValueError, match="members: model names/labels must be unique"):
        create_model("voting", members=["constant", "constant"]).fit(bags, y)
    with pytest.raises(ValueError, match="unknown keys"):
        create_model("voting", members=[{"name": "constant", "weight": 2}]).fit(bags, y)
    with pytest.raises(ValueError, match="weights must be 1 non-negative"):
        create_model("voting", members=["constant"], weights=[1, 2]).fit(bags, y)

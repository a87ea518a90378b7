"""Features per model (on the `small` preset: the stacker needs two bags of each class per inner
fold): each model (and ensemble member) reads the extractor it names, each
distinct extractor is computed once, and a bad name fails when the config is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench import preparation
from milbench.config import ConfigError, load_config
from milbench.models.spec import features_key
from milbench.pipeline import run_pipeline
from milbench.preparation import prepare_data

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Two cheap extractors of different widths: a 1-epoch 32 px autoencoder and a random ResNet-18.
AUTOENCODER = ("{kind: autoencoder, name: conv_ae, input_size: 32, latent: 64, epochs: 1, "
               "train_batch_size: 32, segmentation: null}")
RESNET = "{kind: backbone, name: resnet18, weights: null, input_size: 32, segmentation: null}"
MODELS = (
    "[{name: clinical_logreg},"
    f" {{name: meanpool_svm, label: svm_resnet, features: {RESNET}}},"
    " {name: meanpool_svm, label: svm_ae},"
    " {name: voting, label: vote, params: {members:"
    f"   [{{name: meanpool_svm, label: a}}, {{name: meanpool_svm, label: r, features: {RESNET}}}]}}}},"
    " {name: stacker, label: stack, params: {inner_splits: 2, meta: logistic, members:"
    f"   [{{name: meanpool_svm, label: ae}}, {{name: meanpool_svm, label: res, features: {RESNET}}}]}}}}]"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One work directory for the module: the cohort and the stores are made once."""
    return tmp_path_factory.mktemp("features") / "work"


def two_extractor_config(workdir, *extra):
    return load_config(CONFIGS / "pipeline.yaml", [
        f"models={MODELS}", f"features.extractor={AUTOENCODER}", "data.synthetic.preset=small",
        "evaluation.n_splits=2", "evaluation.n_repeats=1", f"workdir={workdir}",
        "submission.enabled=false", *extra])


def test_each_model_reads_its_own_store_and_each_extractor_runs_once(workdir, monkeypatch):
    config = two_extractor_config(workdir)
    calls = []
    real = preparation.feature_store

    def counting(cohort, extractor, *args, **kwargs):
        calls.append(extractor["name"])
        return real(cohort, extractor, *args, **kwargs)

    monkeypatch.setattr(preparation, "feature_store", counting)
    outcome = run_pipeline(config, progress=False)
    assert sorted(calls) == ["conv_ae", "resnet18"]  # two extractors, each computed once

    metrics = pd.read_csv(outcome.run_dir / "metrics.csv").set_index("model")
    assert metrics.loc["svm_resnet", "features"] == "resnet18"
    assert metrics.loc["svm_ae", "features"] == "conv_ae"
    assert metrics.loc["clinical_logreg", "features"] == "none"
    stores = json.loads((outcome.run_dir / "feature_stores.json").read_text())
    readers = {store["extractor"]: set(store["models"]) for store in stores.values()}
    # The vote's and the stacker's members span both stores.
    assert readers == {"conv_ae": {"svm_ae", "a", "ae"}, "resnet18": {"svm_resnet", "r", "res"}}
    assert "read by svm_ae, a, ae" in (outcome.run_dir / "report.md").read_text()

    # A member reads exactly what the same model reads on its own: the vote over one
    # resnet member and one autoencoder member is the mean of the two standalone models.
    oof = {name: pd.read_csv(outcome.run_dir / "models" / name / "oof.csv")
           for name in ("vote", "svm_resnet", "svm_ae")}
    np.testing.assert_allclose(oof["vote"]["score"],
                               (oof["svm_resnet"]["score"] + oof["svm_ae"]["score"]) / 2)


def test_ensemble_members_fit_on_their_own_views(workdir):
    config = two_extractor_config(workdir)
    data = prepare_data(config, progress=False)
    widths = {view.name: view.train_bags[0].shape[1] for view in data.views.values()}
    assert widths["conv_ae"] == 64 and widths["resnet18"] == 512 and widths["none"] == 0
    stack = next(spec for spec in config.models if spec.display_name == "stack")
    train_bags, test_bags = data.bags_for(stack)
    model = stack.build().fit(train_bags, data.labels, data.train_clinical)
    assert [member.n_features_in_ for member in model.members_] == [64, 512]
    assert model.predict_proba(test_bags, data.test_clinical).shape == (len(data.test), 2)
    assert data.views[features_key(config.models[1].features)].name == "resnet18"


def test_a_misspelled_model_features_name_fails_on_load_naming_model_and_key(tmp_path):
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"models\.1\.features \(model 'svm'\): extractor "
                                          r"'resnet81': no such file, and not one of \[.*resnet18"):
        load_config(CONFIGS / "pipeline.yaml", [
            "models=[clinical_logreg, {name: meanpool_svm, label: svm, features: resnet81}]",
            f"workdir={tmp_path / 'work'}"])
    with pytest.raises(ConfigError, match=r"models\.0\.params\.members\.1\.features \(model 'x'\)"):
        load_config(CONFIGS / "pipeline.yaml", [
            "models=[{name: voting, params: {members: [clinical_logreg,"
            " {name: meanpool_svm, label: x, features: nope}]}}]"])
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "work").exists()

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
from milbench.models.spec import ModelSpec, features_key
from milbench.pipeline import run_pipeline
from milbench.preparation import prepare_data

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

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


@pytest.mark.parametrize("name", ["seed_system", "seed_system_cpu"])
def test_the_seed_system_configs_put_each_family_on_its_own_features(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    by_label = {spec.display_name: spec for spec in config.models}
    assert {"clinical_logreg", "misvm", "misvm_xgb", "dmil", "semisup", "cluster_emd",
            "stacker_all", "vote_best5"} == set(by_label)
    run_key = features_key(config.features.extractor)
    keys = {label: spec.features_key or run_key for label, spec in by_label.items()}
    assert keys["misvm"] == keys["cluster_emd"] != keys["dmil"] == run_key
    assert keys["semisup"] not in (keys["misvm"], keys["dmil"])
    members = [spec.features_key or run_key for spec in
               (ModelSpec.coerce(m) for m in by_label["stacker_all"].params["members"])]
    assert members == [keys["misvm"], keys["dmil"], keys["semisup"], keys["cluster_emd"]]


def test_paths_features_give_bags_of_image_paths_and_full_mode_gets_the_source(tmp_path):
    config = load_config(CONFIGS / "pipeline.yaml", [
        "models=[{name: semisup, features: {kind: paths}, params: {mode: full, input_size: 32}}]",
        "features.extractor=none", "data.synthetic.preset=tiny", f"workdir={tmp_path / 'work'}",
        "source={root: null, seed: 0, n_per_class: 6}"])
    requested = config.model_dump()
    data = prepare_data(config, progress=False)
    assert config.model_dump() == requested  # preparation leaves the config as it was
    (model,) = data.config.models
    train_bags, test_bags = data.bags_for(model)
    assert [list(bag) for bag in train_bags] == [[str(p) for p in patient.image_paths]
                                                 for patient in data.train.patients]
    assert len(test_bags) == len(data.test)
    assert "source_root" not in config.models[0].params
    assert Path(model.params["source_root"], "ALL_IDB2", "img").is_dir()
    assert data.features_of(model) == "paths"

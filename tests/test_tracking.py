"""MLflow tracking: a tiny run and an ablation grid read back from the file store, the clear error
when MLflow is missing (raised before any training), and MLflow never imported when disabled."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from challenge_layout import default_rows, write_challenge
from typer.testing import CliRunner

import milbench.ablation as ablation
import milbench.pipeline as pipeline
from milbench import tracking
from milbench.cli import app
from milbench.config import ConfigError, load_config

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
INSTALL = 'pip install "milbench[mlflow]"'


def tiny_config(tmp_path, *extra):
    return load_config(CONFIGS / "pipeline.yaml", [
        "models=[{name: clinical_logreg}, {name: clinical_xgb, label: xgb20, params: {n_estimators: 20}}]",
        "features.extractor=none", "data.synthetic.preset=tiny", "evaluation.n_splits=2",
        "evaluation.n_repeats=2", f"workdir={tmp_path / 'work'}", f"submission.dir={tmp_path / 'subs'}",
        "tracking.mlflow=true", *extra])


def children_of(client, parent):
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {run.info.run_name: run for run in runs}


def artifacts(client, run_id, path=None):
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.fixture
def no_mlflow(monkeypatch):
    """``import mlflow`` fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_run_logs_parent_and_one_child_per_model(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    outcome = pipeline.run_pipeline(tiny_config(tmp_path), progress=False)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the file-store opt-in is scoped
    record = json.loads((outcome.run_dir / "mlflow.json").read_text())
    store = tmp_path / "work" / "mlruns"
    assert record["tracking_uri"] == store.resolve().as_uri() and store.is_dir()
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv").set_index("model")

    with tracking.client(record["tracking_uri"]) as client:
        experiment = client.get_experiment_by_name("pipeline")  # the config's name
        parents = client.search_runs([experiment.experiment_id])
        parent = next(r for r in parents if "mlflow.parentRunId" not in r.data.tags)
        assert parent.info.run_id == record["run_id"] and parent.info.status == "FINISHED"
        assert parent.info.run_name == outcome.run_dir.name
        params = parent.data.params
        assert params["seed"] == "0" and params["evaluation.n_splits"] == "2"
        assert params["features.extractor"] == "none" and params["data.synthetic.preset"] == "tiny"
        assert json.loads(params["models"]) == ["clinical_logreg", "xgb20"]
        environment = json.loads((outcome.run_dir / "environment.json").read_text())
        assert params["git.commit"] == str(environment["git"]["commit"])
        assert parent.data.tags["milbench.version"] == environment["milbench_version"]
        assert parent.data.tags["milbench.run_dir"] == str(outcome.run_dir.resolve())
        assert {"report.md", "metrics.csv", "metrics.json", "timings.csv", "config.yaml",
                "plots"} <= artifacts(client, parent.info.run_id)
        assert "plots/roc.png" in artifacts(client, parent.info.run_id, "plots")

        children = children_of(client, parent)
        assert set(children) == {"clinical_logreg", "xgb20"}
        for name, child in children.items():
            assert child.info.status == "FINISHED"
            logged = child.data.metrics
            for column in ("balanced_accuracy_mean", "seconds_per_fit", "hidden_test_roc_auc"):
                assert logged[column] == pytest.approx(metrics.loc[name, column])
            assert {"balanced_accuracy_std", "roc_auc_max", "f1_mean"} <= set(logged)
            assert "note" not in logged  # a text column, empty here
            assert {"oof.csv", "summary.csv", "test_predictions.csv"} <= artifacts(client, child.info.run_id)
        assert children["xgb20"].data.params["name"] == "clinical_xgb"
        assert children["xgb20"].data.params["params.n_estimators"] == "20"

    # A second run: a new parent run in the same experiment and store.
    again = pipeline.run_pipeline(tiny_config(tmp_path), progress=False)
    with tracking.client(record["tracking_uri"]) as client:
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 6
        assert json.loads((again.run_dir / "mlflow.json").read_text())["experiment_id"] == \
            experiment.experiment_id


def test_ablation_logs_one_child_per_variant(tmp_path):
    pytest.importorskip("mlflow")
    challenge = write_challenge(tmp_path / "challenge", default_rows(n_train=20, n_test=2))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "tiny-grid", "base": str(CONFIGS / "clinical.yaml"), "repeats": 2, "execution": {"jobs": 1},
        "variants": {"logreg": ["models=[{name: clinical_logreg}]"],
                     "xgb": ["models=[{name: clinical_xgb, params: {n_estimators: 10}}]"]}}))
    store = tmp_path / "store"
    run_dir, table = ablation.run_ablation(grid, [f"data.root={challenge}", f"workdir={tmp_path / 'work'}",
                                                  "tracking.mlflow=true", f"tracking.tracking_uri={store}"],
                                           progress=False)
    record = json.loads((run_dir / "mlflow.json").read_text())
    assert record["tracking_uri"] == store.resolve().as_uri() and record["experiment"] == "tiny-grid"
    with tracking.client(record["tracking_uri"]) as client:
        parent = client.get_run(record["run_id"])
        assert parent.data.params["repeats"] == "2" and parent.data.params["protocol.kind"] == "cv"
        assert {"ablation.md", "ablation.csv", "config.yaml"} <= artifacts(client, parent.info.run_id)
        children = children_of(client, parent)
        assert set(children) == {"logreg", "xgb"}
        assert children["xgb"].data.params["models.0.params.n_estimators"] == "10"
        assert json.loads(children["xgb"].data.params["overrides"]) == [
            "models=[{name: clinical_xgb, params: {n_estimators: 10}}]"]
        for name, child in children.items():
            assert child.data.metrics["balanced_accuracy_mean"] == pytest.approx(
                float(table.loc[name, "balanced_accuracy:mean"]))


def test_enabled_without_mlflow_fails_before_any_training(tmp_path, monkeypatch, no_mlflow):
    def no_training(*args, **kwargs):
        raise AssertionError("the run started before the tracking check")

    monkeypatch.setattr(pipeline, "prepare_data", no_training)
    with pytest.raises(tracking.TrackingError, match=r"tracking.mlflow is true but MLflow cannot be "
                       r"imported .*pip install \"milbench\[mlflow\]\""):
        pipeline.run_pipeline(tiny_config(tmp_path), progress=False)
    assert not (tmp_path / "work").exists()

    result = CliRunner().invoke(app, ["run", str(CONFIGS / "clinical.yaml"), "--no-progress", "--set",
                                      f"workdir={tmp_path / 'work'}", "--set", "tracking.mlflow=true"])
    assert result.exit_code == 2 and INSTALL in result.output and "Traceback" not in result.output

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": str(CONFIGS / "clinical.yaml"), "repeats": 1,
                                    "variants": {"a": ["models=[{name: clinical_logreg}]"]}}))
    with pytest.raises(tracking.TrackingError, match="milbench\\[mlflow\\]"):
        ablation.run_ablation(grid, [f"workdir={tmp_path / 'work'}", "tracking.mlflow=true"], progress=False)
    assert not (tmp_path / "work").exists()


def test_disabled_tracking_never_imports_mlflow(tmp_path, no_mlflow):
    challenge = write_challenge(tmp_path / "challenge", default_rows(n_train=12, n_test=2))
    config = load_config(CONFIGS / "clinical.yaml", [
        f"data.root={challenge}", f"workdir={tmp_path / 'work'}", "submission.enabled=false",
        "models=[{name: clinical_logreg}]", "evaluation.n_splits=2", "evaluation.n_repeats=1"])
    assert config.tracking.mlflow is False
    outcome = pipeline.run_pipeline(config, progress=False)
    assert not (outcome.run_dir / "mlflow.json").exists()
    assert not (tmp_path / "work" / "mlruns").exists()


def test_unusable_tracking_uri_fails_before_the_run(tmp_path):
    pytest.importorskip("mlflow")
    config = tiny_config(tmp_path, "tracking.tracking_uri=nosuchscheme://x")
    with pytest.raises(tracking.TrackingError, match="tracking.tracking_uri 'nosuchscheme://x'"):
        pipeline.run_pipeline(config, progress=False)
    assert not (tmp_path / "work" / "runs").exists()


def test_tracking_section_is_validated(tmp_path):
    config = load_config(CONFIGS / "clinical.yaml")
    assert (config.tracking.mlflow, config.tracking.tracking_uri, config.tracking.experiment) == (
        False, None, None)
    with pytest.raises(ConfigError, match="tracking.tracking_uri: Value error, must be null or a non-empty"):
        load_config(CONFIGS / "clinical.yaml", ["tracking.tracking_uri=''"])
    with pytest.raises(ConfigError, match="tracking.uri: Extra inputs are not permitted"):
        load_config(CONFIGS / "clinical.yaml", ["tracking.uri=x"])
    with pytest.raises(ConfigError, match="tracking.mlflow: Input should be a valid boolean"):
        load_config(CONFIGS / "clinical.yaml", ["tracking.mlflow=maybe"])
    config = load_config(CONFIGS / "clinical.yaml", [f"workdir={tmp_path}", "tracking.tracking_uri=runs/ml"])
    assert tracking.tracking_uri(config.tracking, config.workdir) == (Path.cwd() / "runs" / "ml").as_uri()
    assert tracking.tracking_uri(config.tracking.model_copy(update={"tracking_uri": None}),
                                 config.workdir) == (tmp_path / "mlruns").as_uri()
    assert tracking.tracking_uri(config.tracking.model_copy(update={"tracking_uri": "http://h:5000"}),
                                 config.workdir) == "http://h:5000"


def test_flatten_nested_sections_and_model_lists():
    assert tracking.flatten({"seed": 0, "data": {"root": None, "strict": False}, "stratify": ["age"],
                             "models": [{"name": "a", "params": {}}], "odd key!": "x" * 7000}) == {
        "seed": "0", "data.root": "null", "data.strict": "false", "stratify": '["age"]',
        "models.0.name": "a", "models.0.params": "{}", "odd key_": "x" * 6000}

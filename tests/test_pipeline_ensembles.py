"""Ensembles inside a run: members chosen as the best k by CV, and fits shared with the members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench.config import ConfigError, load_config
from milbench.evaluation.cv import cross_validate
from milbench.evaluation.splits import load_folds
from milbench.models import create_model
from milbench.models.reuse import fit_model, reusing_fits
from milbench.pipeline import run_pipeline
from milbench.preparation import prepare_data
from milbench.submit import check_submission

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_config(tmp_path, models: str, *extra: str):
    return load_config(CONFIGS / "pipeline.yaml", [
        f"models={models}", "features.extractor=none", "data.synthetic.preset=tiny",
        "evaluation.n_splits=2", "evaluation.n_repeats=2", f"workdir={tmp_path / 'work'}",
        f"submission.dir={tmp_path / 'subs'}", *extra])


class CountingModel:
    """Counts calls to fit, to see which fits were shared."""

    fits = 0

    def __init__(self, random_state=None):
        self.random_state = random_state

    def get_params(self, deep=False):
        return {"random_state": self.random_state}

    def fit(self, bags, y, clinical=None):
        CountingModel.fits += 1
        return self


def test_fits_are_shared_only_inside_the_block_and_only_when_identical():
    bags = [np.ones((2, 3)), np.zeros((1, 3))]
    y = np.array([1, 0])
    CountingModel.fits = 0
    first = fit_model(CountingModel(0), bags, y)
    fit_model(CountingModel(0), bags, y)
    assert CountingModel.fits == 2  # outside the block every fit runs
    with reusing_fits() as reuse:
        first = fit_model(CountingModel(0), bags, y)
        assert fit_model(CountingModel(0), list(bags), y) is first
        assert fit_model(CountingModel(1), bags, y) is not first  # other seed
        assert fit_model(CountingModel(0), bags, np.array([0, 1])) is not first  # other labels
        assert fit_model(CountingModel(0), [bags[0], np.zeros((1, 3)) + 1], y) is not first  # data
        assert reuse.hits == 1
    assert CountingModel.fits == 2 + 4


def test_voting_over_the_best_member_by_cv_reuses_its_fits(tmp_path):
    config = tiny_config(tmp_path, "[{name: clinical_xgb}, {name: clinical_logreg}, "
                                   "{name: voting, label: vote_best1, params: {members: {best: 1}}}]")
    outcome = run_pipeline(config, progress=False)
    ranking = pd.read_csv(outcome.run_dir / "models" / "vote_best1" / "member_ranking.csv")
    table = outcome.table.set_index("model")
    best = table["balanced_accuracy_mean"].drop("vote_best1").idxmax()
    assert ranking.loc[ranking["chosen"], "model"].tolist() == [best]
    assert table.loc["vote_best1", "note"] == f"members chosen by this CV: {best}"
    assert "scores optimistically" in (outcome.run_dir / "report.md").read_text()
    # One valid leaderboard CSV per member and for the ensemble.
    test_ids = pd.read_csv(outcome.run_dir / "models" / "vote_best1" / "test_predictions.csv",
                           dtype={"patient_id": str})["patient_id"].tolist()
    assert set(outcome.submissions) == {"clinical_xgb", "clinical_logreg", "vote_best1"}
    for path in outcome.submissions.values():
        assert check_submission(path, test_ids) == []
    # A one-member soft vote is its member: identical out-of-fold scores and test predictions.
    vote, member = (pd.read_csv(outcome.run_dir / "models" / m / "oof.csv") for m in ("vote_best1", best))
    np.testing.assert_allclose(vote["score"], member["score"])
    vote, member = (pd.read_csv(outcome.run_dir / "models" / m / "test_predictions.csv")
                    for m in ("vote_best1", best))
    np.testing.assert_allclose(vote["score"], member["score"])

    # Shared fits give exactly what refitting gives.
    data = prepare_data(config, progress=False)
    folds = load_folds(outcome.run_dir / "splits" / "folds.csv")
    refit = cross_validate(create_model("voting", members=[{"name": best}]), data.train_bags,
                           data.labels, data.train.ids, folds, data.train_clinical,
                           seed=config.seed, progress=False)
    shared = pd.read_csv(outcome.run_dir / "models" / "vote_best1" / "oof.csv")
    pd.testing.assert_frame_equal(refit.oof, shared)

    timings = pd.read_csv(outcome.run_dir / "timings.csv")
    assert {"data", "CV clinical_xgb", "CV vote_best1", "refit and predict vote_best1",
            "report"} <= set(timings["stage"])
    assert (timings["seconds"] >= 0).all()


@pytest.mark.parametrize(("models", "message"), [
    ("[{name: clinical_logreg, params: {members: {best: 1}}}]",
     "model 'clinical_logreg': unknown parameter 'members'"),
    ("[{name: voting, params: {members: {best: 2}}}, {name: clinical_logreg}]",
     "chosen among the models listed before it"),
    ("[{name: clinical_logreg}, {name: voting, params: {members: {best: 0}}}]",
     "best must be a positive integer"),
    ("[{name: clinical_logreg}, {name: voting, params: {members: {top: 2}}}]", "unknown keys"),
    ("[{name: clinical_logreg}, {name: stacker, params: {members: {by: speed}}}]", "by must be one of"),
])
def test_bad_member_selections_fail_before_training(tmp_path, models, message):
    with pytest.raises(ConfigError, match=message):
        run_pipeline(tiny_config(tmp_path, models), progress=False)
    assert not (tmp_path / "work" / "runs").exists()


def test_bench_pipeline_times_every_stage_and_writes_its_table(tmp_path, monkeypatch):
    import json

    from milbench.bench.pipeline import bench_pipeline_command

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    (out / "work" / "cache").mkdir(parents=True)
    (out / "work" / "cache" / "stale").write_text("x")
    table = bench_pipeline_command(
        CONFIGS / "pipeline.yaml", preset="tiny", out=out, progress=False,
        overrides=["models=[{name: clinical_logreg}, {name: voting, params: {members: {best: 1}}}]",
                   "features.extractor=none", "evaluation.n_splits=2", "evaluation.n_repeats=1",
                   f"workdir={tmp_path / 'work'}"])
    assert list(table["stage"][:2]) == ["generate cohort (synthetic only)", "data"]
    assert {"CV clinical_logreg", "CV voting", "refit and predict voting", "report"} <= set(table["stage"])
    assert not (out / "work" / "cache" / "stale").exists()  # cold cache
    assert not (tmp_path / "submissions").exists()
    record = json.loads((out / "pipeline_bench.json").read_text())
    assert record["preset"] == "tiny" and record["feature_cache"] == "cold"
    assert record["pipeline_seconds"] == pytest.approx(table["seconds"][1:].sum())
    assert record["goal_met"] is True and set(record["cv_balanced_accuracy"]) == {"clinical_logreg", "voting"}
    assert (tmp_path / "work" / "data" / "synthetic-tiny-seed0").is_dir()  # the cohort stays reusable
    assert (out / "pipeline_bench.png").stat().st_size > 1000
    assert pd.read_csv(out / "pipeline_bench.csv")["share"].sum() == pytest.approx(1.0)


def test_run_writes_paired_comparisons_and_hidden_test_intervals(tmp_path):
    config = tiny_config(
        tmp_path, "[{name: clinical_logreg}, {name: clinical_xgb, params: {n_estimators: 10}}, "
        "{name: voting, label: vote, params: {members: [clinical_logreg, clinical_xgb]}}]",
        "submission.enabled=false")
    outcome = run_pipeline(config, progress=False)
    comparisons = pd.read_csv(outcome.run_dir / "comparisons.csv")
    assert list(comparisons["model"]) == ["clinical_xgb", "vote", "vote"]
    assert list(comparisons["comparison"]) == ["vs clinical baseline", "vs clinical baseline",
                                               "vs best member"]
    assert set(comparisons.loc[comparisons["comparison"] == "vs clinical baseline", "reference"]) == {
        "clinical_logreg"}
    # The difference is the mean per-fold difference of the two models' out-of-fold tables.
    oof = {name: pd.read_csv(outcome.run_dir / "models" / name / "oof.csv")
           for name in ("clinical_logreg", "clinical_xgb")}
    from milbench.evaluation.compare import fold_metric

    expected = (fold_metric(oof["clinical_xgb"]) - fold_metric(oof["clinical_logreg"])).mean()
    assert comparisons.loc[0, "mean_difference"] == pytest.approx(expected)
    assert comparisons.loc[0, "n"] == 4  # 2 folds x 2 repeats
    assert (comparisons["ci_low"] <= comparisons["mean_difference"]).all()
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv")
    assert (metrics["hidden_test_ci_low"] <= metrics["hidden_test_balanced_accuracy"]).all()
    assert (metrics["hidden_test_balanced_accuracy"] <= metrics["hidden_test_ci_high"]).all()
    report = (outcome.run_dir / "report.md").read_text()
    assert "## Paired comparisons" in report and "vs best member" in report


def test_unknown_baseline_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="clinical_lgoreg"):
        tiny_config(tmp_path, "[{name: clinical_logreg}]", "evaluation.baseline=clinical_lgoreg")


def test_an_ensemble_over_instance_models_needs_features_before_any_data_is_read(tmp_path):
    config = tiny_config(tmp_path, "[{name: clinical_logreg}, "
                         "{name: voting, label: vote, params: {members: [clinical_logreg, meanpool_svm]}}]")
    with pytest.raises(ConfigError,
                       match=r"model 'vote' \(its member 'meanpool_svm'\) reads instance features"):
        prepare_data(config, progress=False)
    assert not (tmp_path / "work").exists()  # the synthetic cohort was not even generated
    # Members chosen among the run's models are checked where they are listed themselves.
    fine = tiny_config(tmp_path, "[{name: clinical_logreg}, "
                       "{name: voting, params: {members: {best: 1}}}]", "submission.enabled=false")
    assert prepare_data(fine, progress=False).features == {}

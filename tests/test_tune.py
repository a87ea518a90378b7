"""milbench tune: an Optuna study over a model's parameters in the run's CV, kept in SQLite, so an
interrupted study resumes to the requested number of trials; its outputs; its config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from milbench.config import ConfigError, load_config
from milbench.evaluation.splits import load_folds
from milbench.tune import TuneInterrupted, run_tune, score_trial

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SPACE = "tune.clinical_logreg={C: {low: 0.001, high: 10.0, log: true}, class_weight: [balanced, null]}"


def config(tmp_path, *extra):
    return load_config(CONFIGS / "clinical.yaml", [
        "models=[{name: clinical_logreg}]", "data.synthetic.preset=small", "evaluation.n_splits=3",
        "evaluation.n_repeats=2", f"workdir={tmp_path / 'work'}", SPACE, *extra])


@pytest.mark.e2e
def test_an_interrupted_study_resumes_and_reaches_the_requested_trials(tmp_path):
    def stop_after_two(completed: int) -> None:
        if completed == 2:
            raise KeyboardInterrupt

    with pytest.raises(TuneInterrupted) as stopped:
        run_tune(config(tmp_path), "clinical_logreg", trials=5, progress=False,
                 on_trial=stop_after_two)
    run_dir = stopped.value.run_dir
    assert (run_dir / "study.db").is_file() and not (run_dir / "trials.csv").exists()

    outcome = run_tune(config(tmp_path), "clinical_logreg", trials=5, resume=run_dir,
                       progress=False)
    assert outcome.run_dir == run_dir
    trials = pd.read_csv(run_dir / "trials.csv")
    complete = trials[trials["state"] == "COMPLETE"]
    assert len(complete) == 5  # two before the stop, three after
    assert complete["value"].between(0, 1).all()
    assert complete["param_C"].between(0.001, 10.0).all()
    assert outcome.best_value == pytest.approx(complete["value"].max())

    snippet = yaml.safe_load((run_dir / "best_params.yaml").read_text())
    tuned = snippet["models"][0]
    assert tuned["name"] == "clinical_logreg" and tuned["params"] == outcome.best_params
    # The snippet is a valid model list: it loads as the run config's models.
    load_config(CONFIGS / "clinical.yaml", [f"models={json.dumps(snippet['models'])}"])
    report = (run_dir / "tune.md").read_text()
    assert "selection-optimistic" in report and "hidden test patients" in report
    assert (run_dir / "plots" / "optimisation_history.png").stat().st_size > 0


@pytest.mark.e2e
def test_a_trial_value_is_the_mean_balanced_accuracy_of_the_run_cv(tmp_path):
    outcome = run_tune(config(tmp_path), "clinical_logreg", trials=2, progress=False)
    trials = pd.read_csv(outcome.run_dir / "trials.csv")
    first = trials.iloc[0]
    resolved = config(tmp_path)
    entry = resolved.models[0].model_copy(update={"params": {
        "C": float(first["param_C"]),
        "class_weight": None if pd.isna(first["param_class_weight"]) else first["param_class_weight"]}})
    folds = load_folds(outcome.run_dir / "splits" / "folds.csv")
    assert len(folds) == 6
    again = score_trial(resolved.model_dump_json(), entry.model_dump_json(), folds)
    assert again["value"] == pytest.approx(first["value"], abs=1e-12)


def test_tune_errors_name_the_model_or_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"--model 'nope' is not a model"):
        run_tune(config(tmp_path), "nope", trials=1, progress=False)
    bare = load_config(CONFIGS / "clinical.yaml", ["models=[{name: clinical_logreg}]",
                                                   f"workdir={tmp_path / 'work'}"])
    with pytest.raises(ConfigError, match=r"no search space for 'clinical_logreg'"):
        run_tune(bare, "clinical_logreg", trials=1, progress=False)
    with pytest.raises(ConfigError, match=r"tune\.clinical_logreg\.CC: .*no parameter 'CC'"):
        config(tmp_path, "tune.clinical_logreg.CC={low: 0.1, high: 1.0}")
    with pytest.raises(ConfigError, match=r"tune\.xgb: no model has the label"):
        config(tmp_path, "tune.xgb={n_estimators: {low: 10, high: 50}}")

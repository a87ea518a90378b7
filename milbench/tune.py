"""``milbench tune``: an Optuna study over one model's parameters, each trial scored by the run's
repeated stratified CV (the folds ``milbench run`` would use), mean balanced accuracy.

The study lives in ``study.db`` (SQLite) in the tuning run directory, so an interrupted study
resumes (``--resume DIR``) and goes on until ``--trials`` trials have completed in all; trials
left running by the interruption are marked failed and drawn again. With a parallel execution
backend (``--backend ray``, ``--jobs N``) N trials run at once, each as one task.

The search space is the config's ``tune.<label>`` section (ranges, see ``milbench.core.search``).
The directory gets ``trials.csv``, ``best_params.yaml`` (a config snippet), an optimisation-history
plot and ``tune.md``. The best trial's figure is selection-optimistic: it was picked among all
trials on the same folds. An honest figure needs fresh data (the hidden test patients of a
synthetic cohort, which the report scores the tuned model on) or nesting (``inner_cv`` with
``search: optuna`` inside a run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from milbench.config import ConfigError, RunConfig, resolved_dict
from milbench.core.search import sampler, suggest
from milbench.data_roots import hidden_test_labels
from milbench.evaluation.compare import bootstrap_interval
from milbench.evaluation.cv import stop_between_folds
from milbench.evaluation.splits import Fold, kfold_splits, save_folds
from milbench.execution import Executor, require_ray
from milbench.models.base import with_seed
from milbench.models.spec import ModelSpec
from milbench.preparation import prepare_data, stratification, worker_data
from milbench.progress import progress_bar
from milbench.run_cv import model_cv
from milbench.runs import Run

log = logging.getLogger(__name__)
METRIC = "balanced_accuracy"


class TuneInterrupted(Exception):
    """Ctrl-C during a study: its completed trials are kept in ``run_dir``'s study.db."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted; completed trials are kept in {run_dir / 'study.db'}")
        self.run_dir = run_dir


@dataclass
class TuneOutcome:
    run_dir: Path
    trials: pd.DataFrame  # one row per trial: number, state, value, params
    best_params: dict
    best_value: float


def score_trial(config_json: str, entry_json: str, folds: list[Fold]) -> dict:
    """One trial as a task runs it: the model with the trial's parameters in the run's CV."""
    config = RunConfig.model_validate_json(config_json)
    entry = ModelSpec.model_validate_json(entry_json)
    started = time.perf_counter()
    result = model_cv(config, worker_data(config), entry, folds)
    return {"value": float(result.summary.loc[METRIC, "mean"]),
            "per_repeat": [float(v) for v in result.per_repeat[METRIC]],
            "seconds": time.perf_counter() - started}


def _entry(config: RunConfig, label: str) -> tuple[ModelSpec, dict]:
    labels = [e.display_name for e in config.models]
    if label not in labels:
        raise ConfigError(f"--model {label!r} is not a model of the config; its models are {labels}")
    if label not in config.tune:
        raise ConfigError(f"the config has no search space for {label!r}: add a `tune: {{{label}: "
                          "{param: {low: ..., high: ...}}}` section (or --set tune.<label>...)")
    return config.models[labels.index(label)], config.tune[label]


def run_tune(config: RunConfig, label: str, trials: int, resume: Path | None = None,
             progress: bool = True,
             on_trial: Callable[[int], None] | None = None) -> TuneOutcome:
    """Run (or resume) the study until ``trials`` trials have completed; ``on_trial(n)`` is
    called after each completed trial with the number completed so far."""
    import optuna

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    entry, space = _entry(config, label)
    require_ray(config.execution)
    record = {**resolved_dict(config), "tuned_model": label}
    if resume is None:
        run = Run.create(Path(config.workdir) / "tune", f"{config.name}-{label}")
        run.save_config(record)
    else:
        run = Run.open(resume)
        saved = yaml.safe_load(run.file("config.yaml").read_text(encoding="utf-8"))
        now = yaml.safe_load(yaml.safe_dump(_without_execution(record)))
        if _without_execution(saved) != now:
            raise ConfigError(f"cannot resume {resume}: its config or tuned model differs from "
                              "this one; start a new study instead")
    executor = Executor(config.execution,
                        shared_paths=[path for path in (config.workdir, config.data.root) if path])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with executor, stop_between_folds():
            data, study = _study(config, run, label, entry, space, trials, executor, progress,
                                 on_trial)
    except KeyboardInterrupt:
        raise TuneInterrupted(run.path) from None
    return _report(run, study, data.config, data, _entry(data.config, label)[0], space, trials)


def _study(config: RunConfig, run: Run, label: str, entry: ModelSpec, space: dict, trials: int,
           executor: Executor, progress: bool, on_trial):
    """Prepare the data, open (or reopen) the study and run it to ``trials`` completed."""
    import optuna

    data = prepare_data(config, progress, map_tasks=executor.map)
    config, entry = data.config, _entry(data.config, label)[0]  # source features attached
    keys = stratification(config, data.train, min_size=config.evaluation.n_splits)
    folds = kfold_splits(data.train.ids, keys, config.evaluation.n_splits,
                         config.evaluation.n_repeats, config.seed)
    save_folds(folds, run.file("splits/folds.csv"))
    study = optuna.create_study(
        study_name=label, storage=f"sqlite:///{run.file('study.db')}", direction="maximize",
        sampler=sampler("tpe", config.seed), load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # cut off by a stop
    _optimise(study, config, entry, space, folds, trials, executor, progress, on_trial)
    return data, study


def _without_execution(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "execution"}


def _complete(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _optimise(study, config: RunConfig, entry: ModelSpec, space: dict, folds: list[Fold],
              trials: int, executor: Executor, progress: bool, on_trial) -> None:
    import optuna

    config_json = config.model_dump_json()
    at_once = config.execution.jobs if executor.parallel else 1
    failures = 0
    with progress_bar(f"tune {entry.display_name}", total=trials, completed=min(_complete(study), trials),
                      enabled=progress, unit="trial") as advance:
        while (done := _complete(study)) < trials:
            asked = [study.ask() for _ in range(min(at_once, trials - done))]
            tasks = []
            for trial in asked:
                params = {**entry.params, **suggest(trial, space)}
                tried = entry.model_copy(update={"params": params})
                tasks.append((config_json, tried.model_dump_json(), folds))
            outcomes = {}
            try:
                for index, outcome in executor.map(score_trial, tasks):
                    outcomes[index] = outcome
            except (ValueError, RuntimeError, ArithmeticError) as error:
                # A candidate the model cannot train with fails its trial, not the study.
                failures += 1
                log.warning("tune %s: a trial failed: %s", entry.display_name, error)
                if failures > trials:
                    raise
            for index, trial in enumerate(asked):
                if index not in outcomes:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                outcome = outcomes[index]
                trial.set_user_attr("per_repeat", outcome["per_repeat"])
                trial.set_user_attr("seconds", outcome["seconds"])
                study.tell(trial, outcome["value"])
                advance()
                if on_trial is not None:
                    on_trial(_complete(study))


def _trials_table(study) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"number": trial.number, "state": trial.state.name,
                     "value": math.nan if trial.value is None else trial.value,
                     "seconds": trial.user_attrs.get("seconds", math.nan),
                     "started": trial.datetime_start, "completed": trial.datetime_complete,
                     **{f"param_{k}": v for k, v in trial.params.items()}})
    return pd.DataFrame(rows)


def _report(run: Run, study, config: RunConfig, data, entry: ModelSpec, space: dict,
            trials: int) -> TuneOutcome:
    table = _trials_table(study)
    run.write_csv("trials.csv", table)
    best = study.best_trial
    best_params = {**entry.params, **best.params}
    snippet = {"models": [{"name": entry.name, "label": entry.display_name, "params": best_params}]}
    run.write_text("best_params.yaml",
                   f"# milbench tune: the best of {trials} trials by mean CV {METRIC} "
                   f"({best.value:.4f}, selection-optimistic)\n"
                   + yaml.safe_dump(snippet, sort_keys=False))
    run.save_figure("plots/optimisation_history.png", plot_history(table, entry.display_name))
    held_out = _hidden_test(config, data, entry.model_copy(update={"params": best_params}))
    per_repeat = np.asarray(best.user_attrs.get("per_repeat", []), dtype=float)
    spread = f" ± {per_repeat.std(ddof=1):.4f} (std over repeats)" if len(per_repeat) > 1 else ""
    lines = [f"# Tuning `{entry.display_name}` ({entry.name})", "",
             f"{_complete(study)} completed trials (TPE sampler, seed {config.seed}), each scored "
             f"by mean {METRIC} over {config.evaluation.n_repeats} × {config.evaluation.n_splits}"
             "-fold stratified CV on the training patients.", "",
             "Search space:", "", "```yaml", yaml.safe_dump(space, sort_keys=False).strip(), "```",
             "", f"Best trial #{best.number}: CV {METRIC} **{best.value:.4f}**{spread}, with "
             f"`{best.params}`.", "",
             "**This CV figure is selection-optimistic**: it is the best of many trials scored on "
             "the same folds, so it overstates what the tuned model will score on new patients. "
             "For an honest figure, nest the search (`inner_cv` with `search: optuna` in a run) "
             "or score the tuned model on patients the search never saw."]
    if held_out is not None:
        lines += ["", f"Held out: the tuned model refitted on all training patients scores "
                      f"{METRIC} {held_out['balanced_accuracy']:.3f} [95 % bootstrap interval "
                      f"{held_out['ci_low']:.3f}, {held_out['ci_high']:.3f}] on the "
                      f"{held_out['n']} hidden test patients of this synthetic cohort (not seen by "
                      "the search: an honest figure)."]
    lines += ["", "`best_params.yaml` holds the tuned model as a config snippet; "
              "`plots/optimisation_history.png` shows each trial and the best so far."]
    run.write_text("tune.md", "\n".join(lines) + "\n")
    return TuneOutcome(run.path, table, best_params, float(best.value))


def _hidden_test(config: RunConfig, data, entry: ModelSpec) -> dict | None:
    truth = hidden_test_labels(data.root, data.test.ids) if len(data.test) else None
    if truth is None:
        return None
    train_bags, test_bags = data.bags_for(entry)
    model = with_seed(entry.build(), config.seed).fit(train_bags, data.labels, data.train_clinical)
    predicted = model.predict(test_bags, data.test_clinical)
    interval = bootstrap_interval(truth, predicted, seed=config.seed)
    from sklearn.metrics import balanced_accuracy_score

    return {"balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
            "ci_low": interval["ci_low"], "ci_high": interval["ci_high"], "n": len(truth)}


def plot_history(table: pd.DataFrame, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table["state"] == "COMPLETE"].sort_values("number")
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.scatter(done["number"], done["value"], s=14, label="trial")
    axis.step(done["number"], done["value"].cummax(), where="post", color="C3", label="best so far")
    axis.set(xlabel="trial", ylabel=f"mean CV {METRIC}", title=f"Optimisation history: {label}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure

"""The run pipeline behind ``milbench run``: cohort → splits → each model in repeated CV →
refit on all training patients → test predictions and leaderboard CSVs → metrics, plots, report.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from milbench import report, tracking
from milbench.config import ConfigError, RunConfig, resolved_dict
from milbench.core.metrics import METRICS, binary_metrics, format_mean_std_max
from milbench.data import load_challenge
from milbench.data_roots import hidden_test_labels, resolve_data_root
from milbench.ensemble.members import (
    check_members,
    check_selection,
    is_selection,
    member_label,
    select_best,
)
from milbench.evaluation.compare import bootstrap_interval, paired_comparison
from milbench.evaluation.cv import CVResult, stop_between_folds
from milbench.evaluation.splits import kfold_splits, save_folds
from milbench.execution import Executor, require_ray
from milbench.instances import write_instance_views
from milbench.models import Tag, model_tags
from milbench.models.base import has_capability, with_seed
from milbench.models.reuse import fit_model, reusing_fits
from milbench.models.spec import ModelSpec
from milbench.preparation import (
    PreparedData,
    prepare_data,
    stratification,
)
from milbench.progress import StageTimer
from milbench.run_cv import model_cv
from milbench.runs import REQUESTED_CONFIG, Run, environment_record, git_state, requested_config_path
from milbench.saved import save_extractors, save_model
from milbench.submit import write_submission

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_dir: Path
    table: pd.DataFrame  # one row per model: metric summaries
    submissions: dict[str, Path]
    timings: pd.DataFrame  # stage, seconds
    comparisons: pd.DataFrame  # paired differences (COMPARISON_COLUMNS)


def check_member_selections(config: RunConfig) -> None:
    """Fail before any training on a malformed ``members: {best: k}`` entry."""
    for position, entry in enumerate(config.models):
        members = entry.params.get("members")
        if not is_selection(members):
            continue
        where = f"model {entry.display_name!r}"
        try:
            check_selection(members, METRICS)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        if not any(Tag.ENSEMBLE not in model_tags(e.name) for e in config.models[:position]):
            raise ConfigError(f"{where}: members are chosen among the models listed before it; "
                              "there are none")


def resolve_member_selection(entry: ModelSpec, earlier: list[ModelSpec],
                             results: dict[str, CVResult]) -> tuple[ModelSpec, pd.DataFrame]:
    """``entry`` with ``members: {best: k, by: metric}`` replaced by the k earlier non-ensemble
    models with the best mean CV metric (on this run's folds), and the ranking considered."""
    k, metric = check_selection(entry.params["members"], METRICS)
    candidates = [({**e.model_dump(exclude_defaults=True), "label": e.display_name},
                   float(results[e.display_name].summary.loc[metric, "mean"]))
                  for e in earlier if Tag.ENSEMBLE not in model_tags(e.name)]
    if len(candidates) < k:
        log.warning("%s: best %d requested, only %d candidate models; using all of them",
                    entry.display_name, k, len(candidates))
    chosen = select_best(candidates, k)
    ranking = pd.DataFrame({"model": [c["label"] for c, _ in candidates],
                            metric: [score for _, score in candidates]})
    ranking["chosen"] = ranking["model"].isin([c["label"] for c in chosen])
    log.info("%s: members %s (best %d by CV %s)", entry.display_name,
             [c["label"] for c in chosen], k, metric)
    resolved = entry.model_copy(update={"params": {**entry.params, "members": chosen}})
    return resolved, ranking.sort_values(metric, ascending=False, kind="stable")


class RunInterrupted(Exception):
    """Ctrl-C (or SIGINT) during a run: its finished fits are kept in ``run_dir``."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted; finished fits are kept in {run_dir / 'fits'}")
        self.run_dir = run_dir


def config_differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two resolved configs differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [difference for key in sorted(set(saved) | set(now), key=str)
                for difference in config_differences(saved.get(key), now.get(key),
                                               f"{prefix}.{key}" if prefix else str(key))]
    return [] if saved == now else [prefix or "(top level)"]


def data_fingerprint(cohort) -> str:
    """The cohort's images (path, size, mtime) and its patient table."""
    from preprocessing.store import source_table, sources_fingerprint

    table = hashlib.sha256(cohort.frame().to_csv(index=False).encode()).hexdigest()
    return f"{sources_fingerprint(source_table(cohort.image_table()))}:{table}"


def _resume(path: Path, config: RunConfig, requested: dict) -> Run:
    """The run directory to continue, once its config, code version and data match this run's;
    checked before any feature extraction or fit."""
    run = Run.open(path)
    saved = yaml.safe_load(requested_config_path(path).read_text(encoding="utf-8"))
    # Where the fits run does not change their results: a run may resume on another backend.
    changed = [key for key in config_differences(saved, json.loads(json.dumps(requested, default=str)))
               if key.split(".")[0] != "execution"]
    if changed:
        raise ConfigError(f"cannot resume {path}: the config differs in {', '.join(changed)}")
    then = json.loads(run.file("environment.json").read_text(encoding="utf-8"))
    now = environment_record()
    for name in ("milbench_version", "git"):
        if then.get(name) != now.get(name):
            raise ConfigError(f"cannot resume {path}: the code version differs ({name}: "
                              f"{then.get(name)} then, {now.get(name)} now)")
    root = resolve_data_root(config.data, config.workdir, progress=False)
    cohort = load_challenge(root, config.data.reference_date, config.data.strict_images)
    recorded = json.loads(run.file("data_fingerprint.json").read_text(encoding="utf-8"))
    if recorded["fingerprint"] != data_fingerprint(cohort):
        raise ConfigError(f"cannot resume {path}: the data differs (images or patient table "
                          "changed since the run started)")
    log.info("resuming %s", path)
    return run


def run_pipeline(config: RunConfig, progress: bool = True, resume: Path | None = None
                 ) -> RunOutcome:
    """Run ``config``; with ``resume``, continue that interrupted run directory: folds it
    finished are read back, the rest are fitted, and the results equal an uninterrupted run's."""
    check_member_selections(config)
    require_ray(config.execution)  # before any work: the ray backend needs Ray installed
    tracking.require(config)  # before any work: enabled tracking needs MLflow installed
    timer = StageTimer()
    # Workers read the data folder and the workdir (its feature stores, a generated cohort).
    executor = Executor(config.execution,
                        shared_paths=[path for path in (config.workdir, config.data.root) if path])
    with executor:
        return _run(config, progress, resume, timer, executor)


def _run(config: RunConfig, progress: bool, resume: Path | None, timer: StageTimer,
         executor: Executor) -> RunOutcome:
    requested = resolved_dict(config)  # before preparation fills in source features
    run = _resume(Path(resume), config, requested) if resume is not None else None
    data = prepare_data(config, progress, timer, map_tasks=executor.map)
    config = data.config  # the models with their source features, as the run records them
    if run is None:
        resolved = resolved_dict(config)
        resolved["data"]["resolved_root"] = str(data.root.resolve())
        run = Run.create(Path(config.workdir) / "runs", config.name)
        run.save_config(resolved)
        run.write_text(REQUESTED_CONFIG, yaml.safe_dump(requested, sort_keys=False))
        run.write_json("data_fingerprint.json", {"fingerprint": data_fingerprint(data.cohort)})
    try:
        with stop_between_folds():
            return _run_models(config, progress, timer, data, run, executor)
    except KeyboardInterrupt:
        raise RunInterrupted(run.path) from None


def _run_models(config: RunConfig, progress: bool, timer: StageTimer, data: PreparedData,
                run: Run, executor: Executor) -> RunOutcome:
    run.write_csv("cohort/patients.csv", data.cohort.frame())
    run.write_csv("cohort/skipped.csv", pd.DataFrame(
        [(s.path, s.reason) for s in data.cohort.skipped], columns=["path", "reason"]))
    if data.features:
        run.write_json("features.json", data.features)
    stores = {key: {"extractor": view.name, "models": view.models, "manifest": view.manifest}
              for key, view in data.views.items() if view.manifest}
    if stores:
        run.write_json("feature_stores.json", stores)
    if config.save_models:  # the fitted extractors the saved models need on new patients
        save_extractors(run.path, [view.manifest for view in data.views.values()],
                        Path(config.workdir) / "cache")

    keys = stratification(config, data.train, min_size=config.evaluation.n_splits)
    folds = kfold_splits(data.train.ids, keys, config.evaluation.n_splits,
                         config.evaluation.n_repeats, config.seed)
    save_folds(folds, run.file("splits/folds.csv"))

    test_truth = hidden_test_labels(data.root, data.test.ids)
    rows, results, submissions, finals, resolved_entries = [], {}, {}, {}, {}
    saved: dict[int, str] = {}  # id(fitted model) -> the name it was saved under
    # Ensembles share their members' fits on the same patients (see milbench.models.reuse).
    with reusing_fits():
        for position, entry in enumerate(config.models):
            name = entry.display_name
            note = ""
            if is_selection(entry.params.get("members")):
                entry, ranking = resolve_member_selection(entry, config.models[:position], results)
                run.write_csv(f"models/{name}/member_ranking.csv", ranking)
                note = "members chosen by this CV: " + ", ".join(
                    member_label(m) for m in entry.params["members"])
            resolved_entries[name] = entry
            with timer.stage(f"CV {name}"):
                results[name] = model_cv(config, data, entry, folds,
                                         records=run.file(f"fits/{name}"), executor=executor,
                                         progress=progress)
            _write_model_results(run, name, results[name])
            rows.append(_summary_row(name, results[name], note, data.features_of(entry)))
            if len(data.test):
                with timer.stage(f"refit and predict {name}"):
                    row_extra, path, finals[name] = _fit_final(run, config, data, entry, name,
                                                               results[name], test_truth, saved)
                if path is not None:  # a resumed run keeps it instead of writing another
                    run.write_json(f"fits/{name}/submission.json", {"path": str(path)})
                rows[-1].update(row_extra)
                if path is not None:
                    submissions[name] = path
    with timer.stage("report"):
        # Montages; instance AUC on synthetic truth.
        views = write_instance_views(run, data, finals, resolved_entries)
        table = views.add_to(pd.DataFrame(rows))
        run.write_csv("metrics.csv", table)
        comparisons = compare_models(config, resolved_entries, results)
        run.write_csv("comparisons.csv", comparisons)
        run.write_json("metrics.json", {
            name: {"per_repeat": r.per_repeat.to_dict(orient="records"),
                   "summary": r.summary.to_dict(orient="index")}
            for name, r in results.items()
        })
        run.write_json("submissions.json", {name: str(path) for name, path in submissions.items()})
        report.write_plots(run, data.cohort, results)
        markdown = report.render(config, data, table, submissions, timer.table(), views, comparisons)
        run.write_text("report.md", markdown)
        run.write_text("report.html", report.render_html(markdown, run.path))
    run.write_csv("timings.csv", timer.table())
    tracking.log_run(config, run.path)  # reads the finished run directory; nothing when disabled
    return RunOutcome(run_dir=run.path, table=table, submissions=submissions,
                      timings=timer.table(), comparisons=comparisons)


COMPARISON_COLUMNS = ["model", "reference", "comparison", "metric", "model_mean", "reference_mean",
                      "mean_difference", "ci_low", "ci_high", "p_value", "n", "verdict"]


def baseline_label(config: RunConfig) -> str | None:
    """The clinical baseline the run compares every model with: ``evaluation.baseline``, or else
    the first model that reads only the clinical attributes."""
    if config.evaluation.baseline is not None:
        return config.evaluation.baseline
    clinical_only = frozenset({Tag.CLINICAL})
    return next((e.display_name for e in config.models if model_tags(e.name) == clinical_only), None)


def compare_models(config: RunConfig, entries: dict[str, ModelSpec],
                   results: dict[str, CVResult], metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Paired differences over the run's folds (corrected resampled t-test, 95 % interval):
    every model against the clinical baseline, every ensemble against its best member (the
    member with the highest mean CV metric among those the run also evaluated on their own)."""
    rows = []

    def add(model: str, reference: str, comparison: str) -> None:
        test = paired_comparison(results[model].oof, results[reference].oof, metric)
        verdict = ("better" if test["ci_low"] > 0 else "worse" if test["ci_high"] < 0
                   else "no difference shown")
        rows.append({"model": model, "reference": reference, "comparison": comparison,
                     "metric": metric, "model_mean": test[f"{metric}_a"],
                     "reference_mean": test[f"{metric}_b"],
                     **{k: test[k] for k in ("mean_difference", "ci_low", "ci_high", "p_value", "n")},
                     "verdict": verdict})

    baseline = baseline_label(config)
    if baseline is not None and baseline in results:
        for name in results:
            if name != baseline:
                add(name, baseline, "vs clinical baseline")
    for name, entry in entries.items():
        members = entry.params.get("members")
        if Tag.ENSEMBLE not in model_tags(entry.name) or not isinstance(members, list | tuple):
            continue
        evaluated = [member_label(m) for m in check_members(members) if member_label(m) in results]
        if evaluated:
            best = max(evaluated, key=lambda m: results[m].summary.loc[metric, "mean"])
            add(name, best, "vs best member")
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _summary_row(name: str, result: CVResult, note: str, features: str) -> dict:
    summary = result.summary
    return {
        "model": name,
        "features": features,
        **{metric: format_mean_std_max(summary, metric) for metric in METRICS},
        "balanced_accuracy_mean": summary.loc["balanced_accuracy", "mean"],
        "seconds_per_fit": float(np.mean(result.fit_seconds)),
        "note": note,
    }


def _fit_final(run: Run, config: RunConfig, data: PreparedData, entry: ModelSpec, name: str,
               result: CVResult, test_truth: np.ndarray | None,
               saved: dict[int, str]) -> tuple[dict, Path | None, object]:
    """Refit on all training patients, predict the test patients, score them against the
    hidden truth of a synthetic cohort, save the model (``config.save_models``; ``saved``: the
    models saved so far, which an ensemble refers to), write the submission; the fitted model
    comes last."""
    train_bags, test_bags = data.bags_for(entry)
    final = fit_model(with_seed(entry.build(), config.seed), train_bags, data.labels,
                      data.train_clinical)
    scores = final.predict_proba(test_bags, data.test_clinical)[:, 1]
    predicted = final.predict(test_bags, data.test_clinical)
    predictions = {"patient_id": data.test.ids, "score": scores, "predicted": predicted}
    if has_capability(final, Tag.FUSION_GATE):  # each patient's weight on the image expert
        predictions["image_gate"] = final.fusion_gates(test_bags, data.test_clinical)
    run.write_csv(f"models/{name}/test_predictions.csv", pd.DataFrame(predictions))
    if config.save_models:
        save_model(final, run.path, name, {"spec": entry.model_dump(mode="json"),
                                           "features": data.feature_records(entry),
                                           "seed": config.seed}, saved)
    extra = {}
    if test_truth is not None:
        hidden = binary_metrics(test_truth, predicted, scores)
        interval = bootstrap_interval(test_truth, predicted, seed=config.seed)
        extra = {"hidden_test_balanced_accuracy": hidden["balanced_accuracy"],
                 "hidden_test_ci_low": interval["ci_low"], "hidden_test_ci_high": interval["ci_high"],
                 "hidden_test_roc_auc": hidden["roc_auc"]}
    if not config.submission.enabled:
        return extra, None, final
    written = run.file(f"fits/{name}/submission.json")
    if written.is_file():  # written before an interruption; the refit predicts the same
        return extra, Path(json.loads(written.read_text(encoding="utf-8"))["path"]), final
    path = write_submission(
        dict(zip(data.test.ids, predicted.tolist(), strict=True)), data.test.ids,
        config.submission.dir, f"{config.name}-{name}",
        provenance={
            "model": entry.name, "params": entry.params, "features": data.features_of(entry),
            "seed": config.seed,
            "git": git_state(), "run_dir": str(run.path.resolve()),
            "cv_balanced_accuracy": format_mean_std_max(result.summary, "balanced_accuracy"),
            "data_root": str(data.root.resolve()),
        },
    )
    return extra, path, final


def _write_model_results(run: Run, name: str, result: CVResult) -> None:
    run.write_csv(f"models/{name}/oof.csv", result.oof)
    run.write_csv(f"models/{name}/per_repeat.csv", result.per_repeat)
    run.write_csv(f"models/{name}/summary.csv", result.summary, index=True)

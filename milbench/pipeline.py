"""The run pipeline behind ``milbench run``: cohort → splits → each model in repeated CV →
refit on all training patients → test predictions and leaderboard CSVs → metrics, plots, report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from milbench import report, tracking
from milbench.config import ConfigError, DataConfig, ModelEntry, RunConfig, resolved_dict
from milbench.data import Cohort, load_challenge
from milbench.ensemble.members import (
    check_members,
    check_selection,
    is_selection,
    member_label,
    select_best,
)
from milbench.evaluation.compare import bootstrap_interval, paired_comparison
from milbench.evaluation.cv import CVResult, cross_validate
from milbench.evaluation.metrics import METRICS, binary_metrics, format_mean_std_max
from milbench.evaluation.splits import kfold_splits, save_folds, stratification_keys
from milbench.instances import write_instance_views
from milbench.models import create_model, model_tags
from milbench.models.reuse import fit_model, reusing_fits
from milbench.runs import Run, git_state
from milbench.submit import write_submission

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_dir: Path
    table: pd.DataFrame  # one row per model: metric summaries
    submissions: dict[str, Path]
    timings: pd.DataFrame  # stage, seconds
    comparisons: pd.DataFrame  # paired differences (COMPARISON_COLUMNS)


class StageTimer:
    """Wall time of each named stage of a run, in order."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append((name, time.perf_counter() - started))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.stages, columns=["stage", "seconds"])


def synthetic_cohort_path(data: DataConfig, workdir: str | Path) -> Path:
    """Where the configured synthetic cohort is cached: named by preset and seed, plus a hash of
    the knobs when any is overridden (every knob is part of the key)."""
    synthetic = data.synthetic
    name = f"synthetic-{synthetic.preset}-seed{synthetic.seed}"
    if synthetic.knobs:
        digest = hashlib.sha256(json.dumps(synthetic.knobs, sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:10]}"
    return Path(workdir) / "data" / name


def resolve_data_root(data: DataConfig, workdir: str | Path, progress: bool = True) -> Path:
    """The challenge folder to read: the configured one, or a generated synthetic cohort (cached
    under the work directory and reused when its manifest matches)."""
    if data.root is not None:
        return Path(data.root)
    from milbench.synth import GENERATOR_VERSION, generate_cohort, read_manifest

    synthetic = data.synthetic
    path = synthetic_cohort_path(data, workdir)
    if path.exists():
        manifest = read_manifest(path) or {}
        wanted = {"preset": synthetic.preset, "seed": synthetic.seed,
                  "knobs": json.loads(json.dumps(synthetic.knobs)),
                  "generator_version": GENERATOR_VERSION}
        found = {key: manifest.get(key) for key in wanted}
        if found != wanted:
            differing = sorted(k for k in wanted if found[k] != wanted[k])
            raise ConfigError(f"{path} exists but is not the synthetic cohort the config asks for "
                              f"(differs in {differing}); remove it to regenerate")
        log.info("reusing synthetic cohort %s", path)
        return path
    log.info("generating synthetic %s cohort in %s", synthetic.preset, path)
    generate_cohort(path, preset=synthetic.preset, seed=synthetic.seed, knobs=synthetic.knobs,
                    workers=2, progress=progress)
    return path


def feature_store(cohort: Cohort, config: RunConfig, progress: bool = True):
    """The feature store of every cohort image (train and test) under the configured extractor,
    computed once and cached under the work directory. An autoencoder extractor trains on all
    images, test images included (unsupervised; its manifest records ``uses_test_images``)."""
    from preprocessing.extract import extract_features

    return extract_features(cohort, config.features.extractor, Path(config.workdir) / "cache",
                            seed=config.seed, progress=progress, batch_size=config.features.batch_size,
                            device=config.features.device)


@dataclass
class PreparedData:
    """A config's data, ready for models: training and test bags, labels, clinical tables."""

    root: Path
    cohort: Cohort
    train: Cohort
    test: Cohort
    train_bags: list[np.ndarray]
    test_bags: list[np.ndarray]
    labels: np.ndarray
    train_clinical: pd.DataFrame
    test_clinical: pd.DataFrame
    features: dict  # the feature store manifest ({} without instance features)


def resolve_source_root(config: RunConfig, progress: bool = True) -> Path:
    """The ALL-IDB2-layout source set: the configured one, or a synthetic one generated once."""
    source = config.source
    if source.root is not None:
        return Path(source.root)
    from milbench.synth import generate_allidb2

    path = Path(config.workdir) / "data" / f"allidb2-seed{source.seed}-n{source.n_per_class}"
    if not path.exists():
        generate_allidb2(path, seed=source.seed, n_per_class=source.n_per_class, progress=progress)
    return path


def attach_source_features(config: RunConfig, progress: bool = True) -> None:
    """Give every model that learns from an instance-labelled source set (it has a
    ``source_features`` parameter left empty) the source's features, computed with the run's
    extractor. Cohort and source images are stain-matched to the source set (seed 001 §4), which
    changes the features of every model of the run; the resolved config records it."""
    needing = [e for e in config.models if "source_features" in build_model(e).get_params()
               and not e.params.get("source_features")]
    if not needing:
        return
    names = [e.display_name for e in needing]
    if config.source is None:
        raise ConfigError(f"models {names} learn from an instance-labelled source set: add a "
                          "`source:` section (root: null generates a synthetic ALL-IDB2 set)")
    if config.features.extractor == "none":
        raise ConfigError(f"models {names} need backbone features: set features.extractor")
    from milbench.semisup.source import prepare_source_features, source_stain

    root = resolve_source_root(config, progress)
    config.features.extractor = {**config.features.extractor,
                                 "stain": source_stain(root, config.source.stain_space)}
    path = prepare_source_features(root, config.features.extractor, Path(config.workdir) / "cache",
                                   seed=config.seed, progress=progress)
    for entry in needing:
        entry.params["source_features"] = str(path)


def prepare_data(config: RunConfig, progress: bool = True,
                 timer: StageTimer | None = None) -> PreparedData:
    """Cohort, bags and clinical tables for ``config`` (source features attached in place)."""
    timer = timer or StageTimer()
    with timer.stage("data"):
        root = resolve_data_root(config.data, config.workdir, progress)
        cohort = load_challenge(root, config.data.reference_date, config.data.strict_images)
    train, test = cohort.train(), cohort.test()
    if len(train) == 0:
        raise ConfigError(f"{root}: no training patients")
    for entry in config.models:
        if "instances" in model_tags(entry.name) and config.features.extractor == "none":
            raise ConfigError(f"model {entry.name!r} needs instance features; set features.extractor")
    with timer.stage("source features"):
        attach_source_features(config, progress)
    if config.features.extractor == "none":
        # Zero-width bags (one row per image) for models that read only the clinical table.
        train_bags = [np.zeros((p.n_images, 0)) for p in train.patients]
        test_bags = [np.zeros((p.n_images, 0)) for p in test.patients]
        manifest = {}
    else:
        with timer.stage("instance features"):
            store = feature_store(cohort, config, progress)
            train_bags, test_bags, manifest = store.bags(train), store.bags(test), store.manifest
    return PreparedData(
        root=root, cohort=cohort, train=train, test=test, train_bags=train_bags, test_bags=test_bags,
        labels=train.labels(), train_clinical=train.clinical_table(),
        test_clinical=test.clinical_table(), features=manifest,
    )


def hidden_test_labels(root: Path, test_ids: list[str]) -> np.ndarray | None:
    """Test labels of a synthetic cohort (its hidden truth), for scoring after prediction only;
    None for real challenge folders, which have no truth."""
    if not (root / "truth" / "test_labels.csv").is_file() or not test_ids:
        return None
    from milbench.synth import load_truth

    labels = load_truth(root).test_labels
    missing = [pid for pid in test_ids if pid not in labels]
    if missing:
        raise ConfigError(f"{root}/truth/test_labels.csv lacks test patients {missing[:10]}")
    return np.array([labels[pid] for pid in test_ids])


def stratification(config: RunConfig, train: Cohort, min_size: int) -> np.ndarray:
    return stratification_keys(
        train.frame(), tuple(config.evaluation.stratify), config.evaluation.age_threshold,
        config.evaluation.count_threshold, min_size=min_size,
    )


def build_model(entry: ModelEntry):
    return create_model(entry.name, **entry.params)


def check_member_selections(config: RunConfig) -> None:
    """Fail before any training on a malformed ``members: {best: k}`` entry."""
    for position, entry in enumerate(config.models):
        members = entry.params.get("members")
        if not is_selection(members):
            continue
        where = f"model {entry.display_name!r}"
        if "ensemble" not in model_tags(entry.name):
            raise ConfigError(f"{where}: only ensembles take members")
        try:
            check_selection(members, METRICS)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        if not any("ensemble" not in model_tags(e.name) for e in config.models[:position]):
            raise ConfigError(f"{where}: members are chosen among the models listed before it; "
                              "there are none")


def resolve_member_selection(entry: ModelEntry, earlier: list[ModelEntry],
                             results: dict[str, CVResult]) -> tuple[ModelEntry, pd.DataFrame]:
    """``entry`` with ``members: {best: k, by: metric}`` replaced by the k earlier non-ensemble
    models with the best mean CV metric (on this run's folds), and the ranking considered."""
    k, metric = check_selection(entry.params["members"], METRICS)
    candidates = [({"name": e.name, "params": e.params, "label": e.display_name},
                   float(results[e.display_name].summary.loc[metric, "mean"]))
                  for e in earlier if "ensemble" not in model_tags(e.name)]
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


def run_pipeline(config: RunConfig, progress: bool = True) -> RunOutcome:
    check_member_selections(config)
    tracking.require(config)  # before any work: enabled tracking needs MLflow installed
    timer = StageTimer()
    data = prepare_data(config, progress, timer)
    run = Run.create(Path(config.workdir) / "runs", config.name)
    resolved = resolved_dict(config)
    resolved["data"]["resolved_root"] = str(data.root.resolve())
    run.save_config(resolved)
    run.write_csv("cohort/patients.csv", data.cohort.frame())
    run.write_csv("cohort/skipped.csv", pd.DataFrame(
        [(s.path, s.reason) for s in data.cohort.skipped], columns=["path", "reason"]))
    if data.features:
        run.write_json("features.json", data.features)

    keys = stratification(config, data.train, min_size=config.evaluation.n_splits)
    folds = kfold_splits(data.train.ids, keys, config.evaluation.n_splits,
                         config.evaluation.n_repeats, config.seed)
    save_folds(folds, run.file("splits/folds.csv"))

    test_truth = hidden_test_labels(data.root, data.test.ids)
    rows, results, submissions, finals, resolved_entries = [], {}, {}, {}, {}
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
                results[name] = cross_validate(
                    build_model(entry), data.train_bags, data.labels, data.train.ids, folds,
                    data.train_clinical, seed=config.seed, description=f"CV {name}",
                    progress=progress)
            _write_model_results(run, name, results[name])
            rows.append(_summary_row(name, results[name], note))
            if len(data.test):
                with timer.stage(f"refit and predict {name}"):
                    row_extra, path, finals[name] = _fit_final(run, config, data, entry, name,
                                                               results[name], test_truth)
                rows[-1].update(row_extra)
                if path is not None:
                    submissions[name] = path
    with timer.stage("report"):
        views = write_instance_views(run, data, finals)  # montages; instance AUC on synthetic truth
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
        run.write_text("report.md", report.render(config, data, table, submissions, timer.table(), views,
                                                  comparisons))
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
    clinical_only = frozenset({"clinical"})
    return next((e.display_name for e in config.models if model_tags(e.name) == clinical_only), None)


def compare_models(config: RunConfig, entries: dict[str, ModelEntry],
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
        if "ensemble" not in model_tags(entry.name) or not isinstance(members, list | tuple):
            continue
        evaluated = [member_label(m) for m in check_members(members) if member_label(m) in results]
        if evaluated:
            best = max(evaluated, key=lambda m: results[m].summary.loc[metric, "mean"])
            add(name, best, "vs best member")
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _summary_row(name: str, result: CVResult, note: str) -> dict:
    summary = result.summary
    return {
        "model": name,
        **{metric: format_mean_std_max(summary, metric) for metric in METRICS},
        "balanced_accuracy_mean": summary.loc["balanced_accuracy", "mean"],
        "seconds_per_fit": float(np.mean(result.fit_seconds)),
        "note": note,
    }


def _fit_final(run: Run, config: RunConfig, data: PreparedData, entry: ModelEntry, name: str,
               result: CVResult, test_truth: np.ndarray | None) -> tuple[dict, Path | None, object]:
    """Refit on all training patients, predict the test patients, score them against the
    hidden truth of a synthetic cohort, write the submission; the fitted model comes last."""
    final = build_model(entry)
    if "random_state" in final.get_params():
        final.set_params(random_state=config.seed)
    final = fit_model(final, data.train_bags, data.labels, data.train_clinical)
    scores = final.predict_proba(data.test_bags, data.test_clinical)[:, 1]
    predicted = final.predict(data.test_bags, data.test_clinical)
    run.write_csv(f"models/{name}/test_predictions.csv", pd.DataFrame(
        {"patient_id": data.test.ids, "score": scores, "predicted": predicted}))
    extra = {}
    if test_truth is not None:
        hidden = binary_metrics(test_truth, predicted, scores)
        interval = bootstrap_interval(test_truth, predicted, seed=config.seed)
        extra = {"hidden_test_balanced_accuracy": hidden["balanced_accuracy"],
                 "hidden_test_ci_low": interval["ci_low"], "hidden_test_ci_high": interval["ci_high"],
                 "hidden_test_roc_auc": hidden["roc_auc"]}
    if not config.submission.enabled:
        return extra, None, final
    path = write_submission(
        dict(zip(data.test.ids, predicted.tolist(), strict=True)), data.test.ids,
        config.submission.dir, f"{config.name}-{name}",
        provenance={
            "model": entry.name, "params": entry.params, "seed": config.seed,
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

"""The run pipeline behind ``milbench run``: cohort → splits → each model in repeated CV →
refit on all training patients → test predictions and leaderboard CSVs → metrics, plots, report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from milbench import plots
from milbench.config import ConfigError, DataConfig, ModelEntry, RunConfig, resolved_dict
from milbench.data import Cohort, load_challenge
from milbench.evaluation.cv import CVResult, cross_validate
from milbench.evaluation.metrics import METRICS, binary_metrics, format_mean_std_max
from milbench.evaluation.splits import kfold_splits, save_folds, stratification_keys
from milbench.models import create_model, model_tags
from milbench.runs import Run, git_state
from milbench.submit import write_submission

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_dir: Path
    table: pd.DataFrame  # one row per model: metric summaries
    submissions: dict[str, Path]


def synthetic_cohort_path(data: DataConfig, workdir: str | Path) -> Path:
    return Path(workdir) / "data" / f"synthetic-{data.synthetic.preset}-seed{data.synthetic.seed}"


def resolve_data_root(data: DataConfig, workdir: str | Path, progress: bool = True) -> Path:
    """The challenge folder to read: the configured one, or a generated synthetic cohort (cached
    under the work directory and reused when its manifest matches)."""
    if data.root is not None:
        return Path(data.root)
    from milbench.synth import generate_cohort, read_manifest

    path = synthetic_cohort_path(data, workdir)
    if path.exists():
        manifest = read_manifest(path)
        if manifest is None or manifest.get("preset") != data.synthetic.preset or manifest.get(
            "seed"
        ) != data.synthetic.seed:
            raise ConfigError(f"{path} exists but is not the synthetic cohort the config asks for")
        log.info("reusing synthetic cohort %s", path)
        return path
    log.info("generating synthetic %s cohort in %s", data.synthetic.preset, path)
    generate_cohort(path, preset=data.synthetic.preset, seed=data.synthetic.seed, workers=2,
                    progress=progress)
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


def prepare_data(config: RunConfig, progress: bool = True) -> PreparedData:
    """Cohort, bags and clinical tables for ``config`` (source features attached in place)."""
    root = resolve_data_root(config.data, config.workdir, progress)
    cohort = load_challenge(root, config.data.reference_date, config.data.strict_images)
    train, test = cohort.train(), cohort.test()
    if len(train) == 0:
        raise ConfigError(f"{root}: no training patients")
    for entry in config.models:
        if "instances" in model_tags(entry.name) and config.features.extractor == "none":
            raise ConfigError(f"model {entry.name!r} needs instance features; set features.extractor")
    attach_source_features(config, progress)
    if config.features.extractor == "none":
        # Zero-width bags (one row per image) for models that read only the clinical table.
        train_bags = [np.zeros((p.n_images, 0)) for p in train.patients]
        test_bags = [np.zeros((p.n_images, 0)) for p in test.patients]
        manifest = {}
    else:
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


def run_pipeline(config: RunConfig, progress: bool = True) -> RunOutcome:
    data = prepare_data(config, progress)
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
    rows, results, submissions = [], {}, {}
    for entry in config.models:
        name = entry.display_name
        result = cross_validate(build_model(entry), data.train_bags, data.labels, data.train.ids,
                                folds, data.train_clinical, seed=config.seed,
                                description=f"CV {name}", progress=progress)
        results[name] = result
        _write_model_results(run, name, result)
        summary = result.summary
        rows.append({
            "model": name,
            **{metric: format_mean_std_max(summary, metric) for metric in METRICS},
            "balanced_accuracy_mean": summary.loc["balanced_accuracy", "mean"],
            "seconds_per_fit": float(np.mean(result.fit_seconds)),
        })
        if len(data.test):
            final = build_model(entry)
            if "random_state" in final.get_params():
                final.set_params(random_state=config.seed)
            final.fit(data.train_bags, data.labels, data.train_clinical)
            scores = final.predict_proba(data.test_bags, data.test_clinical)[:, 1]
            predicted = final.predict(data.test_bags, data.test_clinical)
            run.write_csv(f"models/{name}/test_predictions.csv", pd.DataFrame(
                {"patient_id": data.test.ids, "score": scores, "predicted": predicted}))
            if test_truth is not None:
                hidden = binary_metrics(test_truth, predicted, scores)
                rows[-1]["hidden_test_balanced_accuracy"] = hidden["balanced_accuracy"]
                rows[-1]["hidden_test_roc_auc"] = hidden["roc_auc"]
            if config.submission.enabled:
                submissions[name] = write_submission(
                    dict(zip(data.test.ids, predicted.tolist(), strict=True)), data.test.ids,
                    config.submission.dir, f"{config.name}-{name}",
                    provenance={
                        "model": entry.name, "params": entry.params, "seed": config.seed,
                        "git": git_state(), "run_dir": str(run.path.resolve()),
                        "cv_balanced_accuracy": format_mean_std_max(summary, "balanced_accuracy"),
                        "data_root": str(data.root.resolve()),
                    },
                )
    table = pd.DataFrame(rows)
    run.write_csv("metrics.csv", table)
    run.write_json("metrics.json", {
        name: {"per_repeat": r.per_repeat.to_dict(orient="records"),
               "summary": r.summary.to_dict(orient="index")}
        for name, r in results.items()
    })
    run.write_json("submissions.json", {name: str(path) for name, path in submissions.items()})
    _write_plots(run, data.cohort, results)
    run.write_text("report.md", _report(config, data, table, submissions))
    return RunOutcome(run_dir=run.path, table=table, submissions=submissions)


def _write_model_results(run: Run, name: str, result: CVResult) -> None:
    run.write_csv(f"models/{name}/oof.csv", result.oof)
    run.write_csv(f"models/{name}/per_repeat.csv", result.per_repeat)
    run.write_csv(f"models/{name}/summary.csv", result.summary, index=True)


def _write_plots(run: Run, cohort: Cohort, results: dict[str, CVResult]) -> None:
    run.save_figure("plots/clinical_by_class.png", plots.clinical_by_class(cohort.train().frame()))
    run.save_figure("plots/roc.png", plots.roc_curves({n: r.oof for n, r in results.items()}))
    cells = {n: {c: int(r.per_repeat[c].sum()) for c in ("tn", "fp", "fn", "tp")}
             for n, r in results.items()}
    run.save_figure("plots/confusion.png", plots.confusion_matrices(cells))


def _report(config: RunConfig, data: PreparedData, table: pd.DataFrame,
            submissions: dict[str, Path]) -> str:
    root, cohort, train, test = data.root, data.cohort, data.train, data.test
    features = data.features.get("config", {})
    if not data.features:
        described = "none (clinical attributes only)"
    else:
        described = (f"{features.get('kind')} `{features.get('name')}`, {data.features.get('dim')}-d"
                     + (" — trained without labels on all images, test images included"
                        if data.features.get("uses_test_images") else ""))
    hidden = [c for c in ("hidden_test_balanced_accuracy", "hidden_test_roc_auc") if c in table]
    shown = table[["model", *METRICS, "seconds_per_fit", *hidden]]
    lines = [
        f"# Run `{config.name}`",
        "",
        f"Data: `{root}` — {len(train)} train patients ({int(train.labels().sum())} tumoral), "
        f"{len(test)} test patients, {len(cohort.skipped)} skipped files.",
        f"Instance features: {described}.",
        f"Protocol: stratified {config.evaluation.n_splits}-fold CV × {config.evaluation.n_repeats} "
        f"repeats on {', '.join(config.evaluation.stratify) or 'the label'}; seed {config.seed}. "
        "Cells: mean ± std (max) over repeats."
        + (" `hidden_test_*`: the synthetic cohort's hidden test labels, read only after the "
           "models predicted (no real challenge folder has them)." if hidden else ""),
        "",
        shown.to_markdown(index=False),
        "",
        "![ROC](plots/roc.png) ![confusion](plots/confusion.png)",
        "![clinical](plots/clinical_by_class.png)",
        "",
        "Submissions:",
        *[f"- {name}: `{path}`" for name, path in submissions.items()],
    ]
    return "\n".join(lines) + "\n"


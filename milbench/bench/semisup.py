"""Semi-supervised model benchmark: repeated CV in ``head`` mode on a cohort with hidden truth.

Per fold it records which images each pseudo-labelling iteration chose and, from the synthetic
cohort's per-image truth (``load_truth``; the model never sees it), the precision of those
pseudo-labels; per repeat the balanced accuracy; and the wall time. Outputs (atomic writes):
``semisup_summary.json``, ``semisup_iterations.csv`` (per fold and iteration),
``semisup_chosen.csv`` (every chosen image), ``semisup_oof.csv``, ``semisup_metrics.csv``,
``semisup_iterations.png`` and ``semisup_report.md``.

Folds run through :func:`milbench.evaluation.cv.cross_validate` (the run's folds and per-fold
seeds); its ``describe`` hook reads each fitted model's pseudo-label log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from milbench.core.metrics import format_mean_std_max
from milbench.evaluation.cv import cross_validate
from milbench.evaluation.splits import kfold_splits
from milbench.io import atomic_write, atomic_write_json, atomic_write_text

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench" / "semisup.yaml"
CONFIG_KEYS = {"name", "seed", "data", "source", "extractor", "evaluation", "params"}


def load_semisup_config(path: str | os.PathLike | None = None,
                        overrides: Mapping[str, Any] | None = None) -> dict:
    """The YAML config (``configs/bench/semisup.yaml`` by default); ``overrides`` replace top-level
    sections key by key (``{"params": {"epochs": 5}}``). Unknown top-level keys are errors."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"semisup config not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(CONFIG_KEYS)}")
    for section, values in (overrides or {}).items():
        if section not in CONFIG_KEYS:
            raise ValueError(f"unknown config section {section!r}; known: {sorted(CONFIG_KEYS)}")
        if isinstance(values, Mapping):
            config[section] = {**(config.get(section) or {}), **values}
        else:
            config[section] = values
    return config


def _prepare_data(config: dict, work: Path) -> tuple[Path, Path]:
    """Cohort and source roots: the configured ones, or generated (once) under ``work/data``."""
    from milbench.config import DataConfig
    from milbench.data_roots import resolve_data_root
    from milbench.synth import generate_allidb2

    data, source = config.get("data") or {}, config.get("source") or {}
    cohort_root = resolve_data_root(DataConfig.model_validate(data), work, progress=False)
    source_root = source.get("root")
    if source_root is None:
        synthetic = source.get("synthetic") or {}
        n_per_class = int(synthetic.get("n_per_class", 130))
        source_root = work / "data" / f"allidb2_{synthetic.get('seed', 0)}_{n_per_class}"
        if not (source_root / "ALL_IDB2" / "img").is_dir():
            generate_allidb2(source_root, seed=int(synthetic.get("seed", 0)), n_per_class=n_per_class)
    return Path(cohort_root), Path(source_root)


def pseudo_label_truth(log: list[dict], train_ids: list[str], image_names: list[list[str]],
                       atypical: Mapping[tuple[str, str], int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-iteration precision of a fitted model's pseudo-labels, and one row per chosen image.

    ``image_names[b][i]`` is the file name of instance ``i`` of training bag ``b``; ``atypical``
    maps (patient, image name) to the hidden truth. Positive precision = share of images added
    with label 1 that are truly atypical; negative precision = share of label-0 images that are
    truly not atypical.
    """
    chosen, per_iteration = [], []
    for entry in log:
        row = {"iteration": entry["iteration"], "requested": entry["requested"],
               "short": entry["short"],
               "val_accuracy": entry["val_accuracy"][-1] if entry["val_accuracy"] else np.nan}
        for label, key, confidence_key in ((1, "positives", "positive_confidence"),
                                           (0, "negatives", "negative_confidence")):
            truths = []
            for (bag, instance), confidence in zip(entry[key], entry[confidence_key], strict=True):
                patient, image = train_ids[bag], image_names[bag][instance]
                truth = int(atypical[(patient, image)])
                truths.append(truth == label)
                chosen.append({"iteration": entry["iteration"], "patient_id": patient,
                               "image": image, "pseudo_label": label,
                               "confidence": float(confidence), "atypical": truth})
            name = "positive" if label == 1 else "negative"
            row[f"n_{name}"] = len(truths)
            row[f"{name}_precision"] = float(np.mean(truths)) if truths else np.nan
        per_iteration.append(row)
    return pd.DataFrame(per_iteration), pd.DataFrame(chosen)


def plot_iterations(per_iteration: pd.DataFrame, path: Path) -> Path:
    """Pseudo-label precision (cumulative and per iteration) and source validation accuracy."""
    from milbench.plots import plt

    grouped = per_iteration.groupby("iteration")
    figure, axis = plt.subplots(figsize=(7, 4.2))
    # Cumulative precision: all pseudo-labels added up to the iteration, pooled over folds.
    totals = grouped[["n_positive", "positive_hits", "n_negative", "negative_hits"]].sum().cumsum()
    iterations = totals.index.to_numpy()
    axis.plot(iterations, totals["positive_hits"] / totals["n_positive"].replace(0, np.nan),
              marker="o", label="label-1 precision (cumulative)")
    axis.plot(iterations, totals["negative_hits"] / totals["n_negative"].replace(0, np.nan),
              marker="s", label="label-0 precision (cumulative)")
    axis.plot(iterations, grouped["positive_precision"].mean(), linestyle=":", alpha=0.7,
              label="label-1 precision (this iteration, fold mean)")
    axis.plot(iterations, grouped["val_accuracy"].mean(), marker="^",
              label="source validation accuracy (fold mean)")
    axis.set(xlabel="pseudo-labelling iteration", ylabel="fraction", ylim=(0, 1.05),
             title="Pseudo-label precision and source validation accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path


def run_semisup_benchmark(config: dict, work: str | os.PathLike, *, progress: bool = False,
                          max_folds: int | None = None) -> dict:
    """Head-mode repeated CV on the configured cohort; returns the summary (also written)."""
    from milbench.data import load_challenge
    from milbench.models import create_model
    from milbench.semisup.source import prepare_source_features, with_source_stain
    from milbench.synth import load_truth
    from preprocessing.extract import extract_features

    work = Path(work)
    seed = int(config.get("seed", 0))
    params = dict(config.get("params") or {})
    if params.get("mode", "head") != "head":
        raise ValueError("the benchmark runs head mode (features from the store); full mode "
                         "needs a GPU and image bags")
    started = time.perf_counter()
    cohort_root, source_root = _prepare_data(config, work)
    cohort = load_challenge(cohort_root)
    truth = load_truth(cohort_root)  # the bench's, never the model's
    atypical = {(p, i): a for p, i, a in truth.instances[["patient_id", "image", "atypical"]]
                .itertuples(index=False, name=None)}
    train = cohort.train()
    extractor = with_source_stain(config["extractor"], source_root,
                                  (config.get("source") or {}).get("stain_space", "rgb"))
    cache = work / "cache"
    store = extract_features(train, extractor, cache, seed=seed, progress=progress)
    source_npz = prepare_source_features(source_root, extractor, cache, seed=seed,
                                         progress=progress)
    features_seconds = time.perf_counter() - started

    bags = store.bags(train)
    labels = train.labels()
    clinical = train.clinical_table()
    ids = [p.id for p in train.patients]
    names = [[Path(path).name for path in p.image_paths] for p in train.patients]
    evaluation = config.get("evaluation") or {}
    folds = kfold_splits(ids, labels, n_splits=int(evaluation.get("n_splits", 5)),
                         n_repeats=int(evaluation.get("n_repeats", 3)), seed=seed)
    if max_folds is not None:
        folds = folds[:max_folds]
    model = create_model("semisup", source_features=str(source_npz), **params)
    iteration_rows, chosen_rows = [], []

    def pseudo_labels(fitted, train_rows, val_rows) -> dict:
        per_iteration, chosen = pseudo_label_truth(
            fitted.estimator.pseudo_label_log_, [ids[i] for i in train_rows],
            [names[i] for i in train_rows], atypical)
        per_iteration["positive_hits"] = (per_iteration["positive_precision"].fillna(0)
                                          * per_iteration["n_positive"])
        per_iteration["negative_hits"] = (per_iteration["negative_precision"].fillna(0)
                                          * per_iteration["n_negative"])
        return {"per_iteration": per_iteration, "chosen": chosen}

    result = cross_validate(model, bags, labels, ids, folds, clinical, seed=seed,
                            description="semisup CV", progress=progress, describe=pseudo_labels)
    for fold, extra in zip(folds, result.extras, strict=True):
        for frame, rows in ((extra["per_iteration"], iteration_rows), (extra["chosen"], chosen_rows)):
            frame.insert(0, "repeat", fold.repeat)
            frame.insert(1, "fold", fold.fold)
            rows.append(frame)
    oof, per_repeat, fit_seconds = result.oof, result.per_repeat, result.fit_seconds
    summary_table = result.summary
    iterations = pd.concat(iteration_rows, ignore_index=True)
    chosen = pd.concat(chosen_rows, ignore_index=True)
    by_iteration = iterations.groupby("iteration").agg(
        n_positive=("n_positive", "mean"), positive_precision=("positive_precision", "mean"),
        negative_precision=("negative_precision", "mean"), val_accuracy=("val_accuracy", "mean"))
    overall_positive = float(chosen.loc[chosen["pseudo_label"] == 1, "atypical"].mean())
    overall_negative = float(1 - chosen.loc[chosen["pseudo_label"] == 0, "atypical"].mean())
    wall = time.perf_counter() - started
    summary = {
        "cohort": str(cohort_root), "source": str(source_root), "seed": seed,
        "n_train_patients": len(ids), "n_train_images": int(sum(len(b) for b in bags)),
        "folds": len(folds), "params": params, "extractor": extractor.to_dict(),
        "balanced_accuracy": {k: float(v) for k, v in summary_table.loc["balanced_accuracy"].items()},
        "roc_auc": {k: float(v) for k, v in summary_table.loc["roc_auc"].items()},
        "balanced_accuracy_text": format_mean_std_max(summary_table, "balanced_accuracy"),
        "pseudo_label_precision": {"label_1": overall_positive, "label_0": overall_negative},
        "precision_by_iteration": by_iteration.reset_index().to_dict(orient="records"),
        "seconds": {"wall": wall, "features": features_seconds,
                    "fit_mean": float(np.mean(fit_seconds)), "fit_total": float(np.sum(fit_seconds))},
    }
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "semisup_summary.json", summary)
    atomic_write_text(work / "semisup_iterations.csv", iterations.to_csv(index=False))
    atomic_write_text(work / "semisup_chosen.csv", chosen.to_csv(index=False))
    atomic_write_text(work / "semisup_oof.csv", oof.to_csv(index=False))
    atomic_write_text(work / "semisup_metrics.csv", per_repeat.to_csv(index=False))
    plot_iterations(iterations, work / "semisup_iterations.png")
    atomic_write_text(work / "semisup_report.md", _markdown(summary, by_iteration))
    return summary


def _markdown(summary: dict, by_iteration: pd.DataFrame) -> str:
    lines = [
        "# Semi-supervised model (head mode)", "",
        f"- cohort: `{summary['cohort']}` ({summary['n_train_patients']} training patients, "
        f"{summary['n_train_images']} images); source: `{summary['source']}`",
        f"- folds run: {summary['folds']}; balanced accuracy mean ± std (max) over repeats: "
        f"{summary['balanced_accuracy_text']}; ROC AUC {summary['roc_auc']['mean']:.3f}",
        f"- pseudo-label precision, all iterations and folds: label 1 "
        f"{summary['pseudo_label_precision']['label_1']:.3f}, label 0 "
        f"{summary['pseudo_label_precision']['label_0']:.3f}",
        f"- wall time {summary['seconds']['wall']:.1f} s (features "
        f"{summary['seconds']['features']:.1f} s, {summary['seconds']['fit_mean']:.2f} s per fit)",
        "", "| iteration | label-1 added (fold mean) | label-1 precision | label-0 precision "
        "| source val. accuracy |", "|---|---|---|---|---|",
    ]
    for row in by_iteration.reset_index().itertuples(index=False):
        lines.append(f"| {row.iteration} | {row.n_positive:.1f} | {row.positive_precision:.3f} | "
                     f"{row.negative_precision:.3f} | {row.val_accuracy:.3f} |")
    return "\n".join(lines) + "\n"


def bench_semisup_command(config: str | os.PathLike | None = None, out: str | os.PathLike = "bench_semisup",
                          overrides: Mapping[str, Any] | None = None, *, progress: bool = True,
                          max_folds: int | None = None) -> dict:
    """CLI entry: load the config, run the benchmark into ``out``, print the headline figures."""
    summary = run_semisup_benchmark(load_semisup_config(config, overrides), out, progress=progress,
                                    max_folds=max_folds)
    print(f"semisup (head): balanced accuracy {summary['balanced_accuracy_text']}, "
          f"pseudo-label precision label 1 {summary['pseudo_label_precision']['label_1']:.3f} / "
          f"label 0 {summary['pseudo_label_precision']['label_0']:.3f}, "
          f"wall {summary['seconds']['wall']:.1f} s; outputs in {out}")
    return summary

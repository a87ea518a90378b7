"""The tables and statements of ``milbench bench mil`` and the command itself: per (dataset,
model) mean ± standard error with the published rows beside them, where milbench stands against
the best published row and the torchmil peer (paired over the same folds), the ensembles against
their best member, and the settings nested selection chose. The runs are
:mod:`milbench.bench.mil`'s."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from milbench.bench.mil import (
    BEST_PUBLISHED,
    DEFAULT_CONFIG,
    PAPER_ACCURACY,
    REFERENCE_ACCURACY,
    REFERENCE_SECONDS,
    load_mil_bench_config,
    paper_method,
    params_text,
    run_mil_benchmark,
    select_models,
    split_list,
)
from milbench.evaluation.compare import corrected_resampled_ttest
from milbench.execution import require_ray, with_overrides
from milbench.io import atomic_write, atomic_write_text
from milbench.models import model_tags
from milbench.models.registry import Tag
from milbench.models.spec import ModelSpec


def _standard_error(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return math.nan
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def summarize_benchmark(folds: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, model): mean ± SE of the metrics, seconds per fit, and the paper and
    reference figures beside them."""
    records = []
    for (dataset, model), group in folds.groupby(["dataset", "model"], sort=False):
        first = group.iloc[0]
        spec = ModelSpec(name=first["model_name"], label=model,
                         params=yaml.safe_load(first["params"]) if isinstance(first["params"], str)
                         and first["params"] else {})
        n_repeats = group["repeat"].nunique()
        by = group.groupby("repeat") if n_repeats > 1 else None
        record = {"dataset": dataset, "model": model, "model_name": spec.name,
                  "params": params_text(spec.params), "repeats": n_repeats, "fits": len(group)}
        for metric in ("accuracy", "auc", "balanced_accuracy", "instance_auc"):
            values = (by[metric].mean() if by is not None else group[metric]).to_numpy(float)
            record[metric] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            record[f"{metric}_se"] = _standard_error(values)
        record["seconds_per_fit"] = float(group["fit_seconds"].mean())
        method = paper_method(spec)
        record["paper_method"] = method or ""
        record["paper_accuracy"] = PAPER_ACCURACY.get(method, {}).get(dataset, math.nan)
        # Reference misvm figures were measured with the linear kernel only.
        reference_key = spec.name if _is_reference_setting(spec) else None
        record["reference_accuracy"] = REFERENCE_ACCURACY.get(reference_key, {}).get(
            dataset, math.nan
        )
        record["reference_seconds_per_fit"] = REFERENCE_SECONDS.get(reference_key, {}).get(
            dataset, math.nan
        )
        records.append(record)
    return pd.DataFrame(records)


def _is_reference_setting(spec: ModelSpec) -> bool:
    params = spec.params
    if spec.name == "meanpool_svm":
        return True
    return spec.name in ("misvm", "mi_svm") and params.get("kernel") == "linear"


def _pm(mean: float, se: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {se:.3f}" if np.isfinite(se) else f"{mean:.3f}"


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "–"


TABLE_COLUMNS = (
    "dataset",
    "model",
    "accuracy",
    "balanced acc",
    "AUC",
    "s/fit",
    "paper acc",
    "ref. misvm acc",
    "ref. s/fit",
    "instance AUC",
)


def table_rows(summary: pd.DataFrame) -> list[list[str]]:
    rows = []
    for record in summary.to_dict("records"):
        reference_seconds = record["reference_seconds_per_fit"]
        rows.append(
            [
                record["dataset"],
                record["model"],
                _pm(record["accuracy"], record["accuracy_se"]),
                _pm(record["balanced_accuracy"], record["balanced_accuracy_se"]),
                _pm(record["auc"], record["auc_se"]),
                _number(record["seconds_per_fit"], 2),
                _number(record["paper_accuracy"]),
                _number(record["reference_accuracy"]),
                (
                    "> " + _number(reference_seconds, 0)
                    if reference_seconds >= 200
                    else _number(reference_seconds, 2)
                ),
                _pm(record["instance_auc"], record["instance_auc_se"]),
            ]
        )
    return rows


def format_table(df: pd.DataFrame) -> str:
    """Markdown table from per-fold results (summarised here) or from a summary."""
    summary = summarize_benchmark(df) if "fold" in df.columns else df
    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    return "\n".join(lines) + "\n"


PEER = "torchmil_abmil"


def paired_accuracy(folds: pd.DataFrame, dataset: str, model: str, other: str) -> dict:
    """``model`` minus ``other`` in accuracy over the same (repeat, fold)s of ``dataset``, with
    the corrected resampled t-test's 95 % interval."""
    rows = folds[folds["dataset"] == dataset]
    pairs = rows[rows["model"] == model].merge(rows[rows["model"] == other],
                                               on=["repeat", "fold"], suffixes=("", "_other"))
    ratio = float((pairs["n_test"] / pairs["n_train"]).mean())
    return corrected_resampled_ttest(pairs["accuracy"] - pairs["accuracy_other"], ratio)


def standing(summary: pd.DataFrame, folds: pd.DataFrame | None = None) -> list[str]:
    """Per dataset with a published row: milbench's best model by mean accuracy (the peer
    excluded) against the best published row and against the torchmil peer (with ``folds``,
    the paired difference over the same folds and its 95 % interval). The best of several
    models is picked on the same folds that score it: selection-optimistic."""
    lines = []
    for dataset, group in summary.groupby("dataset", sort=False):
        if dataset not in BEST_PUBLISHED:
            continue
        own = group[group["model_name"] != PEER].dropna(subset=["accuracy"])
        if own.empty:
            continue
        best = own.loc[own["accuracy"].idxmax()]
        published, method = BEST_PUBLISHED[dataset]
        line = (f"{dataset}: best milbench model {best['model']} {best['accuracy']:.3f} "
                f"± {best['accuracy_se']:.3f}; best published {method} {published:.3f} "
                f"({best['accuracy'] - published:+.3f})")
        peer = group[group["model_name"] == PEER]
        if not peer.empty:
            peer_accuracy = float(peer["accuracy"].iloc[0])
            line += f"; torchmil peer {peer_accuracy:.3f} ({best['accuracy'] - peer_accuracy:+.3f}"
            if folds is not None:
                paired = paired_accuracy(folds, dataset, best["model"], peer["model"].iloc[0])
                line += (f", paired 95 % CI [{paired['ci_low']:+.3f}, "
                         f"{paired['ci_high']:+.3f}]")
            line += ")"
        lines.append(line)
    return lines


def ensembles_against_best_member(folds: pd.DataFrame, specs: Sequence[ModelSpec]) -> list[str]:
    """Per dataset, every ensemble whose members are all models of this benchmark (same name and
    parameters): its paired accuracy difference from its best member (the member with the
    highest mean accuracy on these folds, so the reference is picked on them) over the same
    folds, with the corrected resampled t-test's 95 % interval."""
    labels = {(spec.name, params_text(spec.params)): spec.display_name for spec in specs}
    lines = []
    for spec in specs:
        members = spec.params.get("members")
        if not (Tag.ENSEMBLE in model_tags(spec.name) and isinstance(members, list)):
            continue
        coerced = [ModelSpec.coerce(member) for member in members]
        member_labels = [labels.get((m.name, params_text(m.params))) for m in coerced]
        if None in member_labels:
            continue
        for dataset, rows in folds.groupby("dataset", sort=False):
            present = set(rows["model"])
            if spec.display_name not in present or not set(member_labels) <= present:
                continue
            means = rows.groupby("model")["accuracy"].mean()
            best = max(member_labels, key=lambda label: means[label])
            paired = paired_accuracy(folds, dataset, spec.display_name, best)
            lines.append(f"{dataset}: {spec.display_name} {means[spec.display_name]:.3f} vs its best "
                         f"member {best} {means[best]:.3f}: {paired['mean_difference']:+.3f} "
                         f"[{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]")
    return lines


def selection_choices(folds: pd.DataFrame) -> list[str]:
    """Per (dataset, selection model): how often each setting was chosen over the fits."""
    chosen = folds[folds["chosen_params"].fillna("") != ""]
    lines = []
    for (dataset, model), group in chosen.groupby(["dataset", "model"], sort=False):
        counts = group["chosen_params"].value_counts()
        lines.append(f"{dataset} / {model}: " + "; ".join(
            f"{params} × {count}" for params, count in counts.items()))
    return lines


def bench_mil_command(
    config: Path | None = None,
    datasets: str | None = None,
    models: str | None = None,
    repeats: int | None = None,
    splits: int | None = None,
    out: Path | None = None,
    seed: int | None = None,
    backend: str | None = None,
    jobs: int | None = None,
) -> pd.DataFrame:
    """CLI entry: run the suite of ``config`` (``configs/bench/mil.yaml`` by default; options
    given here override it), print a rich table, write ``folds.csv``, ``summary.csv`` and
    ``table.md`` (atomically) to ``out`` if given, recording each fit there as it finishes
    (``fits/``: a rerun into ``out`` resumes). Returns the summary."""
    from rich.console import Console
    from rich.table import Table

    settings = load_mil_bench_config(config)
    chosen = settings.models if models is None else select_models(settings, split_list(models))
    dataset_names = settings.datasets if datasets is None else split_list(datasets)
    repeats = settings.n_repeats if repeats is None else repeats
    splits = settings.n_splits if splits is None else splits
    seed = settings.seed if seed is None else seed
    execution = with_overrides(settings.execution, backend, jobs)
    require_ray(execution)  # before any work
    folds = run_mil_benchmark(dataset_names, chosen, repeats, splits, seed, True, execution,
                              records=None if out is None else Path(out) / "fits")
    summary = summarize_benchmark(folds)
    table = Table(title=f"MIL benchmark: {repeats} x {splits}-fold CV (seed {seed})")
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for row in table_rows(summary):
        table.add_row(*row)
    Console().print(table)
    statement, choices = standing(summary, folds), selection_choices(folds)
    ensembles = ensembles_against_best_member(folds, chosen)
    for line in statement + ensembles + choices:
        Console().print(line)
    if out is not None:
        out = Path(out)
        atomic_write(out / "folds.csv", lambda tmp: folds.to_csv(tmp, index=False))
        atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
        command = (
            f"milbench bench mil {config or DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])} "
            f"--datasets {','.join(dataset_names)} "
            f"--models {','.join(spec.display_name for spec in chosen)} "
            f"--repeats {repeats} --splits {splits} --seed {seed}"
        )
        models_text = "\n".join(f"- `{spec.display_name}`: {spec.name} "
                                 f"{params_text(spec.params) or '(defaults)'}" for spec in chosen)
        choices_text = "".join(f"- {line}\n" for line in choices)
        if choices_text:
            choices_text = ("\nSettings chosen on each fit's training bags (nested, never on "
                            "its test fold):\n\n" + choices_text)
        standing_text = "".join(f"- {line}\n" for line in statement)
        if standing_text:  # the best of many models, picked on these folds
            standing_text = ("\nWhere milbench stands (its best model picked on these folds: "
                             "selection-optimistic):\n\n" + standing_text)
        ensembles_text = "".join(f"- {line}\n" for line in ensembles)
        if ensembles_text:
            ensembles_text = ("\nEnsembles against their best member (paired accuracy difference "
                              "over the same folds, 95 % CI; the best member is picked on these "
                              "folds):\n\n" + ensembles_text)
        atomic_write_text(out / "table.md",
                          f"`{command}`\n\n{models_text}\n\n{format_table(summary)}"
                          f"{standing_text}{ensembles_text}{choices_text}")
    return summary

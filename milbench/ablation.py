"""Ablation grids (``milbench ablate``): variants × repeats of one model on a fixed protocol.

An ablation config names a base run config and, per variant, the overrides that make it (the same
``key=value`` syntax as ``--set``). Each (variant, repeat) cell is evaluated on a stratified K-fold
CV (the default: repeat ``r`` of the run's own CV, its folds seeded as the run seeds them) or a
stratified train/validation split (the seed's protocol), seeded by the repeat only, so every
variant sees the same folds. The folds run through the project's CV engine
(:mod:`milbench.evaluation.cv`), in parallel worker processes where asked, each recorded under
``fits/<variant>/`` as it ends, so an interrupted grid resumes without redoing finished folds.

The table gives mean ± std (max) over repeats per metric, and each variant's paired difference
from the reference variant (the first, unless ``reference`` names one) over the same folds and
repeats, with a 95 % interval from the corrected resampled t-test (``comparisons.csv``). A value
is bold only where the best variant's paired interval against every other variant excludes zero.
Learning curves (models with a ``history_``) are averaged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from milbench import tracking
from milbench.config import ConfigError, RunConfig, load_config, resolved_dict
from milbench.core.metrics import (
    METRICS,
    aggregate,
    binary_metrics,
    format_interval,
    format_mean_std_max,
)
from milbench.evaluation.compare import corrected_resampled_ttest
from milbench.evaluation.cv import CVResult
from milbench.evaluation.splits import Fold, kfold_splits, train_val_split
from milbench.execution import ExecutionConfig, Executor, require_ray, with_overrides
from milbench.preparation import stratification, worker_data
from milbench.run_cv import model_cv
from milbench.runs import Run

log = logging.getLogger(__name__)


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["split", "cv"] = "cv"
    val_fraction: float = Field(0.2, gt=0, lt=1)
    n_splits: int = Field(5, ge=2)


class AblationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "ablation"
    base: str = Field(description="run config file, relative to the ablation file")
    repeats: int = Field(7, ge=1)
    protocol: Protocol = Protocol()
    execution: ExecutionConfig = Field(ExecutionConfig(jobs=2), description="where the cells run "
                                       "(--backend / --jobs override it)")
    variants: dict[str, list[str]] = Field(min_length=1)
    reference: str | None = Field(None, description="variant the others are compared with; "
                                  "null: the first")

    @model_validator(mode="after")
    def _known_reference(self) -> AblationConfig:
        if self.reference is not None and self.reference not in self.variants:
            raise ValueError(f"reference {self.reference!r} is not one of the variants "
                             f"{list(self.variants)}")
        return self

    @property
    def reference_variant(self) -> str:
        return self.reference or next(iter(self.variants))


def load_ablation(path: str | Path, overrides: list[str] = ()) -> tuple[AblationConfig, dict[str, RunConfig]]:
    """The ablation config and, per variant, its fully resolved run config."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        ablation = AblationConfig.model_validate(raw)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ablation config ({error.strerror})") from None
    except (yaml.YAMLError, ValidationError) as error:
        raise ConfigError(f"{path}: invalid ablation config\n{error}") from None
    base = (path.parent / ablation.base).resolve()
    variants = {}
    for name, variant_overrides in ablation.variants.items():
        config = load_config(base, [*overrides, *variant_overrides])
        if len(config.models) != 1:
            raise ConfigError(f"{path}: variant {name!r} must evaluate exactly one model, "
                              f"its config names {len(config.models)}")
        variants[name] = config
    return ablation, variants


def ablation_folds(config: RunConfig, data, protocol: Protocol, repeats: int) -> list[Fold]:
    """Every repeat's folds: repeat ``r`` of the run's own K-fold CV (shuffled with ``seed + r``),
    or one stratified train/validation split seeded with ``seed + r`` (as fold 0 of repeat
    ``r``). They do not depend on the variant, so every variant sees the same folds."""
    if protocol.kind == "split":
        keys = stratification(config, data.train, min_size=2)
        return [replace(train_val_split(data.train.ids, keys, protocol.val_fraction,
                                        seed=config.seed + repeat), repeat=repeat)
                for repeat in range(repeats)]
    keys = stratification(config, data.train, min_size=protocol.n_splits)
    return kfold_splits(data.train.ids, keys, protocol.n_splits, repeats, config.seed)


def cell_results(variant: str, result: CVResult, folds: list[Fold]) -> list[dict[str, Any]]:
    """One result per (variant, repeat) cell from the variant's CV: its metrics, per-fold
    metrics, fit seconds, validation/training size ratio and (single-split cells) history."""
    cells = []
    for repeat, metrics in result.per_repeat.set_index("repeat").iterrows():
        in_repeat = [i for i, fold in enumerate(folds) if fold.repeat == repeat]
        oof = result.oof[result.oof["repeat"] == repeat]
        fold_metrics = [{"fold": int(fold), **binary_metrics(g["label"], g["predicted"], g["score"])}
                        for fold, g in oof.groupby("fold", sort=True)]
        cells.append({
            "variant": variant, "repeat": int(repeat),
            "seconds": float(sum(result.fit_seconds[i] for i in in_repeat)),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "fold_metrics": [{k: float(v) for k, v in row.items()} for row in fold_metrics],
            "test_train_ratio": float(np.mean([len(folds[i].val_ids) / len(folds[i].train_ids)
                                               for i in in_repeat])),
            # Learning curves are drawn from single-split cells (one history per cell).
            "history": result.histories[in_repeat[0]] if len(in_repeat) == 1 else None,
        })
    return cells


def run_ablation(path: str | Path, overrides: list[str] = (), resume: str | Path | None = None,
                 backend: str | None = None, jobs: int | None = None,
                 progress: bool = True) -> tuple[Path, pd.DataFrame]:
    ablation, variants = load_ablation(path, overrides)
    execution = with_overrides(ablation.execution, backend, jobs)
    require_ray(execution)  # before any work
    base = next(iter(variants.values()))  # its workdir and tracking section hold for the grid
    tracking.require(base)
    # Where the folds run does not change their results, so it is not part of what must match
    # on resume.
    record = {"ablation": ablation.model_dump(mode="json", exclude={"execution"}),
              "variants": {name: resolved_dict(c) for name, c in variants.items()}}
    if resume is None:
        run = Run.create(Path(base.workdir) / "ablations", ablation.name)
        run.save_config(record)
    else:
        run = Run.open(resume)
        saved = yaml.safe_load((run.path / "config.yaml").read_text())
        if saved != json.loads(json.dumps(record)):
            raise ConfigError(f"{run.path}: the ablation config changed since this grid started; "
                              "start a new grid instead of resuming")
    run.write_json("execution.json", execution.model_dump(mode="json"))
    # Data and features are prepared here, once per distinct setting, so that workers only
    # ever read finished feature stores (two extracting into one store would collide).
    prepared = {name: worker_data(config) for name, config in variants.items()}
    shared = sorted({Path(base.workdir)} | {Path(data.root) for data in prepared.values()})
    results: list[dict] = []
    with Executor(execution, shared_paths=shared) as executor:
        for name, data in prepared.items():
            config = data.config  # the variant with its source features attached
            folds = ablation_folds(config, data, ablation.protocol, ablation.repeats)
            # Each fold is recorded under fits/<variant>/ as it ends: a rerun resumes there.
            result = model_cv(config, data, config.models[0], folds,
                              records=run.file(f"fits/{name}"), executor=executor,
                              progress=progress, description=f"ablation {ablation.name}: {name}")
            results += cell_results(name, result, folds)
    table = ablation_table(results, list(variants))
    comparisons = paired_differences(results, list(variants))
    run.write_csv("ablation.csv", table, index=True)
    run.write_csv("comparisons.csv", comparisons)
    run.write_text("ablation.md", format_ablation_markdown(table, ablation, comparisons))
    curves = learning_curves(results)
    if curves:
        run.save_figure("plots/learning_curves.png", plot_learning_curves(curves))
    tracking.log_ablation(base, run.path, table)
    return run.path, table


def ablation_table(results: list[dict], variants: list[str]) -> pd.DataFrame:
    """Per variant and metric: mean, std and max over repeats (columns ``metric:stat``)."""
    rows = {}
    for variant in variants:
        per_repeat = pd.DataFrame([r["metrics"] for r in results if r["variant"] == variant])
        summary = aggregate(per_repeat)
        rows[variant] = {f"{m}:{stat}": summary.loc[m, stat] for m in METRICS
                         for stat in ("mean", "std", "max")}
        rows[variant]["fit_seconds_per_cell"] = float(np.mean(
            [r["seconds"] for r in results if r["variant"] == variant]))
    return pd.DataFrame(rows).T.rename_axis("variant")


def paired_differences(results: list[dict], variants: list[str]) -> pd.DataFrame:
    """Every ordered pair of variants and every metric: the per-fold difference (a minus b) over
    the folds and repeats both ran, under the corrected resampled t-test."""
    per_fold = pd.DataFrame([
        {"variant": r["variant"], "repeat": r["repeat"], **row}
        for r in results for row in r["fold_metrics"]
    ]).set_index(["variant", "repeat", "fold"]).sort_index()
    ratio = float(np.mean([r["test_train_ratio"] for r in results]))
    rows = []
    for a in variants:
        for b in variants:
            if a == b:
                continue
            for metric in METRICS:
                difference = per_fold.loc[a, metric] - per_fold.loc[b, metric]
                if difference.notna().sum() < 2:
                    continue  # one repeat of a split: no interval to give
                test = corrected_resampled_ttest(difference, ratio)
                rows.append({"variant": a, "reference": b, "metric": metric,
                             **{k: test[k] for k in ("mean_difference", "ci_low", "ci_high",
                                                     "p_value", "n")}})
    return pd.DataFrame(rows, columns=["variant", "reference", "metric", "mean_difference",
                                       "ci_low", "ci_high", "p_value", "n"])


def best_variants(table: pd.DataFrame, comparisons: pd.DataFrame) -> dict[str, str]:
    """For each metric, the variant with the highest mean, where its paired interval against
    every other variant lies above zero (otherwise no variant is marked best)."""
    best = {}
    for metric in METRICS:
        if not table[f"{metric}:mean"].notna().any():
            continue
        leader = str(table[f"{metric}:mean"].astype(float).idxmax())
        against = comparisons[(comparisons["variant"] == leader) & (comparisons["metric"] == metric)]
        if len(against) == len(table) - 1 and len(against) and (against["ci_low"] > 0).all():
            best[metric] = leader
    return best


def format_ablation_markdown(table: pd.DataFrame, ablation: AblationConfig,
                             comparisons: pd.DataFrame) -> str:
    best = best_variants(table, comparisons)
    reference = ablation.reference_variant
    difference_header = f"Δ balanced_accuracy vs {reference} [95 % CI]"
    header = ["variant", *METRICS, difference_header]
    protocol = ablation.protocol
    described = (f"stratified train/validation split, {protocol.val_fraction:.0%} validation"
                 if protocol.kind == "split" else f"stratified {protocol.n_splits}-fold CV")
    lines = [f"# Ablation `{ablation.name}`", "",
             f"{ablation.repeats} repeats of a {described}, reseeded per repeat; every variant "
             "sees the same folds. Cells: mean ± std (max) over repeats. The last column is the "
             f"paired difference from `{reference}` over the same folds and repeats (corrected "
             "resampled t-test). A value is bold only where the best variant's paired interval "
             "against every other variant excludes zero.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in table.index:
        cells = []
        for metric in METRICS:
            summary = pd.DataFrame({"mean": [table.loc[variant, f"{metric}:mean"]],
                                    "std": [table.loc[variant, f"{metric}:std"]],
                                    "max": [table.loc[variant, f"{metric}:max"]]}, index=[metric])
            text = format_mean_std_max(summary, metric)
            cells.append(f"**{text}**" if best.get(metric) == variant else text)
        row = comparisons[(comparisons["variant"] == variant) & (comparisons["reference"] == reference)
                          & (comparisons["metric"] == "balanced_accuracy")]
        cells.append("reference" if variant == reference else "–" if row.empty else
                     format_interval(*row.iloc[0][["mean_difference", "ci_low", "ci_high"]],
                                     signed=True))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if not best:
        lines += ["", "No variant is best by an interval that excludes zero on any metric."]
    return "\n".join(lines) + "\n"


def learning_curves(results: list[dict]) -> dict[str, pd.DataFrame]:
    """Per variant, the per-epoch mean over repeats of every recorded history column (epochs
    reached by at least half of the repeats)."""
    curves = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        histories = [pd.DataFrame(r["history"]).assign(repeat=r["repeat"])
                     for r in results if r["variant"] == variant and r.get("history")]
        if histories:
            frame = pd.concat(histories)
            if "epoch" not in frame.columns:
                frame["epoch"] = frame.groupby("repeat").cumcount()
            grouped = frame.drop(columns=["repeat"]).groupby("epoch")
            # Early stopping ends repeats at different epochs; a mean over the few repeats still
            # running would jump, so epochs reached by fewer than half of them are left out.
            enough = grouped.size() * 2 >= len(histories)
            curves[variant] = grouped.mean(numeric_only=True)[enough]
    return curves


def plot_learning_curves(curves: dict[str, pd.DataFrame]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({c for frame in curves.values() for c in frame.columns})
    figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    for axis, column in zip(axes[0], columns, strict=True):
        for variant, frame in curves.items():
            if column in frame:
                axis.plot(frame.index, frame[column], label=variant)
        axis.set(xlabel="epoch", title=column)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Learning curves, mean over repeats")
    figure.tight_layout()
    return figure

"""MIL benchmark suite (`milbench bench mil`): bag models on MUSK1, MUSK2, ELEPHANT, UCSB breast
cancer and digit bags, side by side with the published and reference figures.

Protocol (as the attention-MIL paper and the reference runs of docs/data.md): stratified ``n_splits``-fold
cross-validation at bag level, repeated ``n_repeats`` times, repeat ``r`` using
``StratifiedKFold(n_splits, shuffle=True, random_state=seed + r)`` over the bags in file order.
The folds run on the project's CV engine (:mod:`milbench.evaluation.cv`): the run's fold-seed
rule, fold records and worker task. Every preprocessing step (scalers, PCA) is fitted inside
the model's ``fit``, so inside the fold. Reported (by :mod:`milbench.bench.mil_report`) per
(dataset, model): accuracy and AUC, mean ± standard error, and seconds per fit; on digit bags
also the instance-level AUC of the instance scores (attention weights, witness scores) against
the known instance labels.

Standard error: with several repeats, over the per-repeat means (each the mean over its folds,
as in Ilse et al. 2018); with one repeat, over the folds.

With an output folder, each finished fit is recorded there at once (``fits/<dataset>/<label>/
<digest>/``, the engine's fold records); a rerun into the same folder reads back every fit whose
dataset, model (name, label and parameters), repeat, fold and protocol match and fits only the
rest, so an interrupted or extended benchmark (more repeats, more models) resumes where it
stopped. Records are not keyed by code version: after changing a model's code, remove its
folder under ``fits/``.

Models are :class:`~milbench.models.spec.ModelSpec` entries of a YAML config
(``configs/bench/mil.yaml`` by default: ``datasets``, ``models``, ``n_repeats``, ``n_splits``,
``seed``), as in a run config: a registered name, or ``{name, params, label}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from milbench.bench.mil_data import MILDataset, load_benchmark_dataset
from milbench.evaluation.cv import CVResult, FoldOutcome, FoldRecords, LocalFold, cross_validate
from milbench.evaluation.splits import Fold, kfold_splits
from milbench.execution import ExecutionConfig, Executor
from milbench.models.base import FoldFit, has_capability
from milbench.models.registry import Tag
from milbench.models.spec import ModelSpec, check_unique_labels

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench" / "mil.yaml"
DEFAULT_DATASETS = ("musk1", "musk2", "elephant", "ucsb", "digits")

# Accuracy published for 10-fold CV (docs/data.md; the others as tabulated by Ilse et al. 2018,
# Table 1): Andrews et al. 2002, Zhou et al. 2009, Wei et al. 2017 (miFV), Wang et al. 2018
# (mi-Net, MI-Net with deep supervision) and Ilse et al. 2018.
PAPER_ACCURACY: dict[str, dict[str, float]] = {
    "mi-SVM (Andrews 2002)": {"musk1": 0.874, "musk2": 0.836, "elephant": 0.822},
    "MI-SVM (Andrews 2002)": {"musk1": 0.779, "musk2": 0.843, "elephant": 0.814},
    "mi-Graph (Zhou 2009)": {"musk1": 0.889, "musk2": 0.903, "elephant": 0.869},
    "miFV (Wei 2017)": {"musk1": 0.909, "musk2": 0.884, "elephant": 0.852},
    "mi-Net (Wang 2018)": {"musk1": 0.889, "musk2": 0.858, "elephant": 0.858},
    "MI-Net DS (Wang 2018)": {"musk1": 0.894, "musk2": 0.874, "elephant": 0.872},
    "Attention MIL (Ilse 2018)": {"musk1": 0.892, "musk2": 0.858, "elephant": 0.868},
    "Gated attention MIL (Ilse 2018)": {"musk1": 0.900, "musk2": 0.863, "elephant": 0.857},
}
# The best published row per dataset: the figure milbench's best model is measured against.
BEST_PUBLISHED = {dataset: max((figures[dataset], method) for method, figures
                               in PAPER_ACCURACY.items() if dataset in figures)
                  for dataset in ("musk1", "musk2", "elephant")}
# Zoo aggregations of dmil with a published row of their own.
AGGREGATION_PAPERS = {"attention": "Attention MIL (Ilse 2018)",
                      "gated_attention": "Gated attention MIL (Ilse 2018)",
                      "mi_net": "mi-Net (Wang 2018)", "mi_net_ds": "MI-Net DS (Wang 2018)"}
# The reference `misvm` package measured on a 2-core machine (docs/data.md): one repeat of the same
# folds, linear kernel, C=1 (scale_C), max_iters=50; accuracy and seconds per fit. NaN = did
# not finish (MUSK2: > 200 s per fit for MI-SVM, > 540 s for mi-SVM).
REFERENCE_ACCURACY: dict[str, dict[str, float]] = {
    "misvm": {"musk1": 0.758, "musk2": math.nan, "elephant": 0.795, "ucsb": 0.670},
    "mi_svm": {"musk1": 0.641, "musk2": math.nan, "elephant": 0.615, "ucsb": 0.727},
    "meanpool_svm": {"musk1": 0.870, "musk2": 0.922, "elephant": 0.825, "ucsb": 0.823},
}
REFERENCE_SECONDS: dict[str, dict[str, float]] = {
    "misvm": {"musk1": 0.057, "musk2": 200.0, "elephant": 0.29, "ucsb": 1.19},
    "mi_svm": {"musk1": 0.22, "musk2": 540.0, "elephant": 6.0, "ucsb": 11.0},
}


class MILBenchConfig(BaseModel):
    """The benchmark's config: datasets, models and the CV protocol."""

    model_config = ConfigDict(extra="forbid")
    datasets: list[str] = list(DEFAULT_DATASETS)
    models: list[ModelSpec] = Field(min_length=1)
    n_repeats: int = Field(5, ge=1)
    n_splits: int = Field(10, ge=2)
    seed: int = 0
    execution: ExecutionConfig = Field(ExecutionConfig(), description="where the fits run "
                                       "(--backend / --jobs override it)")

    @field_validator("models", mode="before")
    @classmethod
    def _coerce(cls, value):
        return [ModelSpec.coerce(item) for item in value or []]

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        return check_unique_labels(models, "models")


def load_mil_bench_config(path: str | os.PathLike | None = None) -> MILBenchConfig:
    """``path`` (``configs/bench/mil.yaml`` by default), validated: an unknown key, model or
    model parameter fails here, naming it."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"MIL benchmark config not found: {path}")
    try:
        return MILBenchConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as error:
        raise ValueError(f"{path}: {error}") from None


def select_models(config: MILBenchConfig, names: Sequence[str]) -> list[ModelSpec]:
    """The config's models by label; a registered model name not among the labels is that
    model at its defaults."""
    by_label = {spec.display_name: spec for spec in config.models}
    chosen = []
    for name in names:
        if name in by_label:
            chosen.append(by_label[name])
            continue
        try:
            chosen.append(ModelSpec(name=name))
        except ValueError:
            raise ValueError(f"model {name!r} is neither a label of the benchmark config "
                             f"({', '.join(by_label)}) nor a registered model") from None
    return chosen


def paper_method(spec: ModelSpec) -> str | None:
    """The published method whose figures stand beside ``spec``'s."""
    params = spec.params
    if spec.name == "inner_cv":  # the wrapped model's paper, its fixed parameters deciding
        return paper_method(spec.wrapped[0])
    if spec.name == "voting" and len(spec.wrapped) == 1:
        return paper_method(spec.wrapped[0])  # one member's copies over seeds
    if spec.name == "misvm":
        return "MI-SVM (Andrews 2002)"
    if spec.name == "mi_svm":
        return "mi-SVM (Andrews 2002)"
    if spec.name == "migraph":
        return "mi-Graph (Zhou 2009)"
    if spec.name == "mifv":
        return "miFV (Wei 2017)"
    if spec.name in ("dmil", "torchmil_abmil"):
        default = "gated_attention" if params.get("gated") else "attention"
        return AGGREGATION_PAPERS.get(params.get("aggregation", default))
    return None


def params_text(params: dict) -> str:
    """Parameters as one line of YAML (flow style), for tables and CSV files."""
    return yaml.safe_dump(params, default_flow_style=True, width=10**6).strip() if params else ""


def split_list(text: str) -> list[str]:
    """A comma-separated CLI list."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _instance_auc(model, bags, instance_labels) -> float:
    if instance_labels is None or not has_capability(model, Tag.INSTANCE_SCORES):
        return math.nan
    truth = np.concatenate(instance_labels)
    if len(np.unique(truth)) < 2:
        return math.nan
    return float(roc_auc_score(truth, np.concatenate(model.instance_scores(bags))))


# One row per fit, in this column order.
FOLD_COLUMNS = ("dataset", "model", "model_name", "params", "repeat", "fold", "n_train", "n_test",
                "accuracy", "balanced_accuracy", "auc", "instance_auc", "fit_seconds",
                "chosen_params")


@dataclass
class DescribeFit:
    """What the benchmark records of each fitted fold beside its predictions: the instance AUC
    on the held-out bags (digit bags know their instance labels) and what a selection model
    (``inner_cv``) chose on the fold's training bags."""

    dataset: MILDataset

    def __call__(self, fitted: FoldFit, train: list[int], test: list[int]) -> dict:
        instances = self.dataset.instance_labels
        return {
            "instance_auc": _instance_auc(fitted.estimator, [self.dataset.bags[i] for i in test],
                                          None if instances is None else [instances[i] for i in test]),
            "chosen_params": params_text(fitted.estimator.best_params_ if has_capability(
                fitted.estimator, Tag.SELECTION) else {}),
        }


@dataclass
class MILFold:
    """One fold of one model on one dataset, as a worker process or Ray task runs it."""

    dataset: MILDataset
    spec_json: str
    seed: int

    def __call__(self, fold: Fold) -> FoldOutcome:
        spec = ModelSpec.model_validate_json(self.spec_json)
        return LocalFold(spec.build(), self.dataset.bags, self.dataset.labels,
                         bag_ids(self.dataset), None, self.seed, spec.fixes_seed,
                         DescribeFit(self.dataset))(fold)


def bag_ids(dataset: MILDataset) -> list[str]:
    """The bags' ids for the CV engine: their positions in the file."""
    return [str(i) for i in range(len(dataset.labels))]


def fit_records(records: Path, dataset: str, spec: ModelSpec, n_splits: int,
                seed: int) -> FoldRecords:
    """Where one model's fits on one dataset are recorded: a folder named by dataset and label,
    then by a digest of everything else that decides the fits (model name and parameters, the
    protocol)."""
    decided_by = json.dumps({"name": spec.name, "params": spec.params, "n_splits": n_splits,
                             "seed": seed}, sort_keys=True, default=str)
    digest = hashlib.sha256(decided_by.encode()).hexdigest()[:12]
    return FoldRecords(records / dataset / spec.display_name / digest)


def fold_rows(dataset: MILDataset, spec: ModelSpec, folds: list[Fold], result: CVResult) -> list[dict]:
    """The benchmark's row per fit, from the CV engine's out-of-fold rows and extras."""
    rows = []
    for fold, (_, oof), fit_seconds, extra in zip(
            folds, result.oof.groupby(["repeat", "fold"], sort=False), result.fit_seconds,
            result.extras, strict=True):
        truth, predicted = oof["label"].to_numpy(), oof["predicted"].to_numpy()
        rows.append({
            "dataset": dataset.name, "model": spec.display_name, "model_name": spec.name,
            "params": params_text(spec.params), "repeat": fold.repeat, "fold": fold.fold,
            "n_train": len(fold.train_ids), "n_test": len(fold.val_ids),
            "accuracy": float(accuracy_score(truth, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
            "auc": (float(roc_auc_score(truth, oof["score"].to_numpy()))
                    if len(np.unique(truth)) == 2 else math.nan),
            "instance_auc": extra["instance_auc"], "fit_seconds": fit_seconds,
            "chosen_params": extra["chosen_params"],
        })
    return rows


def run_mil_benchmark(
    datasets: Sequence[str | MILDataset],
    models: Sequence[str | dict | ModelSpec],
    n_repeats: int = 5,
    n_splits: int = 10,
    seed: int = 0,
    progress: bool = True,
    execution: ExecutionConfig | None = None,
    records: Path | None = None,
) -> pd.DataFrame:
    """Run the protocol; one row per (dataset, model, repeat, fold) (see the module docstring).

    ``datasets`` are names for :func:`load_benchmark_dataset` (``digits`` / ``digitsN`` are
    generated with ``seed``) or ready :class:`MILDataset` objects; ``models`` are model specs.
    ``execution`` says where the fits run (default: here, one after another); every fit uses
    one torch thread wherever it runs (small networks: threads cost more than they give).
    With ``records`` (a folder), each finished fit is saved there as it ends and a fit already
    recorded there is read back instead of run.
    """
    specs = [ModelSpec.coerce(m) for m in models]
    loaded = [
        d if isinstance(d, MILDataset) else load_benchmark_dataset(d, random_state=seed)
        for d in datasets
    ]
    rows: list[dict] = []
    with Executor(execution or ExecutionConfig()) as executor:
        for dataset in loaded:
            ids = bag_ids(dataset)
            folds = kfold_splits(ids, dataset.labels, n_splits, n_repeats, seed)
            for spec in specs:
                result = cross_validate(
                    spec.build(), dataset.bags, dataset.labels, ids, folds, seed=seed,
                    description=f"MIL benchmark {dataset.name} {spec.display_name}",
                    progress=progress, describe=DescribeFit(dataset),
                    records=None if records is None else fit_records(
                        records, dataset.name, spec, n_splits, seed),
                    executor=executor, task=MILFold(dataset, spec.model_dump_json(), seed),
                    keep_model_seed=spec.fixes_seed)
                rows += fold_rows(dataset, spec, folds, result)
    return pd.DataFrame(rows, columns=list(FOLD_COLUMNS))

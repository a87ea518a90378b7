"""A run config's model cross-validated on the run's prepared data: the one worker task of
``run``, ``tune`` and ``ablate``. A fold (or a trial, or an ablation cell) may run in a worker
process or on Ray; there the data is prepared from the feature stores the driver finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from milbench.config import RunConfig
from milbench.evaluation.cv import CVResult, FoldOutcome, FoldRecords, LocalFold, cross_validate
from milbench.evaluation.splits import Fold
from milbench.models.spec import ModelSpec
from milbench.preparation import PreparedData, worker_data


@dataclass(frozen=True)
class RunFold:
    """One fold of one model of a run, as a worker runs it (picklable: two JSON strings)."""

    config_json: str
    entry_json: str

    def __call__(self, fold: Fold) -> FoldOutcome:
        config = RunConfig.model_validate_json(self.config_json)
        entry = ModelSpec.model_validate_json(self.entry_json)
        data = worker_data(config)
        return LocalFold(entry.build(), data.bags_for(entry)[0], data.labels, data.train.ids,
                         data.train_clinical, config.seed, entry.fixes_seed)(fold)


def model_cv(config: RunConfig, data: PreparedData, entry: ModelSpec, folds: list[Fold],
             records: Path | FoldRecords | None = None, executor=None, progress: bool = False,
             description: str | None = None) -> CVResult:
    """``entry`` (a model of ``config``) on ``folds`` of ``data``'s training patients: in this
    process (with its threads), or fold by fold on a parallel ``executor``."""
    if executor is not None and not executor.parallel:
        executor = None  # a run in one process keeps the process's threads
    return cross_validate(
        entry.build(), data.bags_for(entry)[0], data.labels, data.train.ids, folds,
        data.train_clinical, seed=config.seed, description=description or f"CV {entry.display_name}",
        progress=progress, records=records, executor=executor,
        task=RunFold(config.model_dump_json(), entry.model_dump_json()),
        keep_model_seed=entry.fixes_seed)

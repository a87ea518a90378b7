"""The project's one cross-validation engine: folds of a bag model with out-of-fold predictions.

``run``, ``ablate``, ``tune``, ``bench mil``, ``bench cohorts`` and the semi-supervised bench all
cross-validate through :func:`cross_validate`, so they share:

- **one fold-seed rule**: fold ``f`` of repeat ``r`` trains a fresh clone seeded with
  :func:`fold_seed` ``(seed, r, f)`` (unless the model's spec fixes its own ``random_state``),
  so a fold's result does not depend on which folds ran before it or where;
- **one fold record** (:class:`FoldRecords`): each finished fold's out-of-fold rows, fit time,
  history and extras, one JSON file written atomically as it ends, read back on resume;
- **one worker task**: a picklable ``task(fold) -> FoldOutcome`` that loads its bags where it
  runs; :class:`LocalFold` is the in-process one.

Only the training patients' labels reach ``fit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.core.metrics import aggregate, binary_metrics
from milbench.evaluation.splits import Fold
from milbench.io import atomic_write_json
from milbench.models.base import FoldFit, fit_fold
from milbench.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    """Out-of-fold predictions (one row per repeat and patient) and metrics per repeat."""

    oof: pd.DataFrame
    per_repeat: pd.DataFrame
    fit_seconds: list[float]
    histories: list[list[dict] | None]  # per fold, the model's ``history_`` where it keeps one
    extras: list[dict]  # per fold, what the caller's ``describe`` hook recorded

    @property
    def summary(self) -> pd.DataFrame:
        return aggregate(self.per_repeat)


# Set by a Ctrl-C handler (``stop_between_folds``): the CV stops after the fold in progress, so
# the interrupt never lands inside a library that would swallow or garble it.
STOP = threading.Event()


@contextlib.contextmanager
def stop_between_folds() -> Iterator[None]:
    """While active (main thread only), Ctrl-C asks cross-validation to stop after the current
    fold (raising ``KeyboardInterrupt`` there); a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    """The seed of fold ``fold`` of repeat ``repeat``: the one rule every CV of the project uses."""
    return seed * 1_000_003 + repeat * 1_000 + fold


@dataclass
class FoldOutcome:
    """What one fitted fold sends back: its out-of-fold rows, fit time, history and extras."""

    rows: list[tuple]  # (repeat, fold, patient_id, label, score, predicted)
    fit_seconds: float
    history: list[dict] | None
    extra: dict = field(default_factory=dict)


# ``describe(fitted, train_rows, val_rows)``: what a caller records of each fitted fold beside
# its predictions (a benchmark's instance AUC, a selection's choice), JSON-able when recorded.
Describe = Callable[[FoldFit, list[int], list[int]], dict]


def score_fold(model, bags, labels: np.ndarray, ids: list[str], fold: Fold,
               clinical: pd.DataFrame | None, seed: int, keep_model_seed: bool = False,
               describe: Describe | None = None) -> FoldOutcome:
    """Fit ``clone(model)`` on the fold's training patients and score its validation ones,
    seeded by :func:`fold_seed` unless ``keep_model_seed`` (a spec that fixes ``random_state``)."""
    position = {pid: i for i, pid in enumerate(ids)}
    train = [position[pid] for pid in fold.train_ids]
    val = [position[pid] for pid in fold.val_ids]
    fitted = fit_fold(model, bags, labels, train, val, clinical,
                      None if keep_model_seed else fold_seed(seed, fold.repeat, fold.fold))
    rows = [(fold.repeat, fold.fold, ids[i], int(labels[i]), float(score), int(predicted))
            for i, score, predicted in zip(val, fitted.scores, fitted.predictions, strict=True)]
    extra = {} if describe is None else describe(fitted, train, val)
    return FoldOutcome(rows, fitted.fit_seconds, fitted.history, extra)


@dataclass
class LocalFold:
    """The in-process fold task: a model and the bags already in memory."""

    model: object
    bags: list
    labels: np.ndarray
    ids: list[str]
    clinical: pd.DataFrame | None
    seed: int
    keep_model_seed: bool = False
    describe: Describe | None = None

    def __call__(self, fold: Fold) -> FoldOutcome:
        return score_fold(self.model, self.bags, self.labels, self.ids, fold, self.clinical,
                          self.seed, self.keep_model_seed, self.describe)


class FoldRecords:
    """A folder of finished folds, one JSON file each (``r{repeat}-f{fold}.json``): the one
    record format of every CV. A file that cannot be read is logged and its fold refitted."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, fold: Fold) -> Path:
        return self.folder / f"r{fold.repeat}-f{fold.fold}.json"

    def read(self, fold: Fold) -> FoldOutcome | None:
        path = self.path(fold)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return FoldOutcome([tuple(row) for row in saved["rows"]], saved["fit_seconds"],
                               saved["history"], saved.get("extra", {}))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("fold record %s is unreadable (%s); that fold runs again", path, error)
            return None

    def write(self, fold: Fold, outcome: FoldOutcome) -> None:
        # floats round-trip exactly through JSON
        atomic_write_json(self.path(fold), {"rows": outcome.rows, "fit_seconds": outcome.fit_seconds,
                                            "history": outcome.history, "extra": outcome.extra})


def run_folds(task: Callable[[Fold], FoldOutcome], folds: list[Fold],
              records: FoldRecords | None = None, executor=None,
              description: str = "cross-validation", progress: bool = True) -> list[FoldOutcome]:
    """Every fold's outcome, in fold order: read back from ``records`` where recorded, else
    ``task(fold)``, each recorded as it ends. Without an ``executor`` the tasks run here with
    the process's threads; with one (``milbench.execution``) they run as its tasks, with its
    thread count: in worker processes or on Ray when it is parallel (the task must then be
    picklable and load its bags where it runs), else here one after another. Results do not
    depend on where the folds ran. Ctrl-C under :func:`stop_between_folds` stops after the fold
    in progress."""
    outcomes: dict[int, FoldOutcome] = {}
    if records is not None:
        for index, fold in enumerate(folds):
            recorded = records.read(fold)
            if recorded is not None:
                outcomes[index] = recorded
    todo = [index for index in range(len(folds)) if index not in outcomes]

    def finish(index: int, outcome: FoldOutcome) -> None:
        outcomes[index] = outcome
        if records is not None:
            records.write(folds[index], outcome)

    with progress_bar(description, total=len(folds), completed=len(folds) - len(todo),
                      enabled=progress, unit="fold") as advance:
        if executor is not None and todo:
            for position, outcome in executor.map(task, [(folds[i],) for i in todo]):
                if STOP.is_set():
                    raise KeyboardInterrupt
                finish(todo[position], outcome)
                advance()
        else:
            for index in todo:
                if STOP.is_set():
                    raise KeyboardInterrupt
                finish(index, task(folds[index]))
                advance()
    return [outcomes[index] for index in range(len(folds))]


def cv_result(outcomes: list[FoldOutcome]) -> CVResult:
    """Out-of-fold table, per-repeat metrics and per-fold fit times, histories and extras."""
    rows = [row for outcome in outcomes for row in outcome.rows]
    oof = pd.DataFrame(rows, columns=["repeat", "fold", "patient_id", "label", "score", "predicted"])
    per_repeat = []
    for repeat, group in oof.groupby("repeat", sort=True):
        metrics = binary_metrics(group["label"], group["predicted"], group["score"])
        per_repeat.append({"repeat": int(repeat), **metrics})
    return CVResult(oof=oof, per_repeat=pd.DataFrame(per_repeat),
                    fit_seconds=[outcome.fit_seconds for outcome in outcomes],
                    histories=[outcome.history for outcome in outcomes],
                    extras=[outcome.extra for outcome in outcomes])


def cross_validate(
    model,
    bags: list[np.ndarray] | None,
    labels: np.ndarray,
    ids: list[str],
    folds: list[Fold],
    clinical: pd.DataFrame | None = None,
    seed: int = 0,
    description: str = "cross-validation",
    progress: bool = True,
    describe: Describe | None = None,
    records: Path | FoldRecords | None = None,
    executor=None,
    task: Callable[[Fold], FoldOutcome] | None = None,
    keep_model_seed: bool = False,
) -> CVResult:
    """Fit ``clone(model)`` on each fold's training patients and predict its validation ones
    (see the module docstring); ``describe`` adds what a caller records of each fitted fold.
    With ``records`` (a folder), each finished fold is saved there as it ends and a fold already
    recorded is read back instead of refitted: an interrupted run resumes to the same results.

    With an ``executor`` the folds run as its tasks (:func:`run_folds`); a parallel one runs
    ``task`` (picklable; it loads the bags where it runs and must give what :class:`LocalFold`
    gives here)."""
    parallel = executor is not None and executor.parallel
    if parallel and task is None:
        raise ValueError("a parallel executor needs a picklable fold task that loads its bags")
    if not parallel:  # the bags are here
        task = LocalFold(model, bags, np.asarray(labels, dtype=int), list(ids), clinical, seed,
                         keep_model_seed, describe)
    if records is not None and not isinstance(records, FoldRecords):
        records = FoldRecords(records)
    return cv_result(run_folds(task, folds, records, executor, description, progress))

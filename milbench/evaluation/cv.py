"""Repeated cross-validation of a bag model with out-of-fold predictions.

Each fold trains a fresh clone seeded from (seed, repeat, fold), so a fold's result does not depend
on which folds ran before it. Only the training patients' labels reach ``fit``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from milbench.core.metrics import aggregate, binary_metrics
from milbench.evaluation.splits import Fold
from milbench.io import atomic_write_json
from milbench.models.base import FoldFit, fit_fold
from milbench.progress import progress_bar


@dataclass
class CVResult:
    """Out-of-fold predictions (one row per repeat and patient) and metrics per repeat."""

    oof: pd.DataFrame
    per_repeat: pd.DataFrame
    fit_seconds: list[float]
    histories: list[list[dict] | None]  # per fold, the model's ``history_`` where it keeps one

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
    return seed * 1_000_003 + repeat * 1_000 + fold


@dataclass
class FoldOutcome:
    """What one fitted fold sends back: its out-of-fold rows, fit time and history."""

    rows: list[tuple]  # (repeat, fold, patient_id, label, score, predicted)
    fit_seconds: float
    history: list[dict] | None


def score_fold(model, bags, labels: np.ndarray, ids: list[str], fold: Fold,
               clinical: pd.DataFrame | None, seed: int,
               on_fold: Callable[[Fold, FoldFit, list[int], list[int]], None] | None = None
               ) -> FoldOutcome:
    """Fit ``clone(model)`` on the fold's training patients and score its validation ones."""
    position = {pid: i for i, pid in enumerate(ids)}
    train = [position[pid] for pid in fold.train_ids]
    val = [position[pid] for pid in fold.val_ids]
    fitted = fit_fold(model, bags, labels, train, val, clinical,
                      fold_seed(seed, fold.repeat, fold.fold))
    if on_fold is not None:
        on_fold(fold, fitted, train, val)
    rows = [(fold.repeat, fold.fold, ids[i], int(labels[i]), float(score), int(predicted))
            for i, score, predicted in zip(val, fitted.scores, fitted.predictions, strict=True)]
    return FoldOutcome(rows, fitted.fit_seconds, fitted.history)


def cross_validate(
    model,
    bags: list[np.ndarray],
    labels: np.ndarray,
    ids: list[str],
    folds: list[Fold],
    clinical: pd.DataFrame | None = None,
    seed: int = 0,
    description: str = "cross-validation",
    progress: bool = True,
    on_fold: Callable[[Fold, FoldFit, list[int], list[int]], None] | None = None,
    records: Path | None = None,
    executor=None,
    remote_fold: Callable[[Fold], FoldOutcome] | None = None,
) -> CVResult:
    """Fit ``clone(model)`` on each fold's training patients and predict its validation ones;
    ``on_fold(fold, fitted, train_rows, val_rows)`` sees each fitted fold (a benchmark reads
    the fitted model's logs there). With ``records`` (a folder), each finished fold is saved
    there as it ends (its out-of-fold rows, fit time and history) and a fold already recorded
    is read back instead of refitted: an interrupted run resumes to the same results.

    With a parallel ``executor`` (``milbench.execution``), the folds to fit run as its tasks:
    ``remote_fold(fold)`` (picklable; it loads the bags where it runs) must give what
    :func:`score_fold` gives here. Results do not depend on where the folds ran."""
    labels = np.asarray(labels, dtype=int)
    outcomes: dict[int, FoldOutcome] = {}

    def record_path(fold: Fold) -> Path | None:
        return None if records is None else records / f"r{fold.repeat}-f{fold.fold}.json"

    for index, fold in enumerate(folds):
        record = record_path(fold)
        if record is not None and record.is_file():
            saved = json.loads(record.read_text(encoding="utf-8"))
            outcomes[index] = FoldOutcome([tuple(row) for row in saved["rows"]],
                                          saved["fit_seconds"], saved["history"])
    todo = [index for index in range(len(folds)) if index not in outcomes]

    def finish(index: int, outcome: FoldOutcome) -> None:
        outcomes[index] = outcome
        record = record_path(folds[index])
        if record is not None:  # floats round-trip exactly through JSON
            atomic_write_json(record, {"rows": outcome.rows, "fit_seconds": outcome.fit_seconds,
                                       "history": outcome.history})

    with progress_bar(description, total=len(folds), completed=len(folds) - len(todo),
                      enabled=progress, unit="fold") as advance:
        if executor is not None and executor.parallel and todo:
            if remote_fold is None or on_fold is not None:
                raise ValueError("a parallel executor needs remote_fold, and cannot call on_fold")
            for position, outcome in executor.map(remote_fold, [(folds[i],) for i in todo]):
                if STOP.is_set():
                    raise KeyboardInterrupt
                finish(todo[position], outcome)
                advance()
        else:
            for index in todo:
                if STOP.is_set():
                    raise KeyboardInterrupt
                finish(index, score_fold(model, bags, labels, ids, folds[index], clinical, seed,
                                         on_fold))
                advance()
    ordered = [outcomes[index] for index in range(len(folds))]
    rows = [row for outcome in ordered for row in outcome.rows]
    oof = pd.DataFrame(rows, columns=["repeat", "fold", "patient_id", "label", "score", "predicted"])
    per_repeat = []
    for repeat, group in oof.groupby("repeat", sort=True):
        metrics = binary_metrics(group["label"], group["predicted"], group["score"])
        per_repeat.append({"repeat": int(repeat), **metrics})
    return CVResult(oof=oof, per_repeat=pd.DataFrame(per_repeat),
                    fit_seconds=[outcome.fit_seconds for outcome in ordered],
                    histories=[outcome.history for outcome in ordered])

"""The project's one torch training loop, used by every model that trains a network (D-MIL, the
digit CNN and VAE of the slide classifier, the semi-supervised instance learners, the cohort
autoencoder and backbone pretraining).

Each caller keeps what is its own (the network, the loss in ``step``, how an epoch's batches are
drawn, what ``evaluate`` measures); the loop owns the rest, written once:

* seeding: :func:`seeded` seeds torch inside a forked RNG state, so a fit depends on its seed
  alone and leaves the caller's global torch RNG as it was, and sets the intra-op threads;
* the epoch: train mode, ``zero_grad`` → loss → ``backward`` → ``step`` per batch, eval mode,
  one history record (epoch, learning rate, mean step loss, whatever ``evaluate`` returns);
* the plateau scheduler and early stopping on a monitored key, with the best epoch's weights
  restored at the end;
* a resumable checkpoint written atomically after every epoch.

Batches of row indices come from :func:`index_batches`; padded bag batches from
:mod:`milbench.models.collate`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from milbench.io import atomic_write


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: leave torch's setting), restored afterwards.

    The project's networks are small: a second thread gains little on an idle machine, and when
    another process holds a core, threads waiting on each other made a fit 10x slower (measured
    on 2 cores). One thread also keeps results independent of the machine's core count.
    """
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed: int, threads: int | None = None) -> Iterator[torch.Generator]:
    """Seed torch's global RNG with ``seed`` inside a forked RNG state and yield a CPU generator
    seeded the same way (for shuffling), with ``threads`` intra-op threads."""
    with torch.random.fork_rng(devices=[]), torch_threads(threads):
        torch.manual_seed(int(seed))
        yield torch.Generator().manual_seed(int(seed))


def index_batches(order, batch_size: int) -> list:
    """``order`` (a permutation, array or tensor) cut into batches of ``batch_size``; a trailing
    batch of one joins the previous batch (batch norm needs two samples, and one sample makes a
    noisy step)."""
    size = int(batch_size)
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        join = torch.cat if isinstance(last, torch.Tensor) else np.concatenate
        batches[-1] = join([batches[-1], last])
    return batches


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches over ``n`` rows (see :func:`index_batches`)."""
    return index_batches(torch.randperm(n, generator=generator), batch_size)


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` (a history key; lower is better) has not improved for ``patience``
    epochs, and restore the weights of the best epoch."""

    monitor: str
    patience: int


@dataclass
class TrainingResult:
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0  # the epoch whose weights the network holds at the end

    @property
    def n_epochs(self) -> int:
        return len(self.history)


def checkpoint_epochs(checkpoint: str | os.PathLike) -> int:
    """The epochs a :func:`train` checkpoint already holds (0 without one): where a resumed
    run's progress bar starts. Memory-mapped: the weights that :func:`train` loads anyway are
    not read here."""
    path = Path(checkpoint)
    if not path.is_file():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def train(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[object], torch.Tensor],
    batches: Callable[[int], Iterable],
    *,
    epochs: int,
    evaluate: Callable[[], dict] | None = None,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
    scheduler_monitor: str = "train_loss",
    early_stopping: EarlyStopping | None = None,
    checkpoint: str | os.PathLike | None = None,
    on_step: Callable[[int, float], None] | None = None,
    max_steps: int | None = None,
    phase: str | None = None,
    result: TrainingResult | None = None,
    average_last: int = 0,
) -> TrainingResult:
    """Train ``network`` for up to ``epochs`` epochs; the network ends in eval mode.

    ``batches(epoch)`` gives epoch ``epoch``'s batches (0-based), ``step(batch)`` the loss of one
    (a scalar tensor). After each epoch the network is put in eval mode and ``evaluate()``'s dict
    joins the history record (its keys win over the loop's ``train_loss``, the mean step loss).
    ``scheduler`` steps on ``scheduler_monitor``. With ``checkpoint``, the network, optimizer,
    history and torch RNG are saved after every epoch, and a later call resumes after the last
    saved epoch (identically when ``batches(epoch)`` depends on the epoch alone, not on a
    generator carried across epochs). ``phase`` labels the records; pass the previous
    ``result`` to continue its history across phases (two optimisers, a frozen then an
    unfrozen network). ``average_last`` > 0: the network ends with the mean of its weights at
    the end of each of the last that many epochs (stochastic weight averaging, by torch's
    ``AveragedModel``); it needs a fixed number of epochs, so not early stopping, and no
    checkpoint (the running average is not saved).
    """
    if average_last and (early_stopping is not None or checkpoint is not None):
        raise ValueError("average_last trains a fixed number of epochs: it does not go with "
                         "early_stopping or a checkpoint")
    averaged = AveragedModel(network) if average_last else None
    result = result if result is not None else TrainingResult()
    first_epoch = 0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        result.step_losses[:] = list(state["losses"])
        result.history[:] = list(state.get("history", []))
        first_epoch = int(state["epoch"])
        torch.set_rng_state(state["torch_rng"])
    best_value, best_state, stale = math.inf, None, 0
    for epoch in range(first_epoch, int(epochs)):
        network.train()
        epoch_losses = []
        for batch in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = step(batch)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
            result.step_losses.append(epoch_losses[-1])
            if on_step is not None:
                on_step(len(result.step_losses), epoch_losses[-1])
            if max_steps is not None and len(result.step_losses) >= max_steps:
                break
        network.eval()
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan}
        if phase is not None:
            record = {"phase": phase, **record}
        if evaluate is not None:
            record.update(evaluate())
        result.history.append(record)
        if scheduler is not None:
            scheduler.step(record[scheduler_monitor])
        if averaged is not None and epoch >= int(epochs) - int(average_last):
            averaged.update_parameters(network)
        if checkpoint is not None:
            payload = {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                       "losses": result.step_losses, "history": result.history,
                       "epoch": epoch + 1, "torch_rng": torch.get_rng_state()}
            atomic_write(checkpoint, lambda tmp, payload=payload: torch.save(payload, tmp))
        if max_steps is not None and len(result.step_losses) >= max_steps:
            break
        if early_stopping is not None:
            value = record[early_stopping.monitor]
            if value < best_value:
                best_value, result.best_epoch, stale = value, epoch + 1, 0
                best_state = copy.deepcopy(network.state_dict())
            else:
                stale += 1
                if stale >= int(early_stopping.patience):
                    break
    if best_state is not None:
        network.load_state_dict(best_state)
    elif averaged is not None and int(averaged.n_averaged):
        with torch.no_grad():
            for weight, mean in zip(network.parameters(), averaged.module.parameters(), strict=True):
                weight.copy_(mean)
        result.best_epoch = len(result.history)
    else:
        result.best_epoch = len(result.history)
    network.eval()
    return result

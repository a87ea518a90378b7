"""The one torch training loop: batches, seeding, early stopping with best-state restore, and
resume from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from milbench.training import EarlyStopping, index_batches, seeded, shuffled_batches, train


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_index_batches_cover_every_row_once_and_never_leave_a_batch_of_one(kind):
    order = np.random.default_rng(0).permutation(33)
    order = torch.from_numpy(order) if kind == "torch" else order
    batches = index_batches(order, 16)
    assert [len(b) for b in batches] == [16, 17]
    joined = np.concatenate([np.asarray(b) for b in batches])
    assert np.array_equal(joined, np.asarray(order))  # same rows, same order, none twice
    assert [len(b) for b in index_batches(order[:1], 16)] == [1]


def test_seeded_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7) as generator:
        first = (torch.rand(2), shuffled_batches(10, 4, generator))
    with seeded(7) as generator:
        second = (torch.rand(2), shuffled_batches(10, 4, generator))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


def regression_problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 3, generator=generator)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=generator)
    return inputs, targets


def fit(epochs, checkpoint=None, max_steps=None, early_stopping=None, evaluate=None, seed=0):
    inputs, targets = regression_problem()
    with seeded(seed):
        network = nn.Linear(3, 1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
        # Batches drawn from the epoch number alone, so a resumed run sees the same ones.
        result = train(
            network, optimizer,
            lambda rows: nn.functional.mse_loss(network(inputs[rows]).squeeze(-1), targets[rows]),
            lambda epoch: shuffled_batches(len(inputs), 8,
                                           torch.Generator().manual_seed(seed + epoch)),
            epochs=epochs, checkpoint=checkpoint, max_steps=max_steps,
            early_stopping=early_stopping, evaluate=evaluate)
    return network, result


def test_the_loss_falls_and_history_has_one_record_per_epoch():
    network, result = fit(epochs=6)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    assert len(result.step_losses) == 6 * 5
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 2
    assert result.best_epoch == 6 and not network.training


def fit_with_snapshots(monitored=(), **options):
    """Six epochs on the regression problem with a generator carried across epochs; the weights
    are snapshot after each epoch, and ``evaluate`` reports ``monitored`` as ``val_loss``."""
    values, snapshots = iter(monitored), []
    inputs, targets = regression_problem()
    with seeded(0) as generator:
        network = nn.Linear(3, 1)

        def evaluate():
            snapshots.append(network.weight.detach().clone())
            return {"val_loss": next(values)} if monitored else {}

        result = train(
            network, torch.optim.SGD(network.parameters(), lr=0.05),
            lambda rows: nn.functional.mse_loss(network(inputs[rows]).squeeze(-1), targets[rows]),
            lambda epoch: shuffled_batches(len(inputs), 8, generator),
            epochs=6, evaluate=evaluate, **options)
    return network, result, snapshots


def test_early_stopping_restores_the_best_epoch():
    # A monitored value that is best at epoch 2 and worse afterwards.
    network, result, snapshots = fit_with_snapshots(
        [3.0, 1.0, 2.0, 2.5, 4.0, 5.0], early_stopping=EarlyStopping("val_loss", patience=2))
    assert result.n_epochs == 4  # epochs 3 and 4 did not improve on epoch 2
    assert result.best_epoch == 2
    assert torch.equal(network.weight, snapshots[1])  # epoch 2's


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    straight, straight_result = fit(epochs=5)
    # The first attempt stops after 2 epochs' worth of steps (as if killed), then resumes.
    fit(epochs=5, checkpoint=tmp_path / "checkpoint.pt", max_steps=10)
    resumed, resumed_result = fit(epochs=5, checkpoint=tmp_path / "checkpoint.pt")
    assert torch.equal(straight.weight, resumed.weight)
    assert straight_result.step_losses == resumed_result.step_losses
    assert [r["epoch"] for r in resumed_result.history] == [1, 2, 3, 4, 5]


def test_average_last_ends_on_the_mean_of_the_last_epochs_weights():
    network, result, snapshots = fit_with_snapshots(average_last=3)
    torch.testing.assert_close(network.weight.detach(), torch.stack(snapshots[3:]).mean(dim=0))
    assert not torch.equal(network.weight.detach(), snapshots[-1])
    assert result.best_epoch == 6 and result.n_epochs == 6
    with pytest.raises(ValueError, match="early_stopping"):
        train(network, torch.optim.SGD(network.parameters(), lr=0.05), lambda rows: None,
              lambda epoch: [], epochs=2, average_last=1,
              early_stopping=EarlyStopping("val_loss", 2))

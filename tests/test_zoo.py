"""The MIL model zoo (D-MIL aggregations in milbench.models.pooling): every module overfits a
tiny set, ignores padding, and does what its architecture says (critical instance, instance
clustering, pseudo-bags, deep supervision). Order and padding invariance of the fitted models
are in the contract suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bag_fixtures import make_tiny_bags

from milbench.models import create_model
from milbench.models.bag_network import POOLINGS
from milbench.models.pooling import by_size, size_groups
from milbench.models.zoo_pooling import CLAMSB, DSMIL, DTFD, ZOO_POOLINGS, MiNetDS, TransMIL


@pytest.mark.parametrize("aggregation", list(ZOO_POOLINGS))  # the classic ones: test_dmil.py
def test_overfits_a_tiny_set(aggregation):
    bags, labels, _, _ = make_tiny_bags()
    model = create_model("dmil", aggregation=aggregation, validation_fraction=0, batch_size=4,
                         max_epochs=60, learning_rate=3e-3, random_state=0).fit(bags, labels)
    losses = [record["train_loss"] for record in model.history_]
    assert losses[-1] < 0.25 * losses[0]
    assert (model.predict(bags) == labels).all()
    for bag, scores in zip(bags, model.instance_scores(bags), strict=True):
        assert scores.shape == (len(bag),) and np.all(np.isfinite(scores))


def _batch(seed: int = 0, dim: int = 8):
    """Three bags of 2, 5 and 3 instances, padded to 5."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, dim, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return hidden, mask


@pytest.mark.parametrize("aggregation", list(POOLINGS))
def test_padding_never_reaches_a_real_bag(aggregation):
    torch.manual_seed(0)
    pool = POOLINGS[aggregation](8, 4, 0.0).eval()
    hidden, mask = _batch()
    pooled, weights = pool(hidden, mask)
    noisy = hidden.masked_fill(~mask.unsqueeze(-1), 1e3)
    pooled_noisy, weights_noisy = pool(noisy, mask)
    torch.testing.assert_close(pooled, pooled_noisy)
    torch.testing.assert_close(weights, weights_noisy)
    assert torch.all(weights[~mask] == 0)


def test_size_groups_keep_a_large_bag_apart_and_small_bags_together():
    assert size_groups([3, 40, 1044, 35, 2]) == [[2], [1, 3], [0, 4]]
    assert size_groups([5, 30, 2, 9]) == [[1, 3, 0, 2]]  # all small: one sub-batch


@pytest.mark.parametrize("aggregation", ["transformer_abmil", "transmil"])
def test_sub_batches_by_size_give_the_whole_batch_result(aggregation):
    """Bags of 150, 3, 40 and 1 instances (one with a hole, as instance dropout makes): the
    self-attention pools split the batch by size, and the result is the padded batch's."""
    torch.manual_seed(0)
    pool = POOLINGS[aggregation](8, 4, 0.0).eval()
    hidden = torch.randn(4, 150, 8)
    mask = torch.arange(150)[None] < torch.tensor([150, 3, 40, 1])[:, None]
    mask[2, 5] = False
    assert len(size_groups(mask.sum(1).tolist())) > 1
    pooled, weights = pool(hidden, mask)
    whole_pooled, whole_weights = pool._pool(hidden, mask)
    torch.testing.assert_close(pooled, whole_pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights, whole_weights, atol=1e-6, rtol=1e-4)
    assert torch.all(weights[~mask] == 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    # The same function works for any (hidden, mask) → (pooled, weights) pool.
    same = by_size(pool._pool, hidden[:2], mask[:2])
    torch.testing.assert_close(same[0], pooled[:2], atol=1e-5, rtol=1e-4)


def test_dsmil_attends_from_the_critical_instance_and_learns_its_logit():
    torch.manual_seed(0)
    pool = DSMIL(8, 4, 0.0)
    hidden, mask = _batch()
    pooled, _ = pool(hidden, mask)
    logits = pool.instance_classifier(hidden).squeeze(-1).masked_fill(~mask, -torch.inf)
    torch.testing.assert_close(pooled[:, -1], logits.max(dim=1).values)
    loss = pool.auxiliary_loss(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3))
    assert loss.item() > 0
    with pytest.raises(RuntimeError, match="training forward"):
        pool.auxiliary_loss(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3))


def test_clam_clusters_the_most_and_least_attended_instances():
    torch.manual_seed(0)
    pool = CLAMSB(8, 4, 0.0, k=1)
    hidden, mask = _batch()
    pool(hidden, mask)
    loss = pool.auxiliary_loss(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()  # it trains the class's instance classifier and the attention
    assert pool.instance_classifiers[1].weight.grad.abs().sum() > 0
    # A bag of one instance has no most-and-least pair: only the others count.
    pool(hidden[:1, :1], mask[:1, :1])
    assert pool.auxiliary_loss(torch.tensor([1.0]), torch.ones(1)) is None


def test_dtfd_pseudo_bags_are_random_in_training_and_fixed_at_prediction():
    torch.manual_seed(0)
    pool = DTFD(8, 4, 0.0, n_pseudo=2)
    hidden, mask = _batch()
    pool.eval()
    first, weights = pool(hidden, mask)
    torch.testing.assert_close(pool(hidden, mask)[0], first)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    pool.train()
    draws = {tuple(pool(hidden, mask)[1][1].detach().round(decimals=5).tolist()) for _ in range(8)}
    assert len(draws) > 1
    assert pool.auxiliary_loss(torch.ones(3), torch.ones(3)).item() > 0


def test_mi_net_ds_supervises_every_level():
    torch.manual_seed(0)
    pool = MiNetDS(8, 4, 0.0, widths=(6, 4))
    hidden, mask = _batch()
    pooled, shares = pool(hidden, mask)
    assert pooled.shape == (3, 2) and pool.pools_logits
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(3))
    pool.auxiliary_loss(torch.ones(3), torch.ones(3)).backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in pool.heads)


def test_transmil_class_token_attention_sums_to_one_over_instances():
    torch.manual_seed(0)
    pool = TransMIL(8, 4, 0.0, heads=2).eval()
    hidden, mask = _batch()
    _, weights = pool(hidden, mask)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))


def test_pool_params_are_checked_by_key():
    bags, labels, _, _ = make_tiny_bags()
    with pytest.raises(ValueError, match="unknown key 'head'.*heads, layers"):
        create_model("dmil", aggregation="transformer_abmil", pool_params={"head": 2}).fit(
            bags, labels)
    with pytest.raises(ValueError, match="unknown key 'k' for aggregation 'attention'; valid keys: none"):
        create_model("dmil", aggregation="attention", pool_params={"k": 2}).fit(bags, labels)
    model = create_model("dmil", aggregation="clam_sb", pool_params={"k": 1}, max_epochs=2,
                         random_state=0).fit(bags, labels)
    assert model.network_.pool.k == 1


def test_torchmil_peer_is_torchmils_own_abmil():
    bags, labels, _, _ = make_tiny_bags()
    model = create_model("torchmil_abmil", epochs=5, random_state=0).fit(bags, labels)
    assert type(model.network_).__module__.startswith("torchmil.")
    assert all(np.isclose(s.sum(), 1.0) for s in model.instance_scores(bags))


def test_pool_params_are_checked_when_the_config_loads():
    from milbench.config import ConfigError, load_config
    from milbench.models.spec import ModelSpec

    with pytest.raises(ValueError, match=r"model 'dmil': pool_params: unknown key 'headz' for "
                                         r"aggregation 'transmil'"):
        ModelSpec(name="dmil", params={"aggregation": "transmil", "pool_params": {"headz": 2}})
    with pytest.raises(ValueError, match=r"unknown key 'heads' for aggregation 'attention'; "
                                         r"valid keys: none"):
        ModelSpec(name="dmil", params={"pool_params": {"heads": 2}})  # default: attention
    configs = Path(__file__).resolve().parent.parent / "configs"
    with pytest.raises(ConfigError, match="unknown key 'headz'"):
        load_config(configs / "dmil.yaml", ["models.0.params.aggregation=transmil",
                                            "models.0.params.pool_params={headz: 2}"])

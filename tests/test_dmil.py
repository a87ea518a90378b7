"""Attention D-MIL: overfitting a tiny set, padding invariance, aggregations, clinical branch,
learning curves and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bag_fixtures import make_tiny_bags

from milbench.models.bag_network import AGGREGATIONS, DMILNetwork
from milbench.models.collate import pad_bags
from milbench.models.dmil import AttentionDMIL, network_settings
from milbench.models.pooling import CLASSIC_POOLINGS

torch.set_num_threads(1)

# No validation split, no dropout: a tiny set the network must memorise.
OVERFIT = dict(
    validation_fraction=0.0,
    dropout=0.0,
    max_epochs=30,
    learning_rate=1e-2,
    batch_size=4,
    embedding_width=32,
    bag_width=32,
    clinical_width=32,
    attention_dim=16,
)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_bags(n_bags=12, seed=0)


# D-MIL's own aggregations (the zoo's are in test_zoo.py; mi-Net's scores are probabilities).
@pytest.mark.parametrize("aggregation", list(CLASSIC_POOLINGS))
def test_overfits_tiny_set(tiny, aggregation):
    bags, labels, _, _ = tiny
    model = AttentionDMIL(aggregation=aggregation, random_state=0, **OVERFIT).fit(bags, labels)
    proba = model.predict_proba(bags)[:, 1]
    np.testing.assert_array_equal(model.predict(bags), labels)
    assert proba[labels == 1].min() > 0.8 and proba[labels == 0].max() < 0.2
    assert model.history_[-1]["train_loss"] < 0.1 * model.history_[0]["train_loss"]
    weights = model.instance_scores(bags)
    np.testing.assert_allclose([w.sum() for w in weights], 1.0, atol=1e-5)


def test_attention_finds_the_witness(tiny):
    bags, labels, _, witness_rows = tiny
    model = AttentionDMIL(random_state=0, **OVERFIT).fit(bags, labels)
    weights = model.instance_scores(bags)
    found = [
        int(np.argmax(w)) == row
        for w, row, y in zip(weights, witness_rows, labels, strict=True)
        if y
    ]
    assert np.mean(found) >= 5 / 6


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_network_ignores_padded_rows(aggregation, norm):
    """Garbage in padded positions changes neither logits nor the weights of real instances."""
    torch.manual_seed(0)
    network = DMILNetwork(5, 3, **network_settings(AttentionDMIL(aggregation=aggregation, norm=norm))).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 5)) for n in (2, 7, 4)]
    x, mask = pad_bags(bags)
    x, mask = torch.from_numpy(x), torch.from_numpy(mask)
    clinical = torch.from_numpy(rng.normal(size=(3, 3)).astype(np.float32))
    noisy = x.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), 5)
    with torch.no_grad():
        logits, weights = network(x, mask, clinical)
        noisy_logits, noisy_weights = network(noisy, mask, clinical)
        alone = [
            network(x[i : i + 1, : len(b)], mask[i : i + 1, : len(b)], clinical[i : i + 1])
            for i, b in enumerate(bags)
        ]
    torch.testing.assert_close(noisy_logits, logits)
    torch.testing.assert_close(noisy_weights[mask], weights[mask])
    assert torch.all(weights[~mask] == 0)
    for i, (alone_logit, alone_weights) in enumerate(alone):
        torch.testing.assert_close(alone_logit[0], logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            alone_weights[0], weights[i, : len(bags[i])], atol=1e-6, rtol=1e-5
        )


def test_clinical_branch_used_and_ablated(tiny):
    bags, labels, clinical, _ = tiny
    params = dict(random_state=0, max_epochs=5)
    with_clinical = AttentionDMIL(**params).fit(bags, labels, clinical)
    assert with_clinical.uses_clinical_
    assert with_clinical.network_.clinical_mlp is not None
    with pytest.raises(ValueError, match="clinical"):
        with_clinical.predict_proba(bags)  # fitted with the table, so it needs one
    # Changing the clinical inputs changes the prediction.
    moved = clinical.assign(lymph_count=clinical["lymph_count"] * 20)
    assert not np.allclose(
        with_clinical.predict_proba(bags, clinical), with_clinical.predict_proba(bags, moved)
    )
    ablated = AttentionDMIL(use_clinical=False, **params).fit(bags, labels, clinical)
    assert not ablated.uses_clinical_ and ablated.network_.clinical_mlp is None
    np.testing.assert_array_equal(
        ablated.predict_proba(bags, clinical), ablated.predict_proba(bags, moved)
    )
    with pytest.raises(ValueError, match="no clinical table"):
        AttentionDMIL(use_clinical=True, **params).fit(bags, labels)
    # Clinical inputs are standardised with log count, from the training bags.
    assert with_clinical.clinical_mean_[1] == pytest.approx(np.log(clinical["lymph_count"]).mean())


def test_history_early_stopping_and_scheduler(tiny):
    bags, labels, _, _ = tiny
    model = AttentionDMIL(
        random_state=1, max_epochs=30, patience=3, validation_fraction=0.34, lr_patience=0
    ).fit(bags, labels)
    keys = {
        "epoch",
        "lr",
        "train_loss",
        "train_balanced_accuracy",
        "val_loss",
        "val_balanced_accuracy",
    }
    assert all(keys <= set(record) for record in model.history_)
    val_losses = [record["val_loss"] for record in model.history_]
    assert model.best_epoch_ == int(np.argmin(val_losses)) + 1
    # Stopped after `patience` epochs without improvement (or ran out of epochs).
    assert model.n_epochs_ == min(30, model.best_epoch_ + 3)
    lrs = [record["lr"] for record in model.history_]
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    # The restored network is the best epoch's: its validation loss is the minimum.
    assert min(val_losses) <= val_losses[-1]


def test_reproducible_and_leaves_global_rng_alone(tiny):
    bags, labels, clinical, _ = tiny
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    first = AttentionDMIL(random_state=5, max_epochs=5).fit(bags, labels, clinical)
    assert torch.rand(1) == expected  # fit ran under a forked RNG
    assert torch.get_num_threads() == threads  # its single thread was given back
    second = AttentionDMIL(random_state=5, max_epochs=5).fit(bags, labels, clinical)
    np.testing.assert_array_equal(
        first.decision_function(bags, clinical), second.decision_function(bags, clinical)
    )
    other = AttentionDMIL(random_state=6, max_epochs=5).fit(bags, labels, clinical)
    assert not np.allclose(
        first.decision_function(bags, clinical), other.decision_function(bags, clinical)
    )


def test_no_batch_of_one():
    model = AttentionDMIL(batch_size=4)
    batches = model._batches(np.arange(9))
    assert [len(b) for b in batches] == [4, 5]
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(9))
    with pytest.raises(ValueError, match="batch_size"):
        AttentionDMIL(batch_size=1).fit(*make_tiny_bags()[:2])


def test_invalid_parameters(tiny):
    bags, labels, _, _ = tiny
    with pytest.raises(ValueError, match="aggregation"):
        AttentionDMIL(aggregation="sum").fit(bags, labels)
    with pytest.raises(ValueError, match="norm"):
        AttentionDMIL(norm="group").fit(bags, labels)
    with pytest.raises(ValueError, match="torch_threads"):
        AttentionDMIL(torch_threads=0).fit(bags, labels)
    with pytest.raises(ValueError, match="instance_dropout"):
        AttentionDMIL(instance_dropout=1.0).fit(bags, labels)


def test_instance_dropout_hides_real_instances_only_and_never_a_whole_bag():
    _, mask = pad_bags([np.zeros((n, 2)) for n in (1, 2, 5, 40)])
    mask = torch.from_numpy(mask)
    generator = torch.Generator().manual_seed(0)
    inputs = AttentionDMIL(instance_dropout=0.5)._inputs()
    draws = [inputs.drop_instances(mask, generator) for _ in range(200)]
    for kept in draws:
        assert not (kept & ~mask).any()  # padding stays hidden
        assert kept.any(dim=1).all()  # every bag keeps at least one instance
    share = torch.stack(draws)[:, 3].float().mean()  # the 40-instance bag
    assert 0.45 < share < 0.55
    assert AttentionDMIL()._inputs().drop_instances(mask, generator) is mask  # off by default


def test_instance_dropout_trains_and_still_overfits(tiny):
    bags, labels, _, _ = tiny
    model = AttentionDMIL(random_state=0, instance_dropout=0.3, **{**OVERFIT, "max_epochs": 60})
    model.fit(bags, labels)
    np.testing.assert_array_equal(model.predict(bags), labels)
    plain = AttentionDMIL(random_state=0, **OVERFIT).fit(bags, labels)
    assert not np.allclose(model.decision_function(bags), plain.decision_function(bags))


def test_pca_is_fitted_on_training_instances_and_sizes_the_network():
    bags, labels, clinical, _ = make_tiny_bags(n_features=6)
    model = AttentionDMIL(pca_components=3, max_epochs=3, random_state=0).fit(bags, labels, clinical)
    assert model.transform_.n_components_ == 3
    assert model.transform_.scaler_.n_samples_seen_ == sum(len(b) for b in bags)
    assert model.predict_proba(bags, clinical).shape == (len(bags), 2)
    assert AttentionDMIL(scale=False, max_epochs=2).fit(bags, labels).transform_ is None


def test_gated_fusion_is_a_convex_mix_of_two_heads(tiny):
    """The fused logit is g * image + (1 - g) * clinical with g in (0, 1) per patient; the gate
    starts leaning on the clinical head; padding changes nothing."""
    torch.manual_seed(0)
    network = DMILNetwork(5, 3, **network_settings(AttentionDMIL(fusion="gated"))).eval()
    rng = np.random.default_rng(1)
    bags = [rng.normal(size=(n, 5)) for n in (2, 6, 3)]
    x, mask = (torch.from_numpy(a) for a in pad_bags(bags))
    clinical = torch.from_numpy(rng.normal(size=(3, 3)).astype(np.float32))
    noisy = x.clone()
    noisy[~mask] = 1e3
    with torch.no_grad():
        fused, _, (image, clinical_logit, gate) = network.forward_with_experts(x, mask, clinical)
        noisy_fused, _ = network(noisy, mask, clinical)
    torch.testing.assert_close(fused, gate * image + (1 - gate) * clinical_logit)
    torch.testing.assert_close(noisy_fused, fused)
    torch.testing.assert_close(gate, torch.full((3,), float(torch.sigmoid(torch.tensor(-2.0)))))


def test_gated_fusion_trains_overfits_and_reports_gates(tiny):
    bags, labels, clinical, _ = tiny
    # Clinical attributes that carry no label here; the bags do.
    noise = np.random.default_rng(9)
    clinical = clinical.assign(age=noise.normal(65, 10, len(bags)),
                               lymph_count=np.exp(noise.normal(2.5, 0.3, len(bags))))
    model = AttentionDMIL(fusion="gated", random_state=0, **{**OVERFIT, "max_epochs": 60})
    model.fit(bags, labels, clinical)
    np.testing.assert_array_equal(model.predict(bags, clinical), labels)
    gates = model.fusion_gates(bags, clinical)
    assert gates.shape == (len(bags),) and ((gates > 0) & (gates < 1)).all()
    # Only the images can explain the labels: the image head gains weight from its initial 0.12.
    assert gates.mean() > 0.2
    again = AttentionDMIL(fusion="gated", random_state=0, **{**OVERFIT, "max_epochs": 60})
    np.testing.assert_array_equal(again.fit(bags, labels, clinical).predict_proba(bags, clinical),
                                  model.predict_proba(bags, clinical))
    with pytest.raises(ValueError, match="fusion must be one of"):
        AttentionDMIL(fusion="sum").fit(bags, labels, clinical)
    concat = AttentionDMIL(random_state=0, max_epochs=2).fit(bags, labels, clinical)
    with pytest.raises(ValueError, match="gated fusion"):
        concat.fusion_gates(bags, clinical)


@pytest.mark.parametrize("aggregation", ["attention", "max", "transmil"])
def test_mean_skip_adds_the_instance_mean_and_ignores_padding(aggregation):
    torch.manual_seed(0)
    settings = network_settings(AttentionDMIL(aggregation=aggregation, mean_skip=True))
    network = DMILNetwork(5, 0, **settings).eval()
    plain = DMILNetwork(5, 0, **{**settings, "mean_skip": False})
    assert network.bag_mlp[0].in_features == plain.bag_mlp[0].in_features + network.embedding_dim
    rng = np.random.default_rng(0)
    x, mask = (torch.from_numpy(a) for a in pad_bags([rng.normal(size=(n, 5)) for n in (2, 7)]))
    noisy = x.clone()
    noisy[~mask] = 1e3
    with torch.no_grad():
        torch.testing.assert_close(network(noisy, mask)[0], network(x, mask)[0])
        alone = network(x[:1, :2], mask[:1, :2])[0]
    torch.testing.assert_close(alone[0], network(x, mask)[0][0], atol=1e-5, rtol=1e-5)


def test_mean_skip_trains_and_needs_a_pooled_vector(tiny):
    bags, labels, _, _ = tiny
    model = AttentionDMIL(mean_skip=True, random_state=0, **OVERFIT).fit(bags, labels)
    np.testing.assert_array_equal(model.predict(bags), labels)
    with pytest.raises(ValueError, match="mean_skip"):
        AttentionDMIL(aggregation="mi_net", mean_skip=True).fit(bags, labels)


def test_embedding_widths_one_per_layer(tiny):
    bags, labels, _, _ = tiny
    model = AttentionDMIL(embedding_layers=3, embedding_width=[32, 16, 8], max_epochs=2,
                          random_state=0).fit(bags, labels)
    linears = [m for m in model.network_.embed if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [32, 16, 8]
    assert model.network_.pool.scores.attention_v.in_features == 8
    with pytest.raises(ValueError, match="embedding_width: 2 widths"):
        AttentionDMIL(embedding_layers=3, embedding_width=[32, 16]).fit(bags, labels)


def test_weight_averaging_over_the_last_epochs(tiny):
    bags, labels, _, _ = tiny
    params = {**OVERFIT, "max_epochs": 40}
    averaged = AttentionDMIL(swa_epochs=10, random_state=0, **params).fit(bags, labels)
    again = AttentionDMIL(swa_epochs=10, random_state=0, **params).fit(bags, labels)
    last = AttentionDMIL(random_state=0, **params).fit(bags, labels)
    np.testing.assert_array_equal(averaged.decision_function(bags), again.decision_function(bags))
    assert not np.allclose(averaged.decision_function(bags), last.decision_function(bags))
    np.testing.assert_array_equal(averaged.predict(bags), labels)  # the average still fits
    assert averaged.n_epochs_ == 40
    for bad, message in [({"validation_fraction": 0.2}, "validation_fraction 0"),
                         ({"norm": "batch"}, "batch"), ({"swa_epochs": 41}, "swa_epochs")]:
        with pytest.raises(ValueError, match=message):
            AttentionDMIL(**{**params, "swa_epochs": 10, **bad}).fit(bags, labels)


@pytest.mark.parametrize("aggregation", ["attention", "gated_attention", "mean_std"])
def test_a_network_pickled_before_the_poolings_moved_loads_and_predicts_the_same(aggregation):
    import pickle

    settings = network_settings(AttentionDMIL(aggregation=aggregation))
    network = DMILNetwork(6, 0, **settings).eval()
    x, mask = (torch.from_numpy(a) for a in pad_bags(
        [np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
         for seed, n in enumerate((3, 5))]))
    expected = network(x, mask)
    # The old layout: the attention layers were the network's own, and it had no pool.
    old = pickle.loads(pickle.dumps(network))
    pool = old._modules.pop("pool")
    if hasattr(pool, "scores"):
        for name in ("attention_v", "attention_u", "attention_w"):
            if pool.scores._modules.get(name) is not None:
                old._modules[name] = pool.scores._modules[name]
    old._modules["pool"] = None
    loaded = pickle.loads(pickle.dumps(old))
    assert isinstance(loaded.pool, type(network.pool))
    for got, want in zip(loaded(x, mask), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_network_computes_its_own_loss_with_the_experts_terms():
    network = DMILNetwork(6, 3, **network_settings(AttentionDMIL(fusion="gated"))).eval()
    x, mask = (torch.from_numpy(a) for a in pad_bags(
        [np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
         for seed, n in enumerate((3, 5))]))
    clinical = torch.from_numpy(np.random.default_rng(9).normal(size=(2, 3)).astype(np.float32))
    targets, weights = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0])
    loss = network.compute_loss(x, mask, clinical, targets, weights, expert_loss_weight=0.5)
    fused, _, (image, clinical_logit, _) = network.forward_with_experts(x, mask, clinical)

    def bce(logits):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")

    expected = (weights * (bce(fused) + 0.5 * bce(image) + 0.5 * bce(clinical_logit))).mean()
    torch.testing.assert_close(loss, expected)
    assert network.compute_loss(x, mask, clinical, targets, weights) < loss  # no expert terms

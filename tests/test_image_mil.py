"""The end-to-end image-bag model: it learns from pixels, its mixture-of-experts gate is a convex
weight per patient, its augmentation keeps images intact, and a run refuses it without a pixels
store. (The contract suite covers order and padding invariance on the tiny preset at 32 px.)"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from milbench.models import create_model
from milbench.models.images import augment, side_of

SIDE = 16


def _image_bags(n_bags: int = 12, seed: int = 0):
    """Bags of random dark 16 px images; tumoral bags hold a bright square in half their images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_bags) % 2
    bags = []
    for label in labels:
        size = int(rng.integers(3, 7))
        images = rng.integers(0, 120, size=(size, 3, SIDE, SIDE)).astype(np.uint8)
        if label:
            images[: max(1, size // 2), 0, 4:12, 4:12] = 250
        bags.append(images.reshape(size, -1))
    clinical = pd.DataFrame({"age": rng.normal(65, 10, n_bags),
                             "lymph_count": np.exp(rng.normal(2.0 + labels, 0.3)),
                             "male": rng.integers(0, 2, n_bags).astype(float)})
    return bags, labels, clinical


def _model(**params):
    settings = {"backbone": "conv_ae", "latent": 64, "max_epochs": 15, "validation_fraction": 0,
                "batch_size": 4, "learning_rate": 1e-3, "random_state": 0, "device": "cpu"}
    return create_model("image_mil", **{**settings, **params})


def test_overfits_a_tiny_set_from_pixels():
    bags, labels, _ = _image_bags()
    model = _model().fit(bags, labels)
    losses = [record["train_loss"] for record in model.history_]
    assert losses[-1] < 0.5 * losses[0]
    assert all(record["train_images_per_s"] > 0 for record in model.history_)
    assert "throughput" not in str(vars(model))  # the counter lives for the fit only
    assert (model.predict(bags) == labels).all()
    weights = model.instance_scores(bags)
    assert all(np.isclose(w.sum(), 1.0) for w in weights)


def test_mixture_of_experts_gate_is_a_convex_weight_per_patient():
    bags, labels, clinical = _image_bags()
    model = _model(fusion="mixture_of_experts", max_epochs=3).fit(bags, labels, clinical)
    gates = model.fusion_gates(bags, clinical)
    assert gates.shape == (len(bags),) and np.all((gates > 0) & (gates < 1))
    # The fused logit is the gate's convex combination of the two experts' logits.
    x, mask, clinical_rows = model._inputs().tensors(
        bags, model._clinical_inputs(clinical, len(bags)), np.arange(len(bags)))
    with torch.no_grad():
        fused, _, (image, clinical_logit, gate) = model.network_.forward_with_experts(
            x, mask, clinical_rows)
    torch.testing.assert_close(fused, gate * image + (1 - gate) * clinical_logit)
    np.testing.assert_allclose(gate.numpy(), gates, rtol=1e-6)


def test_augmentation_flips_and_turns_whole_images():
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(20, 3 * 8 * 8), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    out = augment(pixels, 8, 0.0, generator)
    assert out.dtype == torch.uint8 and out.shape == pixels.shape
    for before, after in zip(pixels.view(-1, 3, 8, 8), out.view(-1, 3, 8, 8), strict=True):
        # Without stain jitter, each image is one of its 8 flips/rotations.
        variants = [torch.rot90(image, k, dims=(-2, -1)) for image in (before, before.flip(-1))
                    for k in range(4)]
        assert any(torch.equal(after, variant) for variant in variants)
    jittered = augment(pixels, 8, 0.1, torch.Generator().manual_seed(0))
    assert not torch.equal(jittered, out)


def test_bags_must_be_pixels_store_rows():
    bags, labels, _ = _image_bags()
    with pytest.raises(ValueError, match="pixels store"):
        _model().fit([bag.astype(np.float32) for bag in bags], labels)
    with pytest.raises(ValueError, match="3 x S x S"):
        side_of(100)
    assert side_of(3 * 32 * 32) == 32
    with pytest.raises(ValueError, match="backbone"):
        _model(backbone="alexnet").fit(bags, labels)
    with pytest.raises(ValueError, match="fusion"):
        _model(fusion="gated").fit(bags, labels)


def test_run_refuses_image_mil_without_a_pixels_store(tmp_path):
    from milbench.config import load_config
    from milbench.preflight import check_features

    path = tmp_path / "images.yaml"
    path.write_text(
        "name: images\n"
        "data: {synthetic: {preset: tiny}}\n"
        "features: {extractor: autoencoder_demo64}\n"
        "models:\n"
        "  - {name: image_mil}\n"
        "  - {name: image_mil, label: on_pixels, features: {kind: pixels, input_size: 32}}\n")
    problems = check_features(load_config(path))
    assert len(problems) == 1 and "'image_mil'" in problems[0] and "pixels" in problems[0]


@pytest.mark.e2e
def test_a_run_trains_image_mil_on_the_pixels_store(tmp_path):
    """The whole run: the pixels store is built once, image_mil reads it (metrics and the store
    record say so) beside the clinical baseline, and its instance scores reach the run."""
    import json
    from pathlib import Path

    from milbench.config import load_config
    from milbench.pipeline import run_pipeline

    configs = Path(__file__).resolve().parent.parent / "configs"
    models = ("[{name: clinical_logreg}, {name: image_mil, features: {kind: pixels, input_size: 32},"
              " params: {backbone: conv_ae, latent: 64, max_epochs: 2, validation_fraction: 0,"
              " fusion: mixture_of_experts}}]")
    config = load_config(configs / "image_mil.yaml", [
        f"models={models}", "features.extractor=none", "data.synthetic.preset=tiny",
        "evaluation.n_splits=2", "evaluation.n_repeats=1", "evaluation.stratify=[]",
        f"workdir={tmp_path / 'work'}", "submission.enabled=false"])
    outcome = run_pipeline(config, progress=False)
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv").set_index("model")
    assert metrics.loc["image_mil", "features"] == "pixels"
    stores = json.loads((outcome.run_dir / "feature_stores.json").read_text())
    assert [store["models"] for store in stores.values()] == [["image_mil"]]
    oof = pd.read_csv(outcome.run_dir / "models" / "image_mil" / "oof.csv")
    assert len(oof) == 9 and oof["score"].between(0, 1).all()
    # The mixture of experts reports each test patient's weight on the image expert.
    test = pd.read_csv(outcome.run_dir / "models" / "image_mil" / "test_predictions.csv")
    assert test["image_gate"].between(0, 1, inclusive="neither").all()
    clinical = pd.read_csv(outcome.run_dir / "models" / "clinical_logreg" / "test_predictions.csv")
    assert "image_gate" not in clinical.columns


def _reconstruction_error(model, bags) -> float:
    """The fitted encoder's decoder error on ``bags`` (the loss it adds under autograd)."""
    encoder = model.network_.embed[0]
    encoder.eval()
    with torch.enable_grad():
        encoder(torch.from_numpy(np.concatenate(bags)))
    error, encoder.reconstruction_loss = float(encoder.reconstruction_loss.detach()), None
    return error


def test_autoencoder_in_the_loop_learns_to_reconstruct():
    bags, labels, _ = _image_bags()
    # Flat-coloured images (one random colour each): an autoencoder can learn to redraw them.
    rng = np.random.default_rng(2)
    bags = [np.broadcast_to(rng.integers(0, 256, (len(bag), 3, 1, 1), dtype=np.uint8),
                            (len(bag), 3, SIDE, SIDE)).reshape(len(bag), -1) for bag in bags]
    trained = _model(reconstruction_weight=5.0, max_epochs=30, augment=False).fit(bags, labels)
    ignored = _model(reconstruction_weight=1e-9, max_epochs=30, augment=False).fit(bags, labels)
    assert _reconstruction_error(trained, bags) < 0.5 * _reconstruction_error(ignored, bags)
    # The last step's loss is not kept: the fitted model pickles.
    assert trained.network_.embed[0].reconstruction_loss is None
    restored = pickle.loads(pickle.dumps(trained))
    np.testing.assert_allclose(restored.decision_function(bags), trained.decision_function(bags))
    with pytest.raises(ValueError, match="conv_ae"):
        _model(backbone="resnet18", reconstruction_weight=1.0).fit(bags, labels)


def test_two_phase_schedule_freezes_the_classifier_during_warmup():
    bags, labels, clinical = _image_bags()
    two_phase = {"schedule": "two_phase", "reconstruction_weight": 1.0, "warmup_epochs": 2,
                 "max_epochs": 2, "encoder_learning_rate": 1e-3}
    # Only the encoder's optimiser steps in the warmup: the classifier's rate changes nothing.
    slow = _model(**two_phase, learning_rate=1e-6).fit(bags, labels, clinical)
    fast = _model(**two_phase, learning_rate=1e-1).fit(bags, labels, clinical)
    np.testing.assert_array_equal(slow.decision_function(bags, clinical),
                                  fast.decision_function(bags, clinical))
    assert {record["trains"] for record in slow.history_} == {"encoder"}
    # Joint training steps the classifier too, so there the rate matters.
    joint = {"reconstruction_weight": 1.0, "max_epochs": 2, "encoder_learning_rate": 1e-3}
    assert not np.array_equal(
        _model(**joint, learning_rate=1e-6).fit(bags, labels, clinical).decision_function(
            bags, clinical),
        _model(**joint, learning_rate=1e-1).fit(bags, labels, clinical).decision_function(
            bags, clinical))
    # Then phases alternate which part trains, named in the history.
    alternating = _model(**{**two_phase, "max_epochs": 6, "phase_epochs": 2}).fit(
        bags, labels, clinical)
    assert [(r["phase"], r["trains"]) for r in alternating.history_] == [
        ("warmup", "encoder"), ("warmup", "encoder"), ("alternating", "classifier"),
        ("alternating", "classifier"), ("alternating", "encoder"), ("alternating", "encoder")]


def test_image_mil_is_dmil_given_its_own_parts():
    """image_mil is D-MIL's estimator given its inputs, network and schedule (and its parameter
    checks): it overrides none of D-MIL's training or prediction code."""
    from milbench.models.dmil import AttentionDMIL
    from milbench.models.image_mil import ImageMIL

    overridden = {name for name, value in vars(ImageMIL).items()
                  if callable(value) and hasattr(AttentionDMIL, name)}
    assert overridden == {"__init__", "_validate_params", "_inputs", "_network", "_schedule"}
    parts = ImageMIL(device="cpu", augment=False)
    parts.input_size_ = 8
    inputs = parts._inputs()
    assert inputs.scores_training_bags is False and inputs.device.type == "cpu"
    assert parts._network(0, 3).has_encoder and not AttentionDMIL()._network(4, 3).has_encoder

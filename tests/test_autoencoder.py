"""The convolutional autoencoder: shapes, loss falls, resumable training, cohort features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from milbench.training import checkpoint_epochs
from preprocessing.autoencoder import (
    ConvAutoencoder,
    fit_cohort_autoencoder,
    latent_grid,
    train_autoencoder,
)
from preprocessing.extract import extract_features
from preprocessing.toy import draw_smear, write_toy_cohort


def _images(count=8, size=32):
    rng = np.random.default_rng(0)
    stack = np.stack([draw_smear(rng, size)[0] for _ in range(count)])
    return torch.from_numpy(stack).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize(("size", "latent", "shape"), [
    (224, 8192, (128, 8, 8)), (224, 4096, (64, 8, 8)), (64, 1024, (64, 4, 4)), (32, 96, (24, 2, 2)),
])
def test_latent_layout(size, latent, shape):
    assert latent_grid(size, latent) == (shape[0], shape[1])
    if size <= 64:
        model = ConvAutoencoder(size, latent).eval()
        images = torch.rand(2, 3, size, size)
        codes = model.encode(images)
        assert codes.shape == (2, latent)
        # In eval mode an image's code does not depend on the batch it came in.
        torch.testing.assert_close(model.encode(images[1:]), codes[1:])
        decoded = model(images)
        assert decoded.shape == images.shape
        assert decoded.min() >= 0 and decoded.max() <= 1  # pixels, through the sigmoid


def test_blocks_follow_spec():
    model = ConvAutoencoder(64, 1024)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.encoder) == 4
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model.encoder) == 4
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder) == 7
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvAutoencoder(50, 64)


def test_loss_falls_and_is_deterministic():
    images = _images()
    loader = torch.utils.data.DataLoader(images, batch_size=4, shuffle=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ConvAutoencoder(32, 128)
        runs.append(train_autoencoder(model, loader, epochs=15, learning_rate=1e-2, seed=0))
    losses = runs[0]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:2]), losses
    assert runs[0] == runs[1]


def test_training_resumes_from_checkpoint(tmp_path):
    images = _images(4)

    def loader():  # shuffled: the resumed run must replay the same epoch orders
        return torch.utils.data.DataLoader(images, batch_size=2, shuffle=True,
                                           generator=torch.Generator())

    torch.manual_seed(0)
    straight = train_autoencoder(ConvAutoencoder(32, 64), loader(), epochs=3, seed=0)
    torch.manual_seed(0)
    model = ConvAutoencoder(32, 64)
    train_autoencoder(model, loader(), epochs=2, seed=0, checkpoint=tmp_path / "ckpt.pt")
    assert checkpoint_epochs(tmp_path / "ckpt.pt") == 2
    assert checkpoint_epochs(tmp_path / "absent.pt") == 0
    torch.manual_seed(1)  # a fresh process would start from unrelated weights
    resumed = train_autoencoder(ConvAutoencoder(32, 64), loader(), epochs=3, seed=0,
                                checkpoint=tmp_path / "ckpt.pt")
    np.testing.assert_allclose(resumed, straight, rtol=1e-5)


def test_a_resumed_training_bar_starts_after_the_checkpoint(tmp_path, progress_bars):
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 3 * 32 * 32), dtype=np.uint8)
    settings = {"input_size": 32, "latent": 64, "batch_size": 4, "progress": False}
    fit_cohort_autoencoder(lambda: pixels, tmp_path, epochs=1, **settings)
    (tmp_path / "autoencoder.pt").unlink()  # as if stopped after the checkpoint's one epoch
    fit_cohort_autoencoder(lambda: pixels, tmp_path, epochs=3, **settings)
    assert progress_bars == [(1 * 6, 0), (3 * 6, 6)]  # the second bar resumes after one epoch
    assert checkpoint_epochs(tmp_path / "checkpoint.pt") == 3


def test_cohort_features_record_test_use(tmp_path):
    cohort = write_toy_cohort(tmp_path / "toy", n_patients=3, images_per_patient=2, size=64)
    config = {"kind": "autoencoder", "name": "conv_ae", "input_size": 32, "latent": 64,
              "epochs": 2, "train_batch_size": 4}
    store = extract_features(cohort, config, tmp_path / "cache", progress=False, num_workers=0)
    assert [b.shape for b in store.bags(cohort)] == [(2, 64)] * 3
    assert store.manifest["uses_test_images"] is True
    (run,) = (tmp_path / "cache" / "autoencoders").iterdir()
    record = json.loads((run / "train.json").read_text())
    assert record["uses_test_images"] is True and record["n_images"] == 6
    assert record["test_patients"] == ["P3"]
    assert (run / "reconstructions.png").stat().st_size > 0
    again = extract_features(cohort, config, tmp_path / "cache", progress=False, num_workers=0)
    np.testing.assert_array_equal(again.features(), store.features())


def test_autoencoders_train_on_one_pixels_store(tmp_path):
    """Images are decoded and preprocessed once into a pixels store; autoencoders of that
    preprocessing train on it and encode it, and their features are the encoder's output on it."""
    from preprocessing.autoencoder import ConvAutoencoder, Encoder
    from preprocessing.store import FeatureStore

    cohort = write_toy_cohort(tmp_path / "toy", n_patients=3, images_per_patient=2, size=64)
    base = {"kind": "autoencoder", "name": "conv_ae", "input_size": 32, "epochs": 1,
            "train_batch_size": 4}
    small = extract_features(cohort, {**base, "latent": 64}, tmp_path / "cache",
                             progress=False, num_workers=0)
    extract_features(cohort, {**base, "latent": 96}, tmp_path / "cache", progress=False,
                     num_workers=0)
    stores = [FeatureStore(root) for root in (tmp_path / "cache" / "features").iterdir()]
    pixels = [store for store in stores if store.config["kind"] == "pixels"]
    assert len(stores) == 3 and len(pixels) == 1
    assert small.config["pixels_key"] == pixels[0].key
    model = ConvAutoencoder(32, 64)
    weights = tmp_path / "cache" / "autoencoders" / small.config["autoencoder_key"]
    model.load_state_dict(torch.load(weights / "autoencoder.pt", weights_only=True))
    images = torch.from_numpy(np.array(pixels[0].features())).view(-1, 3, 32, 32) / 255.0
    with torch.inference_mode():
        expected = Encoder(model).eval()(images).numpy()
    np.testing.assert_allclose(small.features(), expected, rtol=1e-5, atol=1e-6)
    # The same features whether the pixels store had to be built first or already existed.
    extract_features(cohort, {"kind": "pixels", "input_size": 32}, tmp_path / "again",
                     progress=False, num_workers=0)
    again = extract_features(cohort, {**base, "latent": 64}, tmp_path / "again", progress=False,
                             num_workers=0)
    np.testing.assert_array_equal(again.features(), small.features())

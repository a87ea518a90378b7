"""Feature store: keyed caching, resume after interruption, bag alignment, corrupt images."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from preprocessing.extract import ExtractorConfig, extract_features, load_extractor_config
from preprocessing.images import CorruptImageError
from preprocessing.store import FeatureStore, StoreIntegrityError
from preprocessing.toy import write_toy_cohort
from preprocessing.transforms import BagTransform

CONFIG = {"kind": "backbone", "name": "resnet18", "weights": None, "input_size": 32}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_patients=4, images_per_patient=3,
                            size=64, n_test=1)


def _model_stores(cache) -> list:
    """The stores under ``cache`` other than the pixels stores extractors read."""
    roots = sorted((cache / "features").iterdir())
    return [root for root in roots
            if json.loads((root / "manifest.json").read_text())["config"]["kind"] != "pixels"]


def _extract(cohort, cache, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("commit_seconds", 0.0)  # commit every batch
    return extract_features(cohort, CONFIG, cache, progress=False, batch_size=2, **kwargs)


def test_bags_aligned_with_patients(cohort, tmp_path):
    store = _extract(cohort, tmp_path)
    bags = store.bags(cohort)
    assert [b.shape for b in bags] == [(3, 512)] * 4
    assert all(b.dtype == np.float32 for b in bags)
    reversed_cohort = cohort.subset(cohort.ids[::-1])
    np.testing.assert_array_equal(store.bags(reversed_cohort)[0], bags[-1])
    assert store.is_complete and store.manifest["uses_test_images"] is False
    # Second call: same store, no recomputation.
    stamp = (store.root / "complete.json").stat().st_mtime_ns
    again = _extract(cohort, tmp_path)
    assert again.root == store.root
    assert (again.root / "complete.json").stat().st_mtime_ns == stamp


def test_resume_after_interruption_is_identical(cohort, tmp_path):
    reference = _extract(cohort, tmp_path / "straight").features().copy()

    def interrupt(rows_done):
        if rows_done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _extract(cohort, tmp_path / "resumed", on_batch=interrupt)
    (root,) = _model_stores(tmp_path / "resumed")
    partial = FeatureStore(root)
    assert not partial.is_complete and partial.rows_done == 6
    with pytest.raises(RuntimeError, match="incomplete"):
        partial.bags(cohort)

    seen = []
    resumed = _extract(cohort, tmp_path / "resumed", on_batch=seen.append)
    assert seen[0] == 8, "continues where it stopped"
    assert json.loads((resumed.root / "complete.json").read_text())["resumed_at_row"] == 6
    np.testing.assert_array_equal(resumed.features(), reference)


def test_uncommitted_rows_are_recomputed(cohort, tmp_path):
    reference = _extract(cohort, tmp_path / "straight").features().copy()

    def interrupt(rows_done):
        raise KeyboardInterrupt

    # Never committed before the interruption: nothing is durable, all is recomputed.
    with pytest.raises(KeyboardInterrupt):
        _extract(cohort, tmp_path / "lazy", commit_seconds=3600, on_batch=interrupt)
    (root,) = _model_stores(tmp_path / "lazy")
    assert FeatureStore(root).rows_done == 0
    resumed = _extract(cohort, tmp_path / "lazy", commit_seconds=3600)
    np.testing.assert_array_equal(resumed.features(), reference)


def test_key_follows_config_and_sources(cohort, tmp_path):
    first = _extract(cohort, tmp_path)
    other = extract_features(cohort, {**CONFIG, "segmentation": "kmeans_saturation"}, tmp_path,
                             progress=False, num_workers=0)
    assert other.key != first.key
    touched = cohort.patients[0].image_paths[0]
    stat = os.stat(touched)
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _extract(cohort, tmp_path).key != first.key


def test_corrupt_image_named(cohort, tmp_path):
    bad = tmp_path / "P9" / "000000.jpg"
    bad.parent.mkdir()
    good = cohort.patients[0].image_paths[0].read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated JPEG
    from dataclasses import replace

    broken = replace(cohort, patients=[replace(cohort.patients[0],
                                               image_paths=(cohort.patients[0].image_paths[0],
                                                            bad))])
    for workers in (0, 1):
        before = set(multiprocessing.active_children())  # other tests' pools may live on
        with pytest.raises(CorruptImageError, match=str(bad)) as caught:
            _extract(broken, tmp_path / f"w{workers}", num_workers=workers)
        # The loader's workers are stopped at once, though the error is still held.
        assert caught.value is not None and set(multiprocessing.active_children()) <= before


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown extractor config keys"):
        ExtractorConfig.from_dict({"kind": "backbone", "colour": 1})
    with pytest.raises(ValueError, match="unknown backbone"):
        ExtractorConfig.from_dict({"name": "alexnet9"})
    path = tmp_path / "x.yaml"
    path.write_text("kind: autoencoder\ninput_size: 64\nsegmentation: grabcut\n")
    config = load_extractor_config(path)
    assert config.resolved_latent == 4096


def test_bag_transform_fits_training_bags_only():
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(n, 20)) for n in (3, 5, 4)]
    test = [rng.normal(5, 1, size=(2, 20))]
    transform = BagTransform(n_components=100).fit(train)
    assert transform.n_components_ == 12  # clipped to min(instances, features)
    out = transform.transform(test + train)
    assert [b.shape for b in out] == [(2, 12), (3, 12), (5, 12), (4, 12)]
    stacked = np.vstack(transform.transform(train))
    np.testing.assert_allclose(stacked.mean(0), 0, atol=1e-8)
    assert BagTransform(n_components=None).fit(train).transform(test)[0].shape == (2, 20)


@pytest.mark.e2e
def test_commands_on_a_challenge_folder(tmp_path):
    from challenge_layout import default_rows, write_challenge

    from preprocessing.commands import features_command, segment_command

    root = write_challenge(tmp_path / "challenge", default_rows(n_train=3, n_test=1))
    done = segment_command(root, "kmeans_saturation_hue", tmp_path / "seg", progress=False)
    assert done == tmp_path / "seg" / "kmeans_saturation_hue"
    assert len(list(done.rglob("*_mask.png"))) == len(list(done.rglob("*_masked.png"))) > 0
    store = features_command(root, CONFIG, tmp_path / "cache", num_workers=0, progress=False)
    assert store.is_complete and store.dim == 512
    with pytest.raises(ValueError, match="unknown segmentation variant"):
        segment_command(root, "otsu")


def test_a_truncated_store_is_refused_on_read_and_rebuilt_by_the_next_extraction(cohort, tmp_path):
    store = _extract(cohort, tmp_path)
    expected = store.features().copy()
    matrix = store.root / "features.f32"
    with open(matrix, "r+b") as handle:
        handle.truncate(matrix.stat().st_size - 4)
    with pytest.raises(StoreIntegrityError, match=r"features\.f32 has \d+ bytes, expected"):
        FeatureStore(store.root).bags(cohort)
    assert any("bytes, recorded" in problem for problem in FeatureStore(store.root).verify())
    rebuilt = _extract(cohort, tmp_path)
    assert rebuilt.verify() == []
    np.testing.assert_array_equal(rebuilt.features(), expected)


def test_an_altered_store_fails_its_checksum_and_is_rebuilt(cohort, tmp_path, caplog):
    store = _extract(cohort, tmp_path)
    expected = store.features().copy()
    with open(store.root / "features.f32", "r+b") as handle:
        handle.write(b"\x00\x00\x80\x7f")  # one float changed, same size
    assert FeatureStore(store.root).verify() == ["features.f32 does not match its recorded SHA-256"]
    rebuilt = _extract(cohort, tmp_path)
    assert "is damaged (features.f32 does not match" in caplog.text
    np.testing.assert_array_equal(rebuilt.features(), expected)


def test_disk_full_while_writing_leaves_no_complete_marker_and_names_the_store(cohort, tmp_path,
                                                                               monkeypatch):
    import errno

    from preprocessing import store as store_module

    def full(self, start, block):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.StoreWriter, "write", full)
    with pytest.raises(OSError, match=r"disk full while writing feature store .*features/") as error:
        _extract(cohort, tmp_path)
    assert error.value.errno == errno.ENOSPC
    roots = list((tmp_path / "features").iterdir())
    assert len(roots) == 1 and not (roots[0] / "complete.json").exists()
    monkeypatch.undo()
    assert _extract(cohort, tmp_path).verify() == []  # space again: it completes


def test_the_store_key_includes_the_device_and_library_versions(cohort, tmp_path):
    import torch
    import torchvision

    runtime = _extract(cohort, tmp_path).config["runtime"]
    assert runtime == {"device": "cpu", "torch": torch.__version__,
                       "torchvision": torchvision.__version__}


def test_cache_verify_names_damaged_stores_and_prune_keeps_what_runs_refer_to(cohort, tmp_path):
    from typer.testing import CliRunner

    from milbench.cli import app

    cache = tmp_path / "cache"
    used = _extract(cohort, cache)
    other = extract_features(cohort, {**CONFIG, "input_size": 64}, cache, progress=False,
                             batch_size=2, num_workers=0)
    (tmp_path / "runs" / "run-1").mkdir(parents=True)
    (tmp_path / "runs" / "run-1" / "features.json").write_text(json.dumps(used.manifest))
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "verify", str(cache)])
    assert result.exit_code == 0, result.output
    with open(other.root / "features.f32", "r+b") as handle:
        handle.write(b"\x00\x00\x80\x7f")
    result = runner.invoke(app, ["cache", "verify", str(cache)])
    assert result.exit_code == 2 and f"1 damaged store(s): {other.key}" in result.output
    result = runner.invoke(app, ["cache", "prune", str(tmp_path), "--dry-run"])
    # Kept: the store a run read and the pixels store it was computed from.
    assert "would remove 2 of 4 feature stores" in result.output and other.root.exists()
    result = runner.invoke(app, ["cache", "prune", str(tmp_path)])
    assert result.exit_code == 0 and "removed 2 of 4" in result.output
    assert not other.root.exists() and used.verify() == []
    assert (cache / "features" / used.manifest["pixels_key"] / "complete.json").is_file()


def test_a_second_extraction_waits_for_the_process_building_the_cache_then_reuses(cohort, tmp_path,
                                                                                  caplog):
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    first = _extract(cohort, cache)
    lock = (cache / "extraction.lock").resolve()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.perf_counter()
    with caplog.at_level("INFO", logger="preprocessing.store"):
        second = _extract(cohort, cache)
    assert time.perf_counter() - started > 0.5  # it waited for the other process
    assert "waiting for another process building features" in caplog.text
    assert holder.wait(timeout=30) == 0
    assert second.root == first.root and second.verify() == []


def test_pixels_store_holds_the_preprocessed_images(cohort, tmp_path):
    from preprocessing.preprocess import Preprocessor

    config = {"kind": "pixels", "input_size": 16, "segmentation": "kmeans_saturation"}
    store = extract_features(cohort, config, tmp_path, progress=False, batch_size=5,
                             num_workers=0)
    assert store.manifest["dtype"] == "uint8" and store.dim == 3 * 16 * 16
    assert (store.root / "features.u8").is_file() and not (store.root / "features.f32").exists()
    assert store.verify() == []
    preprocessor = Preprocessor(16, "kmeans_saturation")
    for patient, bag in zip(cohort.patients, store.bags(cohort), strict=True):
        assert bag.dtype == np.uint8
        expected = np.stack([preprocessor.uint8_tensor(p).numpy().ravel()
                             for p in patient.image_paths])
        np.testing.assert_array_equal(bag, expected)
    assert store.manifest["config"]["name"] == "pixels"  # the name is implied by the kind
    with pytest.raises(ValueError, match="pixels extractor is named 'pixels'"):
        ExtractorConfig.from_dict({"kind": "pixels", "name": "resnet18"})


def test_unknown_store_dtype_is_named(cohort, tmp_path):
    store = _extract(cohort, tmp_path)
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["dtype"] = "float16"
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="dtype must be one of .*'float16'"):
        FeatureStore(store.root)

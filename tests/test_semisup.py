"""Semi-supervised pseudo-labelling model: schedule, selection, counts, leakage, both modes.

One tiny synthetic cohort and a 24-image ALL-IDB2-style source set are generated per module;
head mode runs on ResNet-18 features at 32 px (random weights), full mode fine-tunes ResNet-18
at 32 px for one epoch.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from milbench.data import load_challenge
from milbench.evaluation.cv import cross_validate
from milbench.evaluation.splits import kfold_splits
from milbench.models import create_model, list_models
from milbench.semisup.counts import count_matrix, predicted_counts
from milbench.semisup.loop import balanced_source_split, run_pseudo_labelling
from milbench.semisup.schedule import check_schedule, make_schedule
from milbench.semisup.source import (
    load_source,
    prepare_source_features,
    read_source_features,
    with_source_stain,
)
from milbench.synth import generate_allidb2, generate_cohort
from preprocessing.extract import extract_features

FAST = {"epochs": 3, "n_iterations": 4, "source_val_size": 8, "random_state": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("semisup")
    generate_cohort(root / "cohort", preset="tiny", seed=3)
    generate_allidb2(root / "source", seed=3, n_per_class=12)
    cohort = load_challenge(root / "cohort")
    config = with_source_stain({"kind": "backbone", "name": "resnet18", "input_size": 32},
                               root / "source")
    store = extract_features(cohort, config, root / "cache", progress=False, num_workers=0)
    source_npz = prepare_source_features(root / "source", config, root / "cache")
    train = cohort.train()
    return {"root": root, "cohort": cohort, "train": train, "bags": store.bags(train),
            "labels": train.labels(), "clinical": train.clinical_table(),
            "source_npz": str(source_npz), "config": config}


# --------------------------------------------------------------------------- schedule


def test_default_schedule_is_the_seeds():
    schedule = make_schedule()
    assert schedule == [2] * 5 + [5] * 18
    assert len(schedule) == 23 and sum(schedule) == 100
    assert make_schedule(3, 1, 4, 7) == [4, 7, 7]
    with pytest.raises(ValueError, match="late_per_iteration"):
        make_schedule(late_per_iteration=0)
    with pytest.raises(ValueError, match="positive integers"):
        check_schedule([2, 0])


# --------------------------------------------------------------------------- source loader


def _touch_images(folder, names):
    from preprocessing.images import write_rgb

    folder.mkdir(parents=True)
    for name in names:
        write_rgb(folder / name.replace(".tif", ".png"), np.zeros((4, 4, 3), np.uint8))
        (folder / name.replace(".tif", ".png")).rename(folder / name)


def test_source_labels_come_from_the_suffix(world):
    source = load_source(world["root"] / "source")
    names = [p.name for p in source.paths]
    assert len(source) == 24 and source.labels.sum() == 12
    assert all(int(n.split("_")[1][0]) == label for n, label in zip(names, source.labels, strict=True))
    # The img folder itself and the ALL_IDB2 folder are accepted too.
    same = load_source(world["root"] / "source" / "ALL_IDB2" / "img")
    assert same.paths == source.paths
    x, y = read_source_features(world["source_npz"])
    assert x.shape == (24, 512) and np.array_equal(y, source.labels)


def test_source_rejects_bad_names(tmp_path):
    _touch_images(tmp_path / "a" / "img", ["Im001_1.tif", "Im002_2.tif", "cell.tif"])
    with pytest.raises(ValueError, match=r"Im002_2\.tif"):
        load_source(tmp_path / "a")
    _touch_images(tmp_path / "b" / "img", ["Im001_1.tif", "Im002_1.tif"])
    with pytest.raises(ValueError, match="both _0 and _1"):
        load_source(tmp_path / "b")
    _touch_images(tmp_path / "c" / "img", ["Im001_1.tif", "Im01_0.tif"])
    with pytest.raises(ValueError, match="two files"):
        load_source(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_source(tmp_path / "nowhere")


def test_corrupt_source_image_is_named(tmp_path, world):
    from preprocessing.images import CorruptImageError

    _touch_images(tmp_path / "s" / "img", ["Im001_1.tif", "Im002_0.tif"])
    (tmp_path / "s" / "img" / "Im002_0.tif").write_bytes(b"not a tiff")
    config = {"kind": "backbone", "name": "resnet18", "input_size": 32}
    with pytest.raises(CorruptImageError, match=r"Im002_0\.tif"):
        prepare_source_features(tmp_path / "s", config, tmp_path / "cache")


def test_cohort_is_stain_matched_to_the_source(world):
    from preprocessing.extract import resolve_stain
    from preprocessing.stain import reference_for

    stain = resolve_stain(world["config"].stain, world["cohort"], world["root"] / "cache")
    expected = reference_for(str(world["root"] / "source" / "ALL_IDB2" / "img"))
    assert np.allclose(stain.mean, expected.mean) and np.allclose(stain.std, expected.std)


# --------------------------------------------------------------------------- the loop


class ScoreIsTheItem:
    """A fake trainer: the item's first value is its P(1); records what it was trained on."""

    def __init__(self):
        self.calls = []

    def __call__(self, items, labels, val_items, val_labels, previous, seed):
        self.calls.append((np.array(items), np.array(labels)))
        model = type("Model", (), {})()
        model.val_accuracy = [] if val_items is None else [0.5]
        model.predict_positive = lambda x: np.asarray(x, float)[:, 0]
        return model


def _scored_pool(n_tumoral, n_reactive, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.uniform(0, 1, n_tumoral), rng.uniform(0, 1, n_reactive)])
    return scores[:, None], np.array([1] * n_tumoral + [0] * n_reactive)


def test_loop_adds_the_scheduled_most_confident_images_once():
    candidates, bag_labels = _scored_pool(400, 300)
    source = np.array([[0.1], [0.9]] * 20)
    source_y = np.array([0, 1] * 20)
    trainer = ScoreIsTheItem()
    result = run_pseudo_labelling(trainer, source, source_y, candidates, bag_labels,
                                  make_schedule(), source_val_size=10, seed=0)
    assert len(result.log) == 23
    assert [len(e["positives"]) for e in result.log] == make_schedule()
    assert [len(e["negatives"]) for e in result.log] == make_schedule()
    assert len(result.added) == 200 == len(set(result.added.tolist()))
    positives = result.added[result.added_labels == 1]
    negatives = result.added[result.added_labels == 0]
    assert (bag_labels[positives] == 1).all() and (bag_labels[negatives] == 0).all()
    # The most confident images first: the 100 highest tumoral scores, the 100 lowest reactive.
    tumoral, reactive = np.flatnonzero(bag_labels == 1), np.flatnonzero(bag_labels == 0)
    top = tumoral[np.argsort(-candidates[tumoral, 0], kind="stable")[:100]]
    bottom = reactive[np.argsort(candidates[reactive, 0], kind="stable")[:100]]
    assert set(positives.tolist()) == set(top.tolist())
    assert set(negatives.tolist()) == set(bottom.tolist())
    first = result.log[0]
    assert first["positive_confidence"] == sorted(first["positive_confidence"], reverse=True)
    assert all(c >= 0.5 for e in result.log for c in e["positive_confidence"])
    # Training sets: source train part + pseudo-labels so far; the final one has no source.
    assert len(trainer.calls) == 23 + 2
    assert len(trainer.calls[0][0]) == 30 and len(trainer.calls[5][0]) == 30 + 2 * (5 * 2)
    final_items, final_labels = trainer.calls[-1]
    assert len(final_items) == 200 and final_labels.sum() == 100


def test_loop_takes_what_is_available_and_logs_the_shortfall():
    candidates, bag_labels = _scored_pool(30, 8, seed=1)
    n_predicted_positive = int((candidates[bag_labels == 1, 0] >= 0.5).sum())
    trainer = ScoreIsTheItem()
    result = run_pseudo_labelling(trainer, np.array([[0.2], [0.8]] * 4), np.array([0, 1] * 4),
                                  candidates, bag_labels, make_schedule(), source_val_size=2)
    added = result.added.tolist()
    assert len(added) == len(set(added))
    assert (result.added_labels == 1).sum() == (result.added_labels == 0).sum()
    assert (result.added_labels == 0).sum() == min(8, n_predicted_positive)
    assert any(e["short"] for e in result.log)
    assert result.log[-1]["positives"] == [] and result.log[-1]["available_negative"] == 0


def test_loop_without_any_predicted_positive_falls_back_to_the_source():
    candidates = np.full((10, 1), 0.1)
    result = run_pseudo_labelling(ScoreIsTheItem(), np.array([[0.2], [0.8]] * 4),
                                  np.array([0, 1] * 4), candidates, np.array([1] * 6 + [0] * 4),
                                  [2, 2], source_val_size=2)
    assert len(result.added) == 0 and result.final_includes_source and result.notes


def test_balanced_source_split_matches_the_seed():
    labels = np.array([0, 1] * 130)
    train, val = balanced_source_split(labels, 60, np.random.default_rng(0))
    assert len(train) == 200 and len(val) == 60 and labels[val].sum() == 30
    assert not set(train) & set(val)


# --------------------------------------------------------------------------- counts


def test_count_matrix_for_known_predictions():
    probabilities = [np.array([0.1, 0.6, 0.5, 0.49]), np.array([0.9]), np.array([0.0, 0.2])]
    counts = predicted_counts(probabilities)
    assert counts.tolist() == [[2, 2], [0, 1], [2, 0]]
    clinical = np.array([[70.0, 12.5, 1], [55.0, 4.0, 0], [81.0, 30.0, 1]])
    assert count_matrix(counts, clinical).tolist() == [
        [2, 2, 12.5, 70.0], [0, 1, 4.0, 55.0], [2, 0, 30.0, 81.0]]


# --------------------------------------------------------------------------- the bag model


def test_registered():
    assert "semisup" in list_models(tag="instances")


def test_head_mode_fits_and_follows_the_contract(world):
    bags, labels, clinical = world["bags"], world["labels"], world["clinical"]
    model = create_model("semisup", source_features=world["source_npz"], **FAST)
    with pytest.raises(NotFittedError):
        model.predict_proba(bags, clinical)
    assert model.fit(bags, labels, clinical) is model
    proba = model.predict_proba(bags, clinical)
    assert proba.shape == (len(bags), 2) and np.allclose(proba.sum(1), 1)
    pairs = [p for e in model.pseudo_label_log_ for p in e["positives"] + e["negatives"]]
    assert len(pairs) == len(set(pairs)) == len(model.pseudo_labelled_)
    for bag, instance in pairs:
        assert 0 <= bag < len(bags) and 0 <= instance < len(bags[bag])
    for entry in model.pseudo_label_log_:
        assert all(labels[b] == 1 for b, _ in entry["positives"])
        assert all(labels[b] == 0 for b, _ in entry["negatives"])
    assert len(model.source_val_accuracy_) == 5 and len(model.source_val_accuracy_[0]) == 3
    features = model.bag_features(bags)
    assert list(features.columns) == ["count_0", "count_1", "positive_rate"]
    assert (features["count_0"] + features["count_1"]).tolist() == [len(b) for b in bags]
    scores = model.instance_scores(bags)
    assert [len(s) for s in scores] == [len(b) for b in bags]
    # Counts do not depend on instance order, so neither does the patient prediction.
    shuffled = [b[::-1] for b in bags]
    assert np.allclose(model.predict_proba(shuffled, clinical), proba)
    restored = pickle.loads(pickle.dumps(model))
    assert np.array_equal(restored.predict_proba(bags, clinical), proba)
    assert clone(model).get_params() == model.get_params()


def test_head_mode_is_deterministic(world):
    bags, labels, clinical = world["bags"], world["labels"], world["clinical"]
    fits = [create_model("semisup", source_features=world["source_npz"], **FAST).fit(
        bags, labels, clinical) for _ in range(2)]
    assert fits[0].pseudo_label_log_ == fits[1].pseudo_label_log_
    assert np.array_equal(fits[0].predict_proba(bags, clinical), fits[1].predict_proba(bags, clinical))
    assert np.array_equal(np.concatenate(fits[0].instance_scores(bags)),
                          np.concatenate(fits[1].instance_scores(bags)))


def test_tiny_cohort_with_the_full_schedule_never_duplicates(world):
    bags, labels, clinical = world["bags"], world["labels"], world["clinical"]
    model = create_model("semisup", source_features=world["source_npz"], epochs=2,
                         source_val_size=8, meta="lightgbm", random_state=1)
    model.fit(bags, labels, clinical)
    assert len(model.pseudo_label_log_) == 23
    n_reactive_images = sum(len(b) for b, label in zip(bags, labels, strict=True) if label == 0)
    added = model.pseudo_labelled_
    assert not added.duplicated(["bag", "instance"]).any()
    assert (added["label"] == 0).sum() <= n_reactive_images
    assert any(e["short"] for e in model.pseudo_label_log_)
    assert model.predict_proba(bags, clinical).shape == (len(bags), 2)


def test_validation_labels_never_reach_the_model(world):
    """Flipping the labels of a fold's validation patients changes nothing in that fold."""
    bags, labels, clinical = world["bags"], world["labels"], world["clinical"]
    ids = [p.id for p in world["train"].patients]
    folds = kfold_splits(ids, labels, n_splits=3, seed=0)[:1]
    model = create_model("semisup", source_features=world["source_npz"], **FAST)
    first = cross_validate(model, bags, labels, ids, folds, clinical, progress=False)
    flipped = labels.copy()
    val = [ids.index(pid) for pid in folds[0].val_ids]
    flipped[val] = 1 - flipped[val]
    second = cross_validate(model, bags, flipped, ids, folds, clinical, progress=False)
    assert np.array_equal(first.oof["score"].to_numpy(), second.oof["score"].to_numpy())


def test_bad_parameters_are_named(world):
    bags, labels, clinical = world["bags"], world["labels"], world["clinical"]
    with pytest.raises(ValueError, match="source_features"):
        create_model("semisup").fit(bags, labels, clinical)
    with pytest.raises(ValueError, match="mode"):
        create_model("semisup", mode="gpu", source_features=world["source_npz"]).fit(
            bags, labels, clinical)
    with pytest.raises(ValueError, match="dimensions"):
        create_model("semisup", source_features=world["source_npz"], **FAST).fit(
            [b[:, :10] for b in bags], labels, clinical)


def test_full_mode_fine_tunes_the_network_on_images(world):
    train = world["train"]
    path_bags = [list(p.image_paths) for p in train.patients]
    params = dict(FAST, epochs=1, n_iterations=2)
    model = create_model("semisup", mode="full", source_root=str(world["root"] / "source"),
                         backbone="resnet18", input_size=32, batch_size=16, **params)
    model.fit(path_bags, world["labels"], world["clinical"])
    assert len(model.pseudo_label_log_) == 2
    pairs = [p for e in model.pseudo_label_log_ for p in e["positives"] + e["negatives"]]
    assert len(pairs) == len(set(pairs))
    proba = model.predict_proba(path_bags, world["clinical"])
    assert proba.shape == (len(path_bags), 2)
    assert [len(s) for s in model.instance_scores(path_bags)] == [len(b) for b in path_bags]
    restored = pickle.loads(pickle.dumps(model))
    assert np.allclose(restored.predict_proba(path_bags, world["clinical"]), proba)
    with pytest.raises(TypeError, match="paths"):
        model.predict_proba(world["bags"], world["clinical"])


# --------------------------------------------------------------------------- benchmark


def test_bench_reports_precision_against_the_truth(world, tmp_path):
    import json

    from milbench.bench.semisup import bench_semisup_command

    overrides = {
        "data": {"root": str(world["root"] / "cohort")},
        "source": {"root": str(world["root"] / "source")},
        "extractor": {"kind": "backbone", "name": "resnet18", "weights": None, "input_size": 32,
                      "segmentation": None},
        "evaluation": {"n_splits": 3, "n_repeats": 2},
        "params": {"epochs": 2, "n_iterations": 3, "source_val_size": 8},
    }
    summary = bench_semisup_command(None, tmp_path, overrides, progress=False)
    assert summary["folds"] == 6
    assert 0 <= summary["balanced_accuracy"]["mean"] <= 1
    written = json.loads((tmp_path / "semisup_summary.json").read_text())
    assert written["balanced_accuracy_text"] == summary["balanced_accuracy_text"]
    chosen = pd.read_csv(tmp_path / "semisup_chosen.csv")
    assert not chosen.duplicated(["repeat", "fold", "patient_id", "image"]).any()
    assert set(chosen["atypical"]) <= {0, 1}
    assert (tmp_path / "semisup_iterations.png").stat().st_size > 0
    assert "| iteration |" in (tmp_path / "semisup_report.md").read_text()

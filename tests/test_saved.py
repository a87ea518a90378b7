"""Saved final models: a run keeps every refitted model; reloaded, each predicts the run's test
patients bit for bit; an ensemble stores its members by reference; a damaged, missing or
foreign-version model is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import milbench
from milbench.config import load_config
from milbench.io import file_sha256
from milbench.preparation import prepare_data
from milbench.saved import CHECKSUMS, PICKLE, RECORD, SavedModelError, model_folder

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RESNET = "{kind: backbone, name: resnet18, weights: null, input_size: 32, segmentation: null}"
DMIL = "{name: dmil, params: {max_epochs: 3, validation_fraction: 0}}"
MODELS = (f"[{{name: clinical_logreg}}, {{name: meanpool_svm}}, {DMIL},"
          f" {{name: voting, label: vote, params: {{members: [clinical_logreg, meanpool_svm, {DMIL}]}}}}]")


def _overrides(workdir: Path) -> list[str]:
    return [f"models={MODELS}", f"features.extractor={RESNET}", "data.synthetic.preset=tiny",
            "evaluation.n_splits=2", f"workdir={workdir}", "submission.enabled=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("saved") / "work"
    result = milbench.run(CONFIGS / "pipeline.yaml", overrides=_overrides(workdir))
    data = prepare_data(load_config(CONFIGS / "pipeline.yaml", _overrides(workdir)), progress=False)
    return result, data


def test_every_reloaded_model_predicts_the_runs_test_patients_bit_for_bit(finished):
    result, data = finished
    config = load_config(CONFIGS / "pipeline.yaml", _overrides(Path("unused")))
    assert result.models == sorted(spec.display_name for spec in config.models)
    for spec in config.models:
        name = spec.display_name
        model = milbench.load_model(result.run_dir, name)
        proba = model.predict_proba(data.bags_for(spec)[1], data.test_clinical)[:, 1]
        written = result.test_predictions(name)
        assert written["patient_id"].tolist() == data.test.ids
        np.testing.assert_array_equal(proba, written["score"].to_numpy())
        record = json.loads((model_folder(result.run_dir, name) / RECORD).read_text())
        assert record["spec"]["name"] == spec.name and record["libraries"]["torch"]
    assert list(result.metrics["model"]) == [spec.display_name for spec in config.models]


def test_an_ensemble_stores_its_members_once_by_reference(finished):
    result, _ = finished
    record = json.loads((model_folder(result.run_dir, "vote") / RECORD).read_text())
    assert record["references"] == ["clinical_logreg", "dmil", "meanpool_svm"]
    vote_size = (model_folder(result.run_dir, "vote") / PICKLE).stat().st_size
    assert vote_size < (model_folder(result.run_dir, "dmil") / PICKLE).stat().st_size
    vote = milbench.load_model(result.run_dir, "vote")
    dmil = milbench.load_model(result.run_dir, "dmil")
    assert type(vote.members_[2]) is type(dmil)


def _copy(result, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    return copy


def test_a_damaged_or_missing_file_is_refused_by_name(finished, tmp_path):
    run_dir = _copy(finished[0], tmp_path)
    pickle_path = model_folder(run_dir, "meanpool_svm") / PICKLE
    pickle_path.write_bytes(pickle_path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(SavedModelError, match=f"{pickle_path}: damaged or changed"):
        milbench.load_model(run_dir, "meanpool_svm")
    # The vote refers to the damaged member: refused too, naming the member's file.
    with pytest.raises(SavedModelError, match="meanpool_svm/model/model.pkl: damaged"):
        milbench.load_model(run_dir, "vote")
    (model_folder(run_dir, "dmil") / RECORD).unlink()
    with pytest.raises(SavedModelError, match="dmil/model/model.json: missing"):
        milbench.load_model(run_dir, "dmil")
    with pytest.raises(SavedModelError, match="no saved model 'dmill'.*saved: clinical_logreg, dmil"):
        milbench.load_model(run_dir, "dmill")


def test_a_model_saved_by_another_major_library_version_is_refused(finished, tmp_path):
    run_dir = _copy(finished[0], tmp_path)
    folder = model_folder(run_dir, "clinical_logreg")
    record = json.loads((folder / RECORD).read_text())
    record["libraries"]["scikit-learn"] = "0.24.2"
    (folder / RECORD).write_text(json.dumps(record))
    checksums = json.loads((folder / CHECKSUMS).read_text())
    checksums[RECORD] = file_sha256(folder / RECORD)
    (folder / CHECKSUMS).write_text(json.dumps(checksums))
    with pytest.raises(SavedModelError, match="saved with scikit-learn 0.24.2.*install scikit-learn==0.24.2"):
        milbench.load_model(run_dir, "clinical_logreg")


def test_load_run_reads_a_finished_run_and_refuses_another_folder(finished, tmp_path):
    result, _ = finished
    again = milbench.load_run(result.run_dir)
    pd.testing.assert_frame_equal(again.metrics, result.metrics)
    assert not again.comparisons.empty
    with pytest.raises(FileNotFoundError, match="not a finished run directory"):
        milbench.load_run(tmp_path)


def test_saving_can_be_turned_off(tmp_path):
    overrides = [*_overrides(tmp_path / "work"), "models=[{name: clinical_logreg}]", "save_models=false"]
    result = milbench.run(CONFIGS / "pipeline.yaml", overrides=overrides)
    assert result.models == [] and not model_folder(result.run_dir, "clinical_logreg").exists()


# An autoencoder-fed run: predict must encode new patients with the saved weights.
AUTOENCODER = "{kind: autoencoder, name: demo, input_size: 32, epochs: 1, latent: 16, segmentation: null}"


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("saved-ae") / "work"
    overrides = [*_overrides(workdir), f"features.extractor={AUTOENCODER}"]
    return milbench.run(CONFIGS / "pipeline.yaml", overrides=overrides), workdir


def test_predict_on_the_runs_own_test_patients_matches_its_test_predictions(autoencoder_run, tmp_path):
    result, workdir = autoencoder_run
    root = next((workdir / "data").glob("synthetic-tiny-*"))
    predictions = milbench.predict(result.run_dir, root, out=tmp_path / "out")
    for name in result.models:
        written = result.test_predictions(name)
        mine = predictions[predictions["model"] == name]
        assert mine["patient_id"].tolist() == written["patient_id"].tolist()
        np.testing.assert_allclose(mine["score"], written["score"], rtol=0, atol=1e-9)
        assert mine["predicted"].tolist() == written["predicted"].tolist()
    assert (tmp_path / "out" / "instance_scores.csv").is_file()  # dmil scores its instances


def test_predict_new_patients_without_the_training_data(autoencoder_run, tmp_path):
    from typer.testing import CliRunner

    from milbench.cli import app
    from milbench.synth import generate_cohort

    result, workdir = autoencoder_run
    run_dir = shutil.copytree(result.run_dir, tmp_path / "run")
    new = generate_cohort(tmp_path / "second", "tiny", seed=5)
    shutil.move(workdir, tmp_path / "elsewhere")  # no training cohort, no feature cache
    try:
        done = CliRunner().invoke(app, ["predict", str(run_dir), "--data", str(new), "--no-progress",
                                        "--out", str(tmp_path / "out")])
    finally:
        shutil.move(tmp_path / "elsewhere", workdir)
    assert done.exit_code == 0, done.output
    submissions = sorted((tmp_path / "out" / "submissions").glob("*.csv"))
    assert len(submissions) == 4
    check = CliRunner().invoke(app, ["submission", "check", str(submissions[0]), "--data", str(new)])
    assert check.exit_code == 0 and "valid submission" in check.output


def test_predict_refuses_a_changed_extractor_and_damaged_weights(autoencoder_run, tmp_path):
    result, workdir = autoencoder_run
    root = next((workdir / "data").glob("synthetic-tiny-*"))
    run_dir = shutil.copytree(result.run_dir, tmp_path / "run")
    folder = model_folder(run_dir, "dmil")
    record = json.loads((folder / RECORD).read_text())
    view = next(v for v in record["features"].values() if v["default"])
    view["extractor"]["input_size"] = 48
    (folder / RECORD).write_text(json.dumps(record))
    checksums = json.loads((folder / CHECKSUMS).read_text())
    (folder / CHECKSUMS).write_text(json.dumps({**checksums, RECORD: file_sha256(folder / RECORD)}))
    with pytest.raises(SavedModelError, match="extractor setting 'input_size' is 48 here, 32 when"):
        milbench.predict(run_dir, root, models=["dmil"], out=tmp_path / "out")
    weights = next((run_dir / "extractors").glob("autoencoder-*.pt"))
    weights.write_bytes(weights.read_bytes() + b"\x00")
    with pytest.raises(SavedModelError, match=f"{weights.name}: damaged or changed"):
        milbench.predict(run_dir, root, models=["meanpool_svm"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any extraction


def test_a_pretrained_backbone_file_travels_with_the_run(tmp_path):
    import torch
    import torchvision

    weights = tmp_path / "pretrained" / "resnet18.pt"
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    extractor = f"{{kind: backbone, name: resnet18, weights: {weights}, input_size: 32}}"
    overrides = [*_overrides(tmp_path / "work"), f"features.extractor={extractor}",
                 "models=[{name: clinical_logreg}, {name: meanpool_svm}]"]
    result = milbench.run(CONFIGS / "pipeline.yaml", overrides=overrides)
    copied = list((result.run_dir / "extractors").glob("backbone-*.pt"))
    assert len(copied) == 1 and file_sha256(copied[0]) == file_sha256(weights)
    shutil.rmtree(weights.parent)  # the notebook has the run, not the original file
    root = next((tmp_path / "work" / "data").glob("synthetic-tiny-*"))
    predictions = milbench.predict(result.run_dir, root, models=["meanpool_svm"], out=tmp_path / "out")
    np.testing.assert_allclose(predictions["score"], result.test_predictions("meanpool_svm")["score"],
                               rtol=0, atol=1e-9)


def test_a_class_that_moved_module_still_unpickles_by_its_old_name(tmp_path):
    """A model saved before the preprocessing chain left preprocessing.images still loads."""
    import io

    from milbench.saved import _Loader
    from preprocessing.preprocess import ImageDataset, Preprocessor

    loader = _Loader(io.BytesIO(b""), tmp_path, {})
    assert loader.find_class("preprocessing.images", "Preprocessor") is Preprocessor
    assert loader.find_class("preprocessing.images", "ImageDataset") is ImageDataset
    assert loader.find_class("milbench.models.dmil", "DMILNetwork").__module__ == (
        "milbench.models.bag_network")
    assert loader.find_class("preprocessing.images", "read_rgb").__module__ == "preprocessing.images"

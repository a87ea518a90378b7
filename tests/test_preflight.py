"""A run checks everything it can before the first expensive step and reports every problem at
once, naming the model, file or key; nothing is written when it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from milbench import data_roots, preflight
from milbench.config import ConfigError, load_config
from milbench.preparation import prepare_data

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_problem_is_reported_at_once_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = load_config(CONFIGS / "pipeline.yaml", [
        "models=[{name: clinical_logreg}, {name: meanpool_svm, label: svm, features: "
        "{kind: backbone, name: resnet99}}, {name: voting, label: vote, params: {members: "
        "[{name: misvm, features: {kind: autoencoder, name: conv_ae, input_size: 50}}]}}]",
        f"data.root={tmp_path / 'no_such_folder'}", f"workdir={tmp_path / 'work'}",
        f"submission.dir={blocker / 'subs'}"])
    with pytest.raises(ConfigError) as error:
        prepare_data(config, progress=False)
    message = str(error.value)
    assert message.startswith("the run cannot start:")
    assert "model 'svm': features: unknown backbone 'resnet99'" in message
    assert ("model 'vote' (its member 'misvm'): features: autoencoder input_size must be a "
            "multiple of 16") in message
    assert f"data.root {tmp_path / 'no_such_folder'}: no such folder" in message
    assert f"submission.dir {blocker / 'subs'}: cannot be created ({blocker} is not a folder)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


def test_too_little_disk_for_the_feature_stores_is_refused(tmp_path, monkeypatch):
    config = load_config(CONFIGS / "pipeline.yaml", [
        "models=[{name: clinical_logreg}, {name: meanpool_svm, features: resnet18}]",
        "data.synthetic.preset=tiny", f"workdir={tmp_path / 'work'}", "submission.enabled=false"])
    data_roots.resolve_data_root(config.data, config.workdir, progress=False)  # images known
    total = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage",
                        lambda path: total._replace(free=1000))
    with pytest.raises(ConfigError, match=r"0\.00 GB free, the feature stores of this run need"):
        prepare_data(config, progress=False)
    assert not (tmp_path / "work" / "cache").exists()


def test_a_changed_generated_cohort_is_refused_naming_the_files(tmp_path):
    config = load_config(CONFIGS / "pipeline.yaml", [
        "data.synthetic.preset=tiny", f"workdir={tmp_path / 'work'}"])
    root = data_roots.resolve_data_root(config.data, config.workdir, progress=False)
    assert data_roots.resolve_data_root(config.data, config.workdir, progress=False) == root
    image = next(root.glob("trainset/*/*.jpg"))
    image.write_bytes(image.read_bytes()[:-10])  # truncated
    (root / "trainset" / image.parent.name / "extra.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"was changed since it was written \(altered trainset/"
                                          r".*\.jpg, unexpected trainset/.*/extra\.jpg\)"):
        data_roots.resolve_data_root(config.data, config.workdir, progress=False)

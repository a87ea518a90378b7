"""End to end through the CLI: a tiny run, its run directory, its submission, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from challenge_layout import default_rows, write_challenge
from typer.testing import CliRunner

from milbench.cli import app

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def challenge(tmp_path):
    return write_challenge(tmp_path / "challenge", default_rows(n_train=15, n_test=4))


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.mark.e2e
def test_run_writes_run_directory_and_valid_submissions(tmp_path, challenge, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", CONFIGS / "clinical.yaml", "--data", challenge, "--no-progress",
            "--set", "evaluation.n_splits=3", "--set", "evaluation.n_repeats=2",
            "--set", f"workdir={tmp_path / 'work'}", "--set", f"submission.dir={tmp_path / 'subs'}"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed"] == 0 and config["evaluation"]["n_splits"] == 3
    environment = json.loads((run / "environment.json").read_text())
    assert environment["milbench_version"] and "git" in environment
    assert environment["libraries"]["scikit-learn"]
    folds = pd.read_csv(run / "splits" / "folds.csv")
    assert set(folds["repeat"]) == {0, 1} and set(folds["fold"]) == {0, 1, 2}
    oof = pd.read_csv(run / "models" / "clinical_logreg" / "oof.csv")
    assert len(oof) == 2 * 15
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["model"]) == ["clinical_logreg", "clinical_xgb"]
    assert metrics["balanced_accuracy_mean"].between(0, 1).all()
    assert "hidden_test_balanced_accuracy" not in metrics  # a real-layout folder has no truth
    for plot in ("roc.png", "confusion.png", "clinical_by_class.png", "bag_sizes_by_class.png",
                 "oof_scores_by_class.png"):
        assert (run / "plots" / plot).stat().st_size > 1000
    assert "clinical_logreg" in (run / "report.md").read_text()
    page = (run / "report.html").read_text()  # one file to share: the figures inside it
    assert "<table>" in page and page.count("data:image/png;base64,") >= 5 and 'src="plots/' not in page
    submissions = sorted((tmp_path / "subs").glob("*.csv"))
    assert [p.name for p in submissions] == [
        "clinical-clinical_logreg-v1.csv", "clinical-clinical_xgb-v1.csv"]
    table = pd.read_csv(submissions[0])
    assert list(table.columns) == ["Id", "Predicted"] and sorted(table["Id"]) == ["P16", "P17", "P18", "P19"]
    check = invoke("submission", "check", submissions[0], "--data", challenge)
    assert check.exit_code == 0 and "valid submission for 4 test patients" in check.output
    provenance = json.loads(submissions[0].with_suffix(".json").read_text())
    assert provenance["seed"] == 0 and provenance["run_dir"] == str(run.resolve())

    # Same config and seed: a new run directory, identical predictions, a new submission version.
    assert invoke(*args).exit_code == 0
    runs = sorted((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == 2
    first, second = (pd.read_csv(r / "models" / "clinical_xgb" / "oof.csv") for r in runs)
    pd.testing.assert_frame_equal(first, second)
    assert (tmp_path / "subs" / "clinical-clinical_logreg-v2.csv").exists()


def test_submission_check_reports_problems(tmp_path, challenge):
    bad = tmp_path / "bad.csv"
    bad.write_text("Id,Predicted\nP16,1\n")
    result = invoke("submission", "check", bad, "--data", challenge)
    assert result.exit_code == 1
    assert "missing test patients ['P17', 'P18', 'P19']" in result.output


def test_data_summary_writes_tables_and_plot(tmp_path, challenge):
    result = invoke("data", "summary", challenge, "--out", tmp_path / "summary")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "summary" / "summary.csv")
    assert list(table["group"]) == ["test", "train, reactive", "train, tumoral", "all"]
    assert table.set_index("group").loc["all", "patients"] == 19
    assert (tmp_path / "summary" / "clinical_by_class.png").stat().st_size > 1000


def test_errors_are_one_clear_line(tmp_path, challenge):
    (challenge / "trainset" / "P2" / "000000.jpg").write_bytes(b"")
    csv_path = challenge / "clinical_annotation.csv"
    csv_path.write_text(csv_path.read_text().replace(",P3,1,f,", ",P3,1,Q,", 1))
    result = invoke("run", CONFIGS / "clinical.yaml", "--data", challenge, "--no-progress",
                    "--set", f"workdir={tmp_path / 'work'}")
    assert result.exit_code == 2
    assert "error:" in result.output and "line 4 (ID P3), field GENDER: 'Q' is not M or F" in result.output
    assert "Traceback" not in result.output
    result = invoke("run", CONFIGS / "clinical.yaml", "--set", "evaluation.n_splits=one")
    assert result.exit_code == 2 and "evaluation.n_splits" in result.output


@pytest.mark.e2e
def test_run_without_data_generates_and_reuses_a_synthetic_cohort(tmp_path):
    args = ["run", CONFIGS / "pipeline.yaml", "--no-progress",
            "--set", "models=[{name: clinical_logreg}]", "--set", "features.extractor=none",
            "--set", "data.synthetic.preset=tiny", "--set", "evaluation.n_splits=2",
            "--set", "evaluation.n_repeats=1", "--set", f"workdir={tmp_path / 'work'}",
            "--set", f"submission.dir={tmp_path / 'subs'}"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    cohort = tmp_path / "work" / "data" / "synthetic-tiny-seed0"
    assert (cohort / "synth.json").is_file() and (cohort / "clinical_annotation.csv").is_file()
    stamp = (cohort / "synth.json").stat().st_mtime_ns
    submission = next((tmp_path / "subs").glob("pipeline-clinical_logreg-v1.csv"))
    assert invoke("submission", "check", submission, "--data", cohort).exit_code == 0
    assert invoke(*args).exit_code == 0
    assert (cohort / "synth.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    config = yaml.safe_load(next((tmp_path / "work" / "runs").iterdir()).joinpath("config.yaml").read_text())
    assert config["data"]["resolved_root"] == str(cohort.resolve())
    metrics = pd.read_csv(next((tmp_path / "work" / "runs").iterdir()) / "metrics.csv")
    assert metrics["hidden_test_balanced_accuracy"].between(0, 1).all()  # synthetic truth scored
    assert metrics["instance_auc"].isna().all() and "nan" not in result.output  # printed as –


def test_features_command_extracts_once_and_reuses(tmp_path, challenge):
    extractor = tmp_path / "tiny_resnet.yaml"
    extractor.write_text("kind: backbone\nname: resnet18\nweights: null\ninput_size: 32\n")
    args = ["features", challenge, "--extractor", extractor, "--cache", tmp_path / "cache", "--no-progress"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "× 512" in first.output
    stores = sorted((tmp_path / "cache" / "features").iterdir())
    kinds = sorted(json.loads((s / "manifest.json").read_text())["config"]["kind"] for s in stores)
    assert kinds == ["backbone", "pixels"]  # the backbone read the pixels store it built
    assert all((store / "complete.json").is_file() for store in stores)
    second = invoke(*args)
    assert second.exit_code == 0 and first.output == second.output
    bad = invoke("features", challenge, "--extractor", "no_such_extractor")
    assert bad.exit_code == 2 and "no such file, and not one of" in bad.output


@pytest.mark.e2e
def test_run_prepares_the_source_set_for_models_that_bootstrap_from_one(tmp_path):
    config = tmp_path / "semisup.yaml"
    config.write_text(yaml.safe_dump({
        "name": "semisup-tiny", "workdir": str(tmp_path / "work"),
        "data": {"synthetic": {"preset": "tiny"}},
        "features": {"extractor": {"kind": "backbone", "name": "resnet18", "input_size": 32}},
        "source": {"n_per_class": 8},
        "evaluation": {"n_splits": 2, "n_repeats": 1},
        "models": [{"name": "semisup", "params": {
            "n_iterations": 2, "early_iterations": 1, "early_per_iteration": 1,
            "late_per_iteration": 1, "source_val_size": 4, "epochs": 2}}],
        "submission": {"dir": str(tmp_path / "subs")},
    }))
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "work" / "runs").iterdir())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    source_features = resolved["models"][0]["params"]["source_features"]
    assert Path(source_features).is_file() and source_features.endswith(".npz")
    # The model's own features: the run's extractor stain-matched to the source set.
    assert resolved["models"][0]["features"]["stain"]["reference"].endswith("ALL_IDB2/img")
    assert "stain" not in resolved["features"]["extractor"]  # other models keep theirs
    assert (tmp_path / "work" / "data" / "allidb2-seed0-n8" / "ALL_IDB2" / "img").is_dir()
    assert len(pd.read_csv(run / "models" / "semisup" / "oof.csv")) == len(
        pd.read_csv(run / "cohort" / "patients.csv").query("split == 'train'"))
    no_source = tmp_path / "no_source.yaml"
    no_source.write_text(config.read_text().replace("source:\n  n_per_class: 8\n", ""))
    result = invoke("run", no_source, "--no-progress")
    assert result.exit_code == 2 and "add a `source:` section" in result.output


def test_a_model_parameter_typo_fails_before_any_work(tmp_path):
    """Checked when the config loads, before the pipeline (and torch) load or data is read."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from milbench.cli import app; "
            f"result = CliRunner().invoke(app, ['run', {str(CONFIGS / 'pipeline.yaml')!r}, '--set', "
            f"'models.2.params.Cc=5', '--set', 'workdir={tmp_path / 'work'}']); "
            "print(result.exit_code, 'torch' in sys.modules); print(result.output)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, _, output = result.stdout.partition("\n")
    assert first == "2 False", result.stdout + result.stderr
    assert "model 'dmil': unknown parameter 'Cc'" in output and "pca_components" in output
    assert not (tmp_path / "work").exists()


def test_bench_cohort_on_a_real_layout_and_on_a_synthetic_cohort(tmp_path, challenge):
    out = tmp_path / "difficulty.json"
    result = invoke("bench", "cohort", challenge, "--out", out, "--repeats", "2")
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert set(figures) == {"clinical_only", "patients"}  # no truth: the clinical figure only
    assert figures["clinical_only"]["n_repeats"] == 2 and figures["patients"]["train"] == 15
    assert "clinical_only.cv_balanced_accuracy_mean" in result.output

    from milbench.synth import generate_cohort

    cohort = generate_cohort(tmp_path / "tiny", "tiny", seed=0)
    result = invoke("bench", "cohort", cohort, "--out", tmp_path / "tiny.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "tiny.json").read_text()) == json.loads(
        (cohort / "truth" / "difficulty.json").read_text())
    missing = invoke("bench", "cohort", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "nowhere" in missing.output


def test_synth_takes_any_knob(tmp_path):
    bags = "{tumoral_median: 3, reactive_median: 3, sigma: 0.1, low: 2, high: 4}"
    knobs = ["n_train_tumoral=6", "n_train_reactive=4", "n_test_tumoral=2", "n_test_reactive=2",
             f"train_bags={bags}", f"test_bags={bags}", "label_noise=0.2", "n_sites=2",
             "site_tumoral_odds=[1, 1]", "site_mix_train=[1, 2]", "site_mix_test=[2, 1]"]
    args = ["synth", "realistic", "--out", tmp_path / "c", "--workers", "1"]
    result = invoke(*args, *[part for knob in knobs for part in ("--knob", knob)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "synth.json").read_text())
    assert manifest["knobs"]["label_noise"] == 0.2 and manifest["preset_spec"]["n_sites"] == 2
    patients = pd.read_csv(tmp_path / "c" / "truth" / "patients.csv")
    assert set(patients["site"]) <= {0, 1} and patients["label_flipped"].sum() == 2
    bad = invoke("synth", "realistic", "--out", tmp_path / "d", "--knob", "n_site=2")
    assert bad.exit_code == 2 and "n_site" in bad.output and not (tmp_path / "d").exists()

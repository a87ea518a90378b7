"""Resumable runs: a run stopped by a signal mid-CV keeps its finished folds and, resumed,
gives the results of an uninterrupted run; a resume with another config is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from milbench.cli import app
from milbench.config import ConfigError, load_config
from milbench.pipeline import run_pipeline

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Clinical models only (no feature extraction); 3-fold CV x 12 repeats gives enough folds to
# stop the run in the middle of them.
SETTINGS = ["models=[{name: clinical_logreg}, {name: clinical_xgb}]", "features.extractor=none",
            "data.synthetic.preset=tiny", "evaluation.n_splits=3", "evaluation.n_repeats=12"]
TIMING = ["seconds_per_fit"]


def settings(workdir: Path) -> list[str]:
    return [*SETTINGS, f"workdir={workdir}", f"submission.dir={workdir / 'subs'}"]


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=TIMING)


def test_a_run_stopped_by_a_signal_resumes_to_the_same_results(tmp_path):
    straight = run_pipeline(load_config(CONFIGS / "pipeline.yaml", settings(tmp_path / "a")),
                            progress=False)

    work = tmp_path / "b"
    args = [sys.executable, "-m", "milbench", "run", str(CONFIGS / "pipeline.yaml"),
            "--no-progress", *[item for s in settings(work) for item in ("--set", s)]]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    records: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        records = list(work.glob("runs/*/fits/clinical_xgb/*.json"))
        if len(records) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    run_dir = records[0].parents[2]
    assert "Resume with:" in stderr and f"--resume {run_dir}" in stderr.replace("\n", " ")
    kept = list(run_dir.glob("fits/clinical_xgb/r*-f*.json"))
    assert 3 <= len(kept) < 36 and not (run_dir / "report.md").exists()

    # The run directory alone: it resumes with the config it recorded (overrides included).
    resumed = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert len(list(work.glob("runs/*"))) == 1  # continued in place, no new run directory
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(straight.run_dir))
    for model in ("clinical_logreg", "clinical_xgb"):
        pd.testing.assert_frame_equal(pd.read_csv(run_dir / "models" / model / "oof.csv"),
                                      pd.read_csv(straight.run_dir / "models" / model / "oof.csv"))
    # One submission per model: the one written before the stop is kept, not written again.
    assert sorted(p.name for p in (work / "subs").glob("*.csv")) == [
        "pipeline-clinical_logreg-v1.csv", "pipeline-clinical_xgb-v1.csv"]


FEATURES = ["models=[{name: clinical_logreg}, {name: meanpool_svm}]", "data.synthetic.preset=tiny",
            "features.extractor={kind: backbone, name: resnet18, weights: null, input_size: 32}",
            "evaluation.n_splits=2"]


def test_a_resume_with_another_config_is_refused_before_any_extraction(tmp_path, monkeypatch):
    base = [*FEATURES, f"workdir={tmp_path}", "submission.enabled=false"]
    first = run_pipeline(load_config(CONFIGS / "pipeline.yaml", base), progress=False)
    import preprocessing.extract

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before the refusal")

    monkeypatch.setattr(preprocessing.extract, "extract_features", no_extraction)
    changed = load_config(CONFIGS / "pipeline.yaml", [*base, "evaluation.n_repeats=2"])
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot resume .*: the config differs in "
                                          r"evaluation\.n_repeats"):
        run_pipeline(changed, progress=False, resume=first.run_dir)
    assert time.monotonic() - started < 5
    assert os.path.isdir(first.run_dir)
    # The same config on changed data (an image rewritten since): refused too, before any work.
    image = next((tmp_path / "data").glob("synthetic-tiny-*/trainset/*/*.jpg"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match="the data differs"):
        run_pipeline(load_config(CONFIGS / "pipeline.yaml", base), progress=False,
                     resume=first.run_dir)


def test_resuming_a_folder_that_is_no_run_directory_is_refused_by_name(tmp_path):
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "holds no config_requested.yaml" in result.output

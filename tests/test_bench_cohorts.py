"""`milbench bench cohorts` on `tiny` cohorts: per-cohort records that agree with each cohort's
run, the across-cohort aggregation against hand-computed figures, resume after an interruption,
adding cohorts, a knob sweep's files, and bad input refused by name before any work."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from milbench.bench import cohorts as bench
from milbench.cli import app
from milbench.config import ConfigError

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PIPELINE = CONFIGS / "pipeline.yaml"
# Seconds per tiny cohort: the baseline and one image model on random ResNet-18 vectors.
MODELS = "[{name: clinical_logreg}, {name: meanpool_svm}]"
RESNET = "{kind: backbone, name: resnet18, weights: null, input_size: 32, segmentation: null}"
TIMELESS = ["seconds_per_fit", "run_dir"]


def overrides(workdir: Path) -> list[str]:
    return [f"models={MODELS}", f"features.extractor={RESNET}", "evaluation.n_splits=2",
            f"workdir={workdir}"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cohorts-work")  # cohorts and feature stores, shared


@pytest.fixture(scope="module")
def three(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "bench"
    outcome = bench.run_cohorts_bench(PIPELINE, out, preset="tiny", seeds=[0, 1, 2],
                                      overrides=overrides(workdir), progress=False)
    return out, outcome


def _tables(out: Path) -> list[pd.DataFrame]:
    return [pd.read_csv(out / "records.csv").drop(columns=TIMELESS),
            pd.read_csv(out / "summary.csv").drop(columns="seconds_per_fit")]


def test_records_agree_with_each_cohorts_run(three):
    out, outcome = three
    records = outcome.records
    assert len(records) == 6 and set(records["model"]) == {"clinical_logreg", "meanpool_svm"}
    assert sorted(records["seed"].unique()) == [0, 1, 2]
    for record in records.itertuples():
        run = Path(record.run_dir)
        metrics = pd.read_csv(run / "metrics.csv").set_index("model")
        compared = pd.read_csv(run / "comparisons.csv").set_index("model").loc["meanpool_svm"]
        # The mean over folds, as the run's paired comparison has it (its gain subtracts exactly).
        assert record.cv_balanced_accuracy == pytest.approx(
            compared["model_mean" if record.model == "meanpool_svm" else "reference_mean"])
        assert record.test_balanced_accuracy == metrics.loc[record.model, "hidden_test_balanced_accuracy"]
        baseline_test = metrics.loc["clinical_logreg", "hidden_test_balanced_accuracy"]
        assert record.test_gain == pytest.approx(record.test_balanced_accuracy - baseline_test)
        assert record.cv_gain == pytest.approx(np.mean(record.fold_differences))
        if record.model == "clinical_logreg":
            assert record.cv_gain == 0 and record.test_gain == 0
        else:  # the cohort's own paired comparison, as the run wrote it
            assert record.cv_gain == pytest.approx(compared["mean_difference"])
            assert record.cv_gain_ci_low == pytest.approx(compared["ci_low"])
        assert json.loads((out / "records" / "default" / f"seed-{record.seed}" /
                           f"{record.model}.json").read_text())["model"] == record.model
    assert (out / "forest.png").stat().st_size > 5000
    table = (out / "table.md").read_text()
    assert "meanpool_svm" in table and "## default (3 cohorts; baseline clinical_logreg; mean room" in table
    # The room of each cohort: its combined oracle minus clinical-only, from its truth.
    from milbench.synth.difficulty import cohort_difficulty

    first = records.iloc[0]
    root = yaml.safe_load((Path(first.run_dir) / "config.yaml").read_text())["data"]["resolved_root"]
    figures = cohort_difficulty(root)
    assert first.room == pytest.approx(figures["combined_oracle"]["cv_balanced_accuracy_mean"]
                                       - figures["clinical_only"]["cv_balanced_accuracy_mean"])


def test_aggregation_matches_a_hand_computed_example():
    records = pd.DataFrame({
        "cell": "default", "seed": [0, 1, 2] * 2, "model": ["base"] * 3 + ["image"] * 3,
        "baseline": "base", "cv_balanced_accuracy": [0.7, 0.7, 0.7, 0.8, 0.7, 0.9],
        "cv_gain": [0.0, 0.0, 0.0, 0.1, 0.0, 0.2], "test_balanced_accuracy": [0.8] * 3 + [0.9, 0.7, 0.8],
        "test_gain": [0.0] * 3 + [0.1, -0.1, 0.0], "instance_auc": [np.nan] * 3 + [0.6, 0.7, 0.8],
        "seconds_per_fit": 1.0, "room": [0.08, 0.1, 0.12] * 2, "room_test": 0.2})
    row = bench.aggregate(records, target_gain=0.05).set_index("model").loc["image"]
    # Gains 0.1, 0.0, 0.2: mean 0.1, sd 0.1, t(0.975, 2 df) = 4.302653.
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert row["cohorts"] == 3 and row["cv_gain"] == pytest.approx(0.1)
    assert row["cv_gain_ci_low"] == pytest.approx(0.1 - half, abs=1e-6)
    assert row["cv_gain_ci_high"] == pytest.approx(0.1 + half, abs=1e-6)
    assert row["cv_win_share"] == pytest.approx(2 / 3)  # a gain of exactly zero is no win
    assert row["test_gain"] == pytest.approx(0.0) and row["test_win_share"] == pytest.approx(1 / 3)
    assert row["instance_auc"] == pytest.approx(0.7)
    assert row["room_share"] == pytest.approx(0.1 / 0.1) and row["test_room_share"] == 0.0
    # Power: (t(0.975, 2) + t(0.8, 2)) * sd / sqrt(3), with t(0.8, 2 df) = 1.060660.
    assert row["detectable_cv_gain"] == pytest.approx((4.302653 + 1.060660) * 0.1 / math.sqrt(3),
                                                      abs=1e-6)
    assert row["cohorts_for_target_gain"] == bench.cohorts_needed(0.05, 0.1)


def test_cohorts_needed_inverts_the_detectable_gain():
    for n in (3, 10, 40):
        assert bench.cohorts_needed(bench.detectable_gain(0.08, n), 0.08) == n
    assert math.isnan(bench.detectable_gain(0.08, 1))


def test_an_interrupted_bench_resumes_to_identical_tables(three, workdir, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    real = bench.run_cohort
    ran = []

    def interrupted_at_seed_2(config_json, baseline):
        seed = json.loads(config_json)["data"]["synthetic"]["seed"]
        if seed == 2:
            raise KeyboardInterrupt
        ran.append(seed)
        return real(config_json, baseline)

    monkeypatch.setattr(bench, "run_cohort", interrupted_at_seed_2)
    with pytest.raises(KeyboardInterrupt):
        bench.run_cohorts_bench(PIPELINE, out, preset="tiny", seeds=[0, 1, 2],
                                overrides=overrides(workdir), progress=False)
    assert sorted(p.name for p in (out / "records" / "default").iterdir()) == ["seed-0", "seed-1"]
    assert not (out / "summary.csv").exists()

    monkeypatch.setattr(bench, "run_cohort", lambda *task: ran.append("again") or real(*task))
    bench.run_cohorts_bench(PIPELINE, out, preset="tiny", seeds=[0, 1, 2],
                            overrides=overrides(workdir), progress=False)
    assert ran == [0, 1, "again"]  # only the interrupted cohort ran again
    for resumed, straight in zip(_tables(out), _tables(three[0]), strict=True):
        pd.testing.assert_frame_equal(resumed, straight)


def test_more_cohorts_add_to_the_same_folder(three, workdir, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    shutil.copytree(three[0], out)
    seeds_run = []
    real = bench.run_cohort
    monkeypatch.setattr(bench, "run_cohort", lambda config_json, baseline: seeds_run.append(
        json.loads(config_json)["data"]["synthetic"]["seed"]) or real(config_json, baseline))
    outcome = bench.run_cohorts_bench(PIPELINE, out, preset="tiny", seeds=[0, 1, 2, 3],
                                      overrides=overrides(workdir), progress=False)
    assert seeds_run == [3]
    assert set(outcome.summary["cohorts"]) == {4}
    before = pd.read_csv(three[0] / "records.csv").drop(columns=TIMELESS)
    after = pd.read_csv(out / "records.csv").drop(columns=TIMELESS)
    pd.testing.assert_frame_equal(after.iloc[:6], before)


def test_a_sweep_writes_its_table_and_plot(workdir, tmp_path):
    out = tmp_path / "sweep"
    outcome = bench.run_cohorts_bench(PIPELINE, out, preset="tiny", seeds=[0, 1],
                                      sweep="witness_rate=0.3,0.9", overrides=overrides(workdir),
                                      progress=False)
    sweep = pd.read_csv(out / "sweep.csv")
    assert sorted(sweep["witness_rate"].unique()) == [0.3, 0.9]
    assert set(sweep["cohorts"]) == {2} and len(sweep) == 4
    assert set(outcome.records["cell"]) == {"witness_rate=0.3", "witness_rate=0.9"}
    assert (out / "sweep.png").stat().st_size > 5000
    for cell in ("witness_rate=0.3", "witness_rate=0.9"):
        assert (out / f"forest-{cell}.png").is_file()
    generated = sorted(json.loads(path.read_text())["knobs"]["witness_rate"]
                       for path in Path(workdir, "data").glob("synthetic-tiny-seed1-*/synth.json"))
    assert generated == [0.3, 0.9]  # each cell's cohorts drawn with its own knob


@pytest.mark.parametrize("arguments, message", [
    ({"knob": ["witness_rte=0.1"]}, "unknown synthetic knob.*witness_rte"),
    ({"sweep": "signal_strenth=0.1,0.2"}, "unknown synthetic knob.*signal_strenth"),
    ({"sweep": "witness_rate=0.1,7"}, "witness_rate"),
    ({"seeds": []}, "the seed list is empty"),
    ({"overrides_extra": ["models=[{name: meanpool_svm}]"]}, "has no baseline"),
])
def test_bad_input_is_refused_by_name_before_any_work(tmp_path, arguments, message):
    workdir, out = tmp_path / "work", tmp_path / "bench"
    extra = arguments.pop("overrides_extra", [])
    with pytest.raises((ValueError, ConfigError), match=message):
        bench.run_cohorts_bench(PIPELINE, out, preset="tiny", **{"seeds": [0], **arguments},
                                overrides=[*overrides(workdir), *extra], progress=False)
    assert not out.exists() and not workdir.exists()


def test_a_folder_of_another_config_is_refused(three, workdir):
    with pytest.raises(ConfigError, match="differs in config.evaluation.n_splits"):
        bench.run_cohorts_bench(PIPELINE, three[0], preset="tiny", seeds=[0],
                                overrides=[*overrides(workdir), "evaluation.n_splits=3"],
                                progress=False)


def test_the_command_line_names_a_bad_seed_list(tmp_path):
    result = CliRunner().invoke(app, ["bench", "cohorts", str(PIPELINE), "--out", str(tmp_path / "b"),
                                      "--seeds", "1,x"])
    assert result.exit_code == 2 and "--seeds '1,x' must be comma-separated integers" in result.output


def test_the_folder_identity_ignores_what_does_not_change_the_records(tmp_path):
    base = bench.cohort_config(PIPELINE, overrides(tmp_path), "tiny", bench.Cohort("default", {}, 0), 1)
    moved = base.model_copy(update={"workdir": str(tmp_path / "elsewhere"), "save_models": False,
                                    "features": base.features.model_copy(update={"source": "x.yaml"})})
    assert bench._bench_identity(moved, "tiny") == bench._bench_identity(base, "tiny")
    changed = base.model_copy(update={"seed": 3})
    assert bench._bench_identity(changed, "tiny") != bench._bench_identity(base, "tiny")

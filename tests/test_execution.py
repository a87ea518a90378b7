"""Execution backends: the same run, ablation and extraction on ``local`` and on a local Ray
instance (started here, 2 CPUs, no dashboard) give identical results; a crashed task is retried;
an unreachable cluster, a missing Ray and a worker that cannot see the store fail clearly."""

from __future__ import annotations

import operator
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import yaml
from challenge_layout import default_rows, write_challenge

from milbench import ablation
from milbench.config import load_config
from milbench.evaluation.splits import load_folds
from milbench.execution import (
    FAIL_ONCE_VARIABLE,
    ExecutionConfig,
    ExecutionError,
    Executor,
    connect_ray,
    require_ray,
)
from milbench.pipeline import run_pipeline
from milbench.tune import run_tune, score_trial
from preprocessing.extract import extract_features
from preprocessing.forward import shard_ranges
from preprocessing.toy import write_toy_cohort

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RAY = ExecutionConfig(backend="ray", jobs=2)
RESNET = "{kind: backbone, name: resnet18, weights: null, input_size: 32, segmentation: null}"
MODELS = ("[{name: clinical_logreg}, {name: meanpool_svm},"
          " {name: dmil, params: {max_epochs: 4, validation_fraction: 0}}]")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module; the executors find it and leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_tasks_come_back_by_index_on_every_backend():
    tasks = [(i, i) for i in range(7)]  # a library function: workers import it by name
    for config in (ExecutionConfig(), ExecutionConfig(jobs=2), RAY):
        with Executor(config) as executor:
            results = dict(executor.map(operator.mul, tasks))
        assert results == {i: i * i for i in range(7)}, config


def _run_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    tables = {"metrics": pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds_per_fit"])}
    for oof in sorted(run_dir.glob("models/*/oof.csv")):
        tables[oof.parent.name] = pd.read_csv(oof)
    for test in sorted(run_dir.glob("models/*/test_predictions.csv")):
        tables[f"{test.parent.name} test"] = pd.read_csv(test)
    return tables


def test_a_run_gives_the_same_tables_on_local_and_on_ray(tmp_path):
    workdir = tmp_path / "work"  # one cohort and one feature store for the three runs
    outcomes = {}
    for label, backend, jobs in (("serial", "local", 1), ("pool", "local", 2), ("ray", "ray", 2)):
        config = load_config(CONFIGS / "pipeline.yaml", [
            f"models={MODELS}", f"features.extractor={RESNET}", "data.synthetic.preset=tiny",
            "evaluation.n_splits=2", "evaluation.n_repeats=2", f"workdir={workdir}",
            "submission.enabled=false", f"execution.backend={backend}", f"execution.jobs={jobs}"])
        outcomes[label] = _run_tables(run_pipeline(config, progress=False).run_dir)
    assert {"clinical_logreg", "meanpool_svm", "dmil"} <= set(outcomes["ray"])
    for label in ("pool", "ray"):
        for name, table in outcomes["serial"].items():
            pd.testing.assert_frame_equal(outcomes[label][name], table, obj=f"{label} {name}")


def test_a_cohorts_bench_gives_the_same_tables_on_local_and_on_ray(tmp_path):
    """One cohort per Ray worker, each generating its own data; the local bench runs them one
    after another with both cores, the Ray workers with one each, so scores may differ in the
    last bits of a sum, never in a prediction."""
    from milbench.bench.cohorts import run_cohorts_bench

    tables = {}
    for backend, jobs in (("local", 1), ("ray", 2)):
        out = tmp_path / backend
        run_cohorts_bench(CONFIGS / "pipeline.yaml", out, preset="tiny", seeds=[0, 1],
                          overrides=[f"models={MODELS}", f"features.extractor={RESNET}",
                                     "evaluation.n_splits=2", f"workdir={tmp_path / backend / 'work'}"],
                          backend=backend, jobs=jobs, progress=False)
        tables[backend] = pd.read_csv(out / "summary.csv").drop(columns="seconds_per_fit")
    assert set(tables["ray"]["model"]) == {"clinical_logreg", "meanpool_svm", "dmil"}
    pd.testing.assert_frame_equal(tables["ray"], tables["local"], check_exact=False, rtol=1e-9)


@pytest.fixture
def grid(tmp_path):
    challenge = write_challenge(tmp_path / "challenge", default_rows(n_train=20, n_test=2))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-grid", "base": str(CONFIGS / "clinical.yaml"), "repeats": 3,
        "protocol": {"kind": "cv", "n_splits": 3},
        "variants": {"logreg": ["models=[{name: clinical_logreg}]"],
                     "xgb": ["models=[{name: clinical_xgb, params: {n_estimators: 20}}]"]},
    }))
    return path, [f"data.root={challenge}", f"workdir={tmp_path / 'work'}"]


def _ablation_tables(run_dir: Path) -> list[pd.DataFrame]:
    table = pd.read_csv(run_dir / "ablation.csv").drop(columns=["fit_seconds_per_cell"])
    return [table, pd.read_csv(run_dir / "comparisons.csv")]


def test_an_ablation_gives_the_same_tables_on_local_and_on_ray(grid):
    path, overrides = grid
    local, _ = ablation.run_ablation(path, overrides, backend="local", jobs=2, progress=False)
    on_ray, _ = ablation.run_ablation(path, overrides, backend="ray", jobs=2, progress=False)
    for expected, actual in zip(_ablation_tables(local), _ablation_tables(on_ray), strict=True):
        pd.testing.assert_frame_equal(actual, expected)
    assert yaml.safe_load((on_ray / "execution.json").read_text())["backend"] == "ray"


def test_a_task_whose_worker_dies_is_retried_and_the_grid_completes(grid, tmp_path, monkeypatch):
    path, overrides = grid
    reference, _ = ablation.run_ablation(path, overrides, backend="local", jobs=1, progress=False)
    marker = tmp_path / "fault-injected"
    monkeypatch.setenv(FAIL_ONCE_VARIABLE, str(marker))
    retried, _ = ablation.run_ablation(path, overrides, backend="ray", jobs=2, progress=False)
    assert marker.is_file()  # one worker did die mid-task
    assert len(list((retried / "fits").rglob("*.json"))) == 18  # 2 variants x 3 repeats x 3 folds
    for expected, actual in zip(_ablation_tables(reference), _ablation_tables(retried), strict=True):
        pd.testing.assert_frame_equal(actual, expected)


def test_an_unreachable_cluster_fails_fast_naming_the_address():
    started = time.monotonic()
    with pytest.raises(ExecutionError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:9"):
        connect_ray(ExecutionConfig(backend="ray", address="127.0.0.1:9"))
    assert time.monotonic() - started < 10
    with pytest.raises(ExecutionError, match="must look like host:port"):
        connect_ray(ExecutionConfig(backend="ray", address="nowhere"))


def test_a_worker_that_cannot_see_the_store_fails_naming_the_path(tmp_path):
    missing = tmp_path / "not-mounted" / "cache"
    for config in (RAY, ExecutionConfig(jobs=2)):
        with Executor(config, shared_paths=[tmp_path, missing]) as executor:
            with pytest.raises(ExecutionError, match=rf"cannot see {missing}.*shared|mounts"):
                list(executor.map(operator.mul, [(1, 1), (2, 2)]))


def test_the_ray_backend_without_ray_stops_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ExecutionError, match=r'pip install "milbench\[ray\]"'):
        require_ray(RAY)
    config = load_config(CONFIGS / "clinical.yaml", [f"workdir={tmp_path / 'work'}",
                                                      "execution.backend=ray"])
    with pytest.raises(ExecutionError, match="Ray is not installed"):
        run_pipeline(config, progress=False)
    assert not (tmp_path / "work").exists()


def test_shards_start_on_batch_boundaries_and_cover_every_row():
    ranges = shard_ranges(23, 3, 4)
    assert ranges == [(0, 8), (8, 16), (16, 23)]
    assert shard_ranges(5, 4, 8) == [(0, 5)]
    rows = [row for start, stop in shard_ranges(1000, 7, 32) for row in range(start, stop)]
    assert rows == list(range(1000))


CONFIG = {"kind": "backbone", "name": "resnet18", "weights": None, "input_size": 32}


def test_sharded_extraction_on_ray_gives_the_serial_store(tmp_path):
    cohort = write_toy_cohort(tmp_path / "toy", n_patients=5, images_per_patient=3, size=48,
                              n_test=1)
    serial = extract_features(cohort, CONFIG, tmp_path / "serial", progress=False, batch_size=4,
                              num_workers=0)

    def one_part_then_stop(function, tasks):  # an extraction interrupted after one part
        yield 0, function(*tasks[0])
        raise KeyboardInterrupt

    cache = tmp_path / "sharded"
    with pytest.raises(KeyboardInterrupt):
        extract_features(cohort, CONFIG, cache, progress=False, batch_size=4, num_workers=0,
                         shards=3, map_tasks=one_part_then_stop)
    store_root = cache / "features" / serial.root.name
    assert len(list((store_root / "parts").glob("*.npy"))) == 1
    assert not (store_root / "complete.json").exists()  # incomplete until every part is in
    with Executor(RAY, shared_paths=[tmp_path]) as executor:
        sharded = extract_features(cohort, CONFIG, cache, progress=False, batch_size=4,
                                   num_workers=0, shards=3, map_tasks=executor.map)
    assert sharded.root.name == serial.root.name and sharded.is_complete
    assert sharded.verify() == [] and not (sharded.root / "parts").exists()
    np.testing.assert_array_equal(np.asarray(sharded.features()), np.asarray(serial.features()))


def test_tune_on_ray_runs_trials_two_at_a_time_with_the_local_scores(tmp_path):
    config = load_config(CONFIGS / "clinical.yaml", [
        "models=[{name: clinical_logreg}]", "data.synthetic.preset=small", "evaluation.n_splits=3",
        "evaluation.n_repeats=1", f"workdir={tmp_path / 'work'}", "execution.backend=ray",
        "execution.jobs=2", "tune.clinical_logreg={C: {low: 0.001, high: 10.0, log: true}}"])
    outcome = run_tune(config, "clinical_logreg", trials=4, progress=False)
    trials = pd.read_csv(outcome.run_dir / "trials.csv", parse_dates=["started", "completed"])
    assert (trials["state"] == "COMPLETE").sum() == 4
    # Asked in pairs: the second of each pair started before the first one finished.
    assert trials.loc[1, "started"] < trials.loc[0, "completed"]
    folds = load_folds(outcome.run_dir / "splits" / "folds.csv")
    for _, trial in trials.iterrows():
        entry = config.models[0].model_copy(update={"params": {"C": float(trial["param_C"])}})
        local = score_trial(config.model_dump_json(), entry.model_dump_json(), folds)
        assert local["value"] == trial["value"]


def test_the_overhead_bench_measures_every_backend(tmp_path):
    from milbench.bench.execution import bench_execution_command

    frame = bench_execution_command(tasks=6, jobs=2, task_seconds=0.01, out=tmp_path)
    assert list(frame["backend"]) == ["local", "local", "ray"]
    assert (frame["no_op_ms_per_task"] > 0).all() and (frame["efficiency"] > 0).all()
    assert "| ray" in (tmp_path / "execution.md").read_text()

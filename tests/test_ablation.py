"""Ablation grids: table values from real models, resume after an interruption, parallel = serial."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from challenge_layout import default_rows, write_challenge

import milbench.ablation as ablation
from milbench.config import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def grid(tmp_path):
    challenge = write_challenge(tmp_path / "challenge", default_rows(n_train=20, n_test=2))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-grid", "base": str(CONFIGS / "clinical.yaml"), "repeats": 3,
        "protocol": {"kind": "split", "val_fraction": 0.3}, "n_jobs": 1,
        "variants": {"logreg": ["models=[{name: clinical_logreg}]"],
                     "xgb": ["models=[{name: clinical_xgb, params: {n_estimators: 20}}]"]},
    }))
    overrides = [f"data.root={challenge}", f"workdir={tmp_path / 'work'}"]
    return path, overrides


def test_table_matches_cell_results(grid):
    path, overrides = grid
    run_dir, table = ablation.run_ablation(path, overrides, progress=False)
    cells = sorted((run_dir / "cells").rglob("*.json"))
    assert len(cells) == 6
    logreg = [json.loads(p.read_text()) for p in cells if p.parent.name == "logreg"]
    values = pd.Series([c["metrics"]["balanced_accuracy"] for c in logreg])
    assert table.loc["logreg", "balanced_accuracy:mean"] == pytest.approx(values.mean())
    assert table.loc["logreg", "balanced_accuracy:std"] == pytest.approx(values.std(ddof=1))
    assert table.loc["logreg", "balanced_accuracy:max"] == pytest.approx(values.max())
    markdown = (run_dir / "ablation.md").read_text()
    best = table["balanced_accuracy:mean"].astype(float).idxmax()
    assert f"| {best} | **" in markdown
    # Every repeat used a different validation split, and the same cell is reproducible.
    again = ablation.run_cell(ablation.load_ablation(path, overrides)[1]["logreg"].model_dump_json(),
                              0, ablation.Protocol(kind="split", val_fraction=0.3).model_dump_json())
    assert again["metrics"] == logreg[0]["metrics"]


def test_interrupted_grid_resumes_without_redoing_cells(grid, monkeypatch):
    path, overrides = grid
    reference_dir, reference = ablation.run_ablation(path, overrides, progress=False)

    real_cell, calls = ablation.run_cell, []

    def interrupted_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)
        return real_cell(*args)

    monkeypatch.setattr(ablation, "run_cell", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation(path, overrides, progress=False)
    partial = max((Path(overrides[1].split("=", 1)[1]) / "ablations").iterdir())
    assert partial != reference_dir and len(list((partial / "cells").rglob("*.json"))) == 2
    assert not (partial / "ablation.csv").exists()

    calls.clear()
    monkeypatch.setattr(ablation, "run_cell", lambda *args: calls.append(args) or real_cell(*args))
    run_dir, table = ablation.run_ablation(path, overrides, resume=partial, progress=False)
    assert run_dir == partial and len(calls) == 4  # only the 4 missing cells ran
    pd.testing.assert_frame_equal(table.drop(columns="seconds_per_cell"),
                                  reference.drop(columns="seconds_per_cell"))


def test_parallel_workers_give_the_serial_table(grid):
    path, overrides = grid
    _, serial = ablation.run_ablation(path, overrides, n_jobs=1, progress=False)
    _, parallel = ablation.run_ablation(path, overrides, n_jobs=2, progress=False)
    pd.testing.assert_frame_equal(serial.drop(columns="seconds_per_cell"),
                                  parallel.drop(columns="seconds_per_cell"))


def test_resume_refuses_a_changed_config_and_variants_need_one_model(grid, tmp_path):
    path, overrides = grid
    run_dir, _ = ablation.run_ablation(path, overrides, progress=False)
    with pytest.raises(ConfigError, match="changed since this grid started"):
        ablation.run_ablation(path, [*overrides, "seed=5"], resume=run_dir, progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(CONFIGS / "clinical.yaml"), "variants": {"both": []}}))
    with pytest.raises(ConfigError, match="must evaluate exactly one model"):
        ablation.run_ablation(bad, overrides, progress=False)


def test_shipped_ablation_configs_resolve():
    for path in (CONFIGS / "ablation").glob("*.yaml"):
        spec, variants = ablation.load_ablation(path)
        assert variants and spec.repeats >= 1

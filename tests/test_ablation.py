"""Ablation grids: table values from real models, resume after an interruption, parallel = serial."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from challenge_layout import default_rows, write_challenge
from sklearn.metrics import balanced_accuracy_score

import milbench.ablation as ablation
import milbench.evaluation.cv as cv
from milbench.config import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def grid(tmp_path):
    challenge = write_challenge(tmp_path / "challenge", default_rows(n_train=20, n_test=2))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-grid", "base": str(CONFIGS / "clinical.yaml"), "repeats": 3,
        "protocol": {"kind": "split", "val_fraction": 0.3}, "execution": {"jobs": 1},
        "variants": {"logreg": ["models=[{name: clinical_logreg}]"],
                     "xgb": ["models=[{name: clinical_xgb, params: {n_estimators: 20}}]"]},
    }))
    overrides = [f"data.root={challenge}", f"workdir={tmp_path / 'work'}"]
    return path, overrides


def _recorded_balanced_accuracy(run_dir: Path, variant: str) -> dict[int, float]:
    """Per repeat, the balanced accuracy of the variant's recorded fold (one per repeat)."""
    values = {}
    for path in sorted((run_dir / "fits" / variant).glob("r*-f0.json")):
        rows = json.loads(path.read_text())["rows"]  # (repeat, fold, id, label, score, predicted)
        values[rows[0][0]] = balanced_accuracy_score([r[3] for r in rows], [r[5] for r in rows])
    return values


def test_table_matches_the_recorded_folds(grid):
    path, overrides = grid
    run_dir, table = ablation.run_ablation(path, overrides, progress=False)
    assert len(list((run_dir / "fits").rglob("*.json"))) == 6  # 2 variants x 3 repeats x 1 split
    logreg = _recorded_balanced_accuracy(run_dir, "logreg")
    values = pd.Series(list(logreg.values()))
    assert table.loc["logreg", "balanced_accuracy:mean"] == pytest.approx(values.mean())
    assert table.loc["logreg", "balanced_accuracy:std"] == pytest.approx(values.std(ddof=1))
    assert table.loc["logreg", "balanced_accuracy:max"] == pytest.approx(values.max())
    # Paired differences over the same splits: xgb minus logreg, repeat by repeat.
    xgb = _recorded_balanced_accuracy(run_dir, "xgb")
    differences = [xgb[repeat] - value for repeat, value in logreg.items()]
    comparisons = pd.read_csv(run_dir / "comparisons.csv")
    row = comparisons[(comparisons["variant"] == "xgb") & (comparisons["reference"] == "logreg")
                      & (comparisons["metric"] == "balanced_accuracy")].iloc[0]
    assert row["mean_difference"] == pytest.approx(sum(differences) / 3)
    assert row["n"] == 3 and row["ci_low"] <= row["mean_difference"] <= row["ci_high"]
    markdown = (run_dir / "ablation.md").read_text()
    assert "| logreg |" in markdown and "reference |" in markdown
    # Bold only where the best variant's interval against the other excludes zero.
    best = table["balanced_accuracy:mean"].astype(float).idxmax()
    other = "xgb" if best == "logreg" else "logreg"
    against = comparisons[(comparisons["variant"] == best) & (comparisons["reference"] == other)
                          & (comparisons["metric"] == "balanced_accuracy")].iloc[0]
    assert (f"| {best} | **" in markdown) == (against["ci_low"] > 0)
    # Every repeat used a different validation split.
    validation = [tuple(r[2] for r in json.loads(p.read_text())["rows"])
                  for p in sorted((run_dir / "fits" / "logreg").glob("*.json"))]
    assert len(set(validation)) == 3


def test_interrupted_grid_resumes_without_redoing_folds(grid, monkeypatch):
    path, overrides = grid
    reference_dir, reference = ablation.run_ablation(path, overrides, progress=False)

    real_fold, calls = cv.score_fold, []

    def interrupted_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)
        return real_fold(*args)

    monkeypatch.setattr(cv, "score_fold", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation(path, overrides, progress=False)
    partial = max((Path(overrides[1].split("=", 1)[1]) / "ablations").iterdir())
    assert partial != reference_dir and len(list((partial / "fits").rglob("*.json"))) == 2
    assert not (partial / "ablation.csv").exists()

    calls.clear()
    monkeypatch.setattr(cv, "score_fold", lambda *args: calls.append(args) or real_fold(*args))
    run_dir, table = ablation.run_ablation(path, overrides, resume=partial, progress=False)
    assert run_dir == partial and len(calls) == 4  # only the 4 missing folds ran
    pd.testing.assert_frame_equal(table.drop(columns="fit_seconds_per_cell"),
                                  reference.drop(columns="fit_seconds_per_cell"))


@pytest.mark.e2e
def test_parallel_workers_give_the_serial_table(grid):
    path, overrides = grid
    _, serial = ablation.run_ablation(path, overrides, jobs=1, progress=False)
    _, parallel = ablation.run_ablation(path, overrides, jobs=2, progress=False)
    pd.testing.assert_frame_equal(serial.drop(columns="fit_seconds_per_cell"),
                                  parallel.drop(columns="fit_seconds_per_cell"))


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


def test_best_variant_needs_an_interval_that_excludes_zero():
    table = pd.DataFrame({f"{m}:mean": [0.8, 0.7, 0.6] for m in ablation.METRICS},
                         index=["a", "b", "c"])

    def comparisons(low_vs_b: float) -> pd.DataFrame:
        rows = [{"variant": "a", "reference": ref, "metric": m, "mean_difference": 0.1,
                 "ci_low": low, "ci_high": 0.2, "p_value": 0.01, "n": 10}
                for m in ablation.METRICS for ref, low in (("b", low_vs_b), ("c", 0.05))]
        return pd.DataFrame(rows)

    assert ablation.best_variants(table, comparisons(0.01))["balanced_accuracy"] == "a"
    assert ablation.best_variants(table, comparisons(-0.01)) == {}


def test_cv_protocol_is_the_default_and_records_folds(grid, tmp_path):
    path, overrides = grid
    raw = yaml.safe_load(path.read_text())
    raw.pop("protocol")
    raw["repeats"] = 2
    path.write_text(yaml.safe_dump(raw))
    config, _ = ablation.load_ablation(path, overrides)
    assert config.protocol.kind == "cv" and config.protocol.n_splits == 5
    run_dir, _ = ablation.run_ablation(path, overrides, progress=False)
    assert sorted(p.name for p in (run_dir / "fits" / "logreg").iterdir()) == [
        f"r{repeat}-f{fold}.json" for repeat in range(2) for fold in range(5)]
    comparisons = pd.read_csv(run_dir / "comparisons.csv")
    assert set(comparisons["n"]) == {10}  # 5 folds x 2 repeats, paired


def test_unknown_reference_variant_is_refused(grid):
    path, overrides = grid
    raw = yaml.safe_load(path.read_text())
    raw["reference"] = "lgoreg"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="lgoreg"):
        ablation.load_ablation(path, overrides)

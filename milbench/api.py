"""The Python API for notebooks: run a config, read a finished run, reload its saved models.

    import milbench
    result = milbench.run("configs/pipeline.yaml", overrides=["data.synthetic.preset=tiny"])
    result.metrics                   # one row per model (CV and hidden-test figures)
    result.comparisons               # paired differences from the clinical baseline
    model = milbench.load_model(result.run_dir, "dmil")
    model.predict_proba(bags, clinical)
    milbench.predict(result.run_dir, "/path/to/new/challenge/folder")   # features included

Everything here calls the same functions as the command line; nothing is computed differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class RunResult:
    """A finished run directory, read back: its tables and the names of its saved models."""

    run_dir: Path
    metrics: pd.DataFrame
    comparisons: pd.DataFrame
    models: list[str]  # the models saved under models/<name>/model/

    def model(self, name: str):
        return load_model(self.run_dir, name)

    def test_predictions(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.run_dir / "models" / name / "test_predictions.csv",
                           dtype={"patient_id": str})


def run(config: str | Path = "configs/pipeline.yaml", data: str | Path | None = None,
        overrides: list[str] | None = None, progress: bool = False) -> RunResult:
    """``milbench run CONFIG [--data DATA] [--set ...]``: train, evaluate, save; the run read back."""
    from milbench.config import load_config
    from milbench.pipeline import run_pipeline

    settings = list(overrides or [])
    if data is not None:
        settings.append(f"data.root={data}")
    outcome = run_pipeline(load_config(config, settings), progress=progress)
    return load_run(outcome.run_dir)


def load_run(run_dir: str | Path) -> RunResult:
    """A finished run directory's metrics, comparisons and saved models."""
    from milbench.saved import MODEL_FOLDER

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished run directory (no metrics.csv)")
    comparisons_path = run_dir / "comparisons.csv"
    comparisons = pd.read_csv(comparisons_path) if comparisons_path.is_file() else pd.DataFrame()
    models = sorted(p.parent.name for p in (run_dir / "models").glob(f"*/{MODEL_FOLDER}"))
    return RunResult(run_dir, pd.read_csv(metrics_path), comparisons, models)


def predict(run_dir: str | Path, data: str | Path, models: list[str] | None = None,
            out: str | Path | None = None) -> pd.DataFrame:
    """``milbench predict RUN_DIR --data DATA``: the saved models' predictions for the test
    patients of the challenge folder ``data`` (model, patient_id, score, predicted); the files
    go to ``out`` (default ``RUN_DIR/predictions/<time>``)."""
    from milbench.prediction import predict_run

    return predict_run(run_dir, data, models, out, progress=False).predictions


def load_model(run_dir: str | Path, name: str):
    """The fitted model ``name`` of a run (``predict_proba(bags, clinical)`` and the rest of the
    bag-model contract), verified against its checksums and library versions."""
    from milbench.saved import load_saved_model

    return load_saved_model(run_dir, name)

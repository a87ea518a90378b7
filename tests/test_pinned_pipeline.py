"""The default pipeline's out-of-fold predictions on a tiny cohort, pinned bit for bit: a
refactor that changes behaviour (seeds, fold order, data preparation, a model's numerics) fails
here. After an intended change, rerun with MILBENCH_REPIN=1 and commit the new pin file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from milbench.config import load_config
from milbench.pipeline import run_pipeline

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PIN = Path(__file__).resolve().parent / "pinned" / "default_pipeline_tiny_oof.json"


@pytest.fixture
def one_torch_thread():
    """Pinned under one torch thread: other test modules set it at import, and autoencoder
    training sums in a thread-dependent order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_default_pipeline_oof_predictions_are_pinned(tmp_path, one_torch_thread):
    # The tiny preset with a few more training patients, so that the stacker's inner folds hold
    # two bags of each class inside a 2-fold outer CV.
    config = load_config(CONFIGS / "pipeline.yaml", [
        "data.synthetic.preset=tiny", "data.synthetic.knobs={n_train_tumoral: 8, n_train_reactive: 6}",
        "evaluation.n_splits=2", "evaluation.n_repeats=1", f"workdir={tmp_path}",
        "submission.enabled=false"])
    outcome = run_pipeline(config, progress=False)
    oof = {}
    for entry in config.models:
        frame = pd.read_csv(outcome.run_dir / "models" / entry.display_name / "oof.csv",
                            dtype={"patient_id": str})
        oof[entry.display_name] = {
            f"{r.repeat}/{r.fold}/{r.patient_id}": [repr(float(r.score)), int(r.predicted)]
            for r in frame.itertuples()}
    if os.environ.get("MILBENCH_REPIN"):
        PIN.write_text(json.dumps(oof, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(PIN.read_text())
    assert sorted(oof) == sorted(pinned)
    for model in pinned:
        assert oof[model] == pinned[model], f"out-of-fold predictions of {model} changed"

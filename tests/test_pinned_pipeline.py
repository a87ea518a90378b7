"""The default pipeline's out-of-fold predictions on a tiny cohort, pinned: a refactor that changes
behaviour (seeds, fold order, data preparation, a model's numerics) fails here. After an intended
change, rerun with MILBENCH_REPIN=1 and commit the new pin file.

Two comparisons, each where it holds:

- **Bit for bit, on this machine.** The pipeline runs twice in one child process, each run in its
  own working directory (cohort, features and fits all redone), and the two runs' predictions
  must be identical: the same config and seed give the same predictions, whatever the CPU.
- **Within a tolerance, against the pin.** The pin was made on another CPU. Every numeric library
  dispatches kernels by the CPU it finds (AVX-512 here, AVX2 there) and by the cache sizes it
  detects (oneDNN partitions a convolution's or a linear layer's backward reductions by them), so
  sums come out in another order and training moves in the low-order bits. The child holds each
  library to one common x86-64 code path and one thread, which removes most of it but not all:
  cluster/EMD trains a VAE, and an AMD EPYC moved its probabilities by up to 2e-4 from the pin
  made on an Intel Xeon, and the stacker fed by it by up to 4.5e-4. So probabilities are compared
  with ``|run - pin| <= ATOL + RTOL * |pin|``: the largest CPU difference seen is below half of it,
  while a real behaviour change crosses it many times over (one more VAE epoch in cluster/EMD
  moved its probabilities by up to 1.0e-2, about ten times the tolerance). A predicted class must
  agree with the pin unless the pinned probability lies within the tolerance of the 0.5 threshold,
  where a CPU difference alone can flip it. Fold assignments (repeat, fold, patient) are exact.

The autoencoder's features are left out: training it is not reproducible across CPUs even on the
common code path, and every model reading them moved by far more than the tolerance. The pinned
run gives every model the random ResNet-18 features of the segmented cells (inference only); the
autoencoder has its own tests (test_autoencoder.py, test_feature_store.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# End to end: runs the pipeline (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PIN = Path(__file__).resolve().parent / "pinned" / "default_pipeline_tiny_oof.json"

# |run - pin| <= ATOL + RTOL * |pin| on every probability (see the module docstring).
RTOL, ATOL = 1e-3, 5e-4
THRESHOLD = 0.5

COMMON_CODE_PATH = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OPENCV_CPU_DISABLE": "AVX512_SKX,AVX2,FMA3,AVX,FP16",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

# Run in the child, twice, each time in its own working directory: the tiny preset with a few
# more training patients, so that the stacker's inner folds hold two bags of each class inside a
# 2-fold outer CV.
PIPELINE = """
import json, sys
import pandas as pd
import torch
from milbench.config import load_config
from milbench.pipeline import run_pipeline

torch.set_num_threads(1)
configs, workdirs = sys.argv[1], sys.argv[2:]
runs = []
for workdir in workdirs:
    config = load_config(configs + "/pipeline.yaml", [
        "data.synthetic.preset=tiny", "data.synthetic.knobs={n_train_tumoral: 8, n_train_reactive: 6}",
        "evaluation.n_splits=2", "evaluation.n_repeats=1", "workdir=" + workdir,
        "submission.enabled=false",
        "features.extractor={kind: backbone, name: resnet18, weights: null, input_size: 64, "
        "segmentation: kmeans_saturation_hue}"])
    outcome = run_pipeline(config, progress=False)
    oof = {}
    for entry in config.models:
        frame = pd.read_csv(outcome.run_dir / "models" / entry.display_name / "oof.csv",
                            dtype={"patient_id": str})
        oof[entry.display_name] = {
            f"{r.repeat}/{r.fold}/{r.patient_id}": [repr(float(r.score)), int(r.predicted)]
            for r in frame.itertuples()}
    runs.append(oof)
print(json.dumps(runs))
"""


def assert_matches_pin(oof: dict, pinned: dict) -> None:
    """Every model's fold assignments exact, probabilities and classes within the tolerance."""
    assert sorted(oof) == sorted(pinned), "the pipeline's models changed"
    for model, rows in pinned.items():
        assert sorted(oof[model]) == sorted(rows), f"fold assignments of {model} changed"
        keys = sorted(rows)
        expected = np.array([float(rows[k][0]) for k in keys])
        actual = np.array([float(oof[model][k][0]) for k in keys])
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"out-of-fold probabilities of {model} changed")
        near_threshold = np.abs(expected - THRESHOLD) <= ATOL + RTOL * THRESHOLD
        flipped = [k for k, near in zip(keys, near_threshold, strict=True)
                   if not near and oof[model][k][1] != rows[k][1]]
        assert not flipped, f"predicted classes of {model} changed for {flipped}"


def test_default_pipeline_oof_predictions_are_deterministic_and_pinned(tmp_path):
    environment = {**os.environ, **COMMON_CODE_PATH}
    workdirs = [str(tmp_path / "first"), str(tmp_path / "second")]
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(CONFIGS), *workdirs],
                          env=environment, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first == second, "the same config and seed gave other predictions on this machine"
    if os.environ.get("MILBENCH_REPIN"):
        PIN.write_text(json.dumps(first, indent=1, sort_keys=True) + "\n")
    assert_matches_pin(first, json.loads(PIN.read_text()))


MOVED_MODEL = "cluster_emd"


def _moved_pin(score_delta: float = 0.0, flip_class: bool = False, to_fold: int | None = None) -> dict:
    """The pin with its first cluster/EMD row changed as a CPU or a behaviour change would."""
    pinned = json.loads(PIN.read_text())
    rows = pinned[MOVED_MODEL]
    key = sorted(rows)[0]
    score, predicted = rows[key]
    rows[key] = [repr(float(score) + score_delta), 1 - predicted if flip_class else predicted]
    if to_fold is not None:
        repeat, _, patient = key.split("/")
        rows[f"{repeat}/{to_fold}/{patient}"] = rows.pop(key)
    return pinned


def test_the_comparison_admits_a_cpu_sized_difference():
    assert_matches_pin(_moved_pin(score_delta=2e-4), json.loads(PIN.read_text()))


@pytest.mark.parametrize("change, message", [
    ({"score_delta": 1e-2}, "probabilities of cluster_emd changed"),  # about one more VAE epoch
    ({"flip_class": True}, "predicted classes of cluster_emd changed"),
    ({"to_fold": 9}, "fold assignments of cluster_emd changed"),
])
def test_the_comparison_refuses_a_behaviour_change(change, message):
    with pytest.raises(AssertionError, match=message):
        assert_matches_pin(_moved_pin(**change), json.loads(PIN.read_text()))

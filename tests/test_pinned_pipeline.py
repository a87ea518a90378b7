"""The default pipeline's out-of-fold predictions on a tiny cohort, pinned bit for bit: a
refactor that changes behaviour (seeds, fold order, data preparation, a model's numerics) fails
here. After an intended change, rerun with MILBENCH_REPIN=1 and commit the new pin file.

Bit for bit across machines: every numeric library dispatches kernels by the CPU it finds
(AVX-512 here, AVX2 there), and the sums come out in a different order. So the pipeline runs in
a fresh process with each library held to one common x86-64 code path and one thread (torch's
ATen kernels and oneDNN, MKL, OpenBLAS, NumPy and OpenCV); the pin was made the same way.

Even so, training the demo autoencoder is not reproducible across CPUs: with every setting above,
an Intel Xeon and an AMD EPYC (both AVX-512) trained different encoders (oneDNN partitions a
convolution's backward reductions by the cache sizes it detects), so every model reading its
features moved, while the models reading the random ResNet-18 features (inference only) matched
bit for bit. The pinned run therefore gives every model those ResNet-18 features of the
segmented cells; the autoencoder has its own tests (test_autoencoder.py, test_feature_store.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PIN = Path(__file__).resolve().parent / "pinned" / "default_pipeline_tiny_oof.json"

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

# Run in the child: the tiny preset with a few more training patients, so that the stacker's
# inner folds hold two bags of each class inside a 2-fold outer CV.
PIPELINE = """
import json, sys
import pandas as pd
import torch
from milbench.config import load_config
from milbench.pipeline import run_pipeline

torch.set_num_threads(1)
configs, workdir = sys.argv[1], sys.argv[2]
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
print(json.dumps(oof))
"""


def test_default_pipeline_oof_predictions_are_pinned(tmp_path):
    environment = {**os.environ, **COMMON_CODE_PATH}
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(CONFIGS), str(tmp_path)],
                          env=environment, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    oof = json.loads(done.stdout.strip().splitlines()[-1])
    if os.environ.get("MILBENCH_REPIN"):
        PIN.write_text(json.dumps(oof, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(PIN.read_text())
    assert sorted(oof) == sorted(pinned)
    for model in pinned:
        assert oof[model] == pinned[model], f"out-of-fold predictions of {model} changed"

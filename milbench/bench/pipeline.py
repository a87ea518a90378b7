"""Pipeline speed (`milbench bench pipeline`): wall time of each stage of a run config.

By default the default pipeline (configs/pipeline.yaml) on the generated `challenge` preset,
with a cold feature cache: the run's workdir is a fresh folder under ``out``, so the instance
features (autoencoder training and encoding included) are computed and timed, not read from
an earlier run. The cohort itself is generated once into the usual workdir and reused; its
generation, when it happens, is timed as its own stage. Submissions are not written.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from milbench.config import load_config
from milbench.data_roots import resolve_data_root
from milbench.io import atomic_write, atomic_write_json, atomic_write_text
from milbench.pipeline import run_pipeline

GOAL_SECONDS = 20 * 60  # the default pipeline on `challenge` within 20 min on 2 cores


def bench_pipeline_command(config: str | os.PathLike = "configs/pipeline.yaml", *,
                           preset: str = "challenge", data: str | os.PathLike | None = None,
                           overrides: list[str] = (), warm_cache: bool = False,
                           out: str | os.PathLike = ".milbench/bench/pipeline",
                           progress: bool = True, goal_seconds: float = GOAL_SECONDS
                           ) -> pd.DataFrame:
    """Run ``config`` once and return (and write) its stage times, the total and the goal."""
    out = Path(out)
    settings = [*overrides, "submission.enabled=false", f"data.synthetic.preset={preset}"]
    base = load_config(config, settings)
    started = time.perf_counter()
    root = Path(data) if data is not None else resolve_data_root(base.data, base.workdir, progress)
    generation = time.perf_counter() - started
    settings.append(f"data.root={root}")
    if not warm_cache:
        work = out / "work"
        shutil.rmtree(work / "cache", ignore_errors=True)  # cold: features are computed again
        settings.append(f"workdir={work}")
    run_config = load_config(config, settings)
    outcome = run_pipeline(run_config, progress=progress)
    stages = outcome.timings.copy()
    if data is None:
        stages = pd.concat([pd.DataFrame({"stage": ["generate cohort (synthetic only)"],
                                          "seconds": [generation]}), stages], ignore_index=True)
    stages["share"] = stages["seconds"] / stages["seconds"].sum()
    total = float(outcome.timings["seconds"].sum())
    summary = {
        "config": str(config), "data": str(root), "preset": None if data is not None else preset,
        "features": run_config.features.extractor, "feature_cache": "warm" if warm_cache else "cold",
        "n_splits": run_config.evaluation.n_splits, "n_repeats": run_config.evaluation.n_repeats,
        "pipeline_seconds": total, "goal_seconds": goal_seconds, "goal_met": total <= goal_seconds,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "run_dir": str(outcome.run_dir),
        "cv_balanced_accuracy": dict(zip(outcome.table["model"], outcome.table["balanced_accuracy"],
                                         strict=True)),
        "hidden_test_balanced_accuracy": (
            dict(zip(outcome.table["model"], outcome.table["hidden_test_balanced_accuracy"],
                     strict=True)) if "hidden_test_balanced_accuracy" in outcome.table else None),
    }
    atomic_write_text(out / "pipeline_bench.csv", stages.to_csv(index=False))
    atomic_write_json(out / "pipeline_bench.json", {**summary, "stages": stages.to_dict(orient="records")})
    _plot_stages(stages, total, goal_seconds, out / "pipeline_bench.png")
    return stages.assign(total_seconds=total, goal_met=summary["goal_met"])


def _plot_stages(stages: pd.DataFrame, total: float, goal_seconds: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 0.35 * len(stages) + 1.2))
    names = ["total", *stages["stage"]][::-1]
    minutes = [total / 60, *(stages["seconds"] / 60)][::-1]
    axis.barh(names, minutes, color=["#4c72b0"] * len(stages) + ["#55a868"])
    axis.axvline(goal_seconds / 60, color="#c44e52", linestyle="--", label="whole-pipeline goal")
    axis.set_xlabel("minutes")
    axis.set_title(f"pipeline stages: {total / 60:.1f} min in all")
    axis.legend(loc="lower right")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)

"""``milbench bench …``: the benchmarks, each measuring a speed or accuracy figure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from milbench.cli.common import Backend, Jobs, Progress, console, print_figures, print_table, user_errors

bench_app = typer.Typer(help="Benchmarks: speed and accuracy figures.", no_args_is_help=True)


@bench_app.command("slides")
@user_errors
def bench_slides(
    n_slides: Annotated[int, typer.Option(help="Test slides per generator.")] = 50,
    seed: int = 0,
    mode: Annotated[str, typer.Option(help="stochastic, distorted or both.")] = "both",
    out: Annotated[Path | None, typer.Option(help="Folder for CSV and markdown tables.")] = None,
):
    """Cluster/EMD slide classification on scikit-learn's digits: CNN vs VAE, grid, Bayesian."""
    from milbench.bench.slides import bench_slides_command

    bench_slides_command(n_slides, seed, out, mode)


@bench_app.command("execution")
@user_errors
def bench_execution(
    tasks: Annotated[int, typer.Option(help="Tasks per grid.")] = 200,
    jobs: Annotated[int, typer.Option(help="Worker processes / Ray CPUs.")] = 2,
    task_seconds: Annotated[float, typer.Option(help="Length of a task of the second grid.")] = 0.05,
    out: Annotated[Path | None, typer.Option(help="Folder for execution.md.")] = None,
):
    """Per-task overhead and parallel efficiency of the local pool and of Ray."""
    from milbench.bench.execution import bench_execution_command

    frame = bench_execution_command(tasks, jobs, task_seconds, out=out)
    print_table(frame, f"Execution overhead: {tasks} tasks per grid")


@bench_app.command("mil")
@user_errors
def bench_mil(
    config: Annotated[Path | None, typer.Argument(help="Benchmark YAML (default configs/bench/mil.yaml).")]
    = None,
    datasets: Annotated[str | None, typer.Option(
        help="Comma-separated: musk1, musk2, elephant, ucsb, digits[N].")] = None,
    models: Annotated[str | None, typer.Option(
        help="Comma-separated model labels of the config (or registered names, at defaults).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Repeats (default: the config's).")] = None,
    splits: Annotated[int | None, typer.Option(help="Folds (default: the config's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the config's).")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for folds.csv, summary.csv, table.md and each fit as it ends "
             "(rerun into it to resume).")] = None,
):
    """Classic MIL benchmarks (MUSK1/2, ELEPHANT, UCSB) and digit bags vs published figures."""
    from milbench.bench.mil_report import bench_mil_command

    bench_mil_command(config, datasets, models, repeats, splits, out, seed, backend, jobs)


@bench_app.command("cohorts")
@user_errors
def bench_cohorts(
    config: Annotated[Path, typer.Argument(help="Run config to evaluate on every cohort "
                                           "(e.g. configs/cohorts_cpu.yaml); it needs a clinical baseline.")],
    out: Annotated[Path, typer.Option(help="Folder for the records, tables and plots "
                                      "(rerun into it to resume or add cohorts).")],
    preset: Annotated[str, typer.Option(help="Synthetic preset of every cohort.")] = "realistic",
    cohorts: Annotated[int, typer.Option(help="Cohorts: generator seeds 0..N-1.")] = 10,
    seeds: Annotated[str | None, typer.Option(
        help="Comma-separated generator seeds instead of --cohorts.")] = None,
    knob: Annotated[list[str] | None, typer.Option(
        help="Generator knob of every cohort, key=value (repeatable).")] = None,
    sweep: Annotated[str | None, typer.Option(
        help="One knob over several values, knob=v1,v2,...: the whole bench per value.")] = None,
    target_gain: Annotated[float, typer.Option(
        help="The gain whose needed cohort count the report states.")] = 0.05,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override: key.sub=value")] = None,
    backend: Annotated[str, typer.Option(help="local or ray: where cohorts run.")] = "local",
    jobs: Annotated[int, typer.Option(help="Cohorts at once.")] = 1,
    progress: Progress = True,
):
    """Many cohorts: every model's mean gain over the clinical baseline across independent
    synthetic cohorts (CV and hidden test), with intervals, win shares, power and a forest plot."""
    from milbench.bench.cohorts import parse_seeds, run_cohorts_bench

    started = time.perf_counter()
    outcome = run_cohorts_bench(config, out, preset, parse_seeds(cohorts, seeds), knob or [],
                                sweep, set_ or [], backend, jobs, target_gain, progress)
    console.print((out / "table.md").read_text(encoding="utf-8"))
    console.print(f"wrote {len(outcome.files)} files to {out} in {time.perf_counter() - started:.0f} s")


@bench_app.command("pipeline")
@user_errors
def bench_pipeline(
    config: Annotated[Path, typer.Argument(help="YAML run config.")] = Path("configs/pipeline.yaml"),
    preset: Annotated[str, typer.Option(help="Synthetic preset when no --data.")] = "challenge",
    data: Annotated[Path | None, typer.Option(help="Challenge folder instead of a preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key.sub=value")] = None,
    warm_cache: Annotated[bool, typer.Option(help="Reuse cached features instead of timing them.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the table, JSON, plot and work files.")]
    = Path(".milbench/bench/pipeline"),
    progress: Progress = True,
    goal_minutes: Annotated[float, typer.Option(help="The wall-time goal of the whole run.")] = 20,
):
    """Wall time of each stage of a whole run (default: the default pipeline on `challenge`)."""
    from milbench.bench.pipeline import bench_pipeline_command

    table = bench_pipeline_command(config, preset=preset, data=data, overrides=list(set_ or []),
                                   warm_cache=warm_cache, out=out, progress=progress,
                                   goal_seconds=goal_minutes * 60)
    total = float(table["total_seconds"].iloc[0])
    shown = table[["stage", "seconds", "share"]]
    print_table(shown.assign(seconds=shown["seconds"].round(1), share=shown["share"].round(3)),
                f"pipeline stages: {total / 60:.1f} min in all; goal {goal_minutes:g} min "
                + ("met" if table["goal_met"].iloc[0] else "missed"))
    console.print(f"written: {out / 'pipeline_bench.csv'}, .json, .png")


@bench_app.command("features")
@user_errors
def bench_features(
    data: Annotated[Path | None, typer.Option(help="Challenge folder; default: drawn smears.")] = None,
    extractor: Annotated[list[str] | None, typer.Option(help="Extractor YAML (repeatable).")] = None,
    n_images: int = 256,
    batch_size: int = 32,
    repeats: int = 3,
    out: Annotated[Path | None, typer.Option(help="Folder for features_bench.csv/.json.")] = None,
):
    """Images per second of the whole extraction path vs the bare forward, and their ratio."""
    from milbench.bench.features import bench_features_command

    bench_features_command(data, extractor, n_images=n_images, batch_size=batch_size,
                           repeats=repeats, out=out)


@bench_app.command("segmentation")
@user_errors
def bench_segmentation(
    root: Annotated[Path | None, typer.Option(help="Synthetic cohort with truth masks.")] = None,
    preset: Annotated[str, typer.Option(help="Preset generated when no root is given.")] = "tiny",
    limit: Annotated[int | None, typer.Option(help="At most this many images.")] = None,
    out: Path = Path(".milbench/bench/segmentation"),
    seed: int = 0,
):
    """Mean IoU of the cell mask per segmentation variant against synthetic truth; PNG grid."""
    from milbench.bench.segmentation import bench_segmentation_command

    bench_segmentation_command(root, out=out, limit=limit, preset=preset, seed=seed)


@bench_app.command("semisup")
@user_errors
def bench_semisup(
    config: Annotated[Path | None, typer.Argument(help="Default: configs/bench/semisup.yaml.")] = None,
    out: Annotated[Path, typer.Option(help="Report, tables, plot.")] = Path(".milbench/bench/semisup"),
    max_folds: Annotated[int | None, typer.Option(help="Stop after this many folds (quick looks).")] = None,
):
    """Semi-supervised pseudo-labelling model in head mode: CV score, pseudo-label precision per
    iteration against the synthetic truth, wall time."""
    from milbench.bench.semisup import bench_semisup_command

    bench_semisup_command(config, out, max_folds=max_folds)


@bench_app.command("cohort")
@user_errors
def bench_cohort(
    root: Annotated[Path, typer.Argument(help="Challenge folder (real or generated).")],
    out: Annotated[Path | None, typer.Option(help="Also write the figures to this JSON file.")] = None,
    repeats: Annotated[int, typer.Option(help="Repeats of the clinical-only 5-fold CV.")] = 5,
    pixel_ceiling: Annotated[bool, typer.Option(
        help="Also train the pixel ceiling: a small CNN on the true instance labels (minutes).")] = False,
    input_size: Annotated[int, typer.Option(help="Image side of the pixel ceiling (px).")] = 64,
    cache: Annotated[Path, typer.Option(help="Cache folder of the pixel ceiling's pixels store.")]
    = Path(".milbench/cache"),
):
    """A cohort's difficulty: clinical-only CV balanced accuracy; on a synthetic cohort also the
    combined oracle, the oracle bag and instance figures, witness fractions, flipped labels, the
    site mix and, with --pixel-ceiling, what pixels show when the instance labels are given."""
    from milbench.io import atomic_write_json
    from milbench.synth.difficulty import cohort_difficulty

    figures = cohort_difficulty(root, n_repeats=repeats)
    if pixel_ceiling:
        from milbench.bench.ceiling import pixel_ceiling as ceiling

        figures["pixel_ceiling"] = ceiling(root, cache, input_size=input_size)
    print_figures(figures, f"Difficulty of {root}")
    if out is not None:
        atomic_write_json(out, figures)
        console.print(f"wrote {out}")

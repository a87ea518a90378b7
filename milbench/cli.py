"""The ``milbench`` command line: wires the library's rooms together; no logic lives here."""

from __future__ import annotations

import logging
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from milbench.execution import ExecutionError

app = typer.Typer(help="Multiple-instance learning toolkit for the lymphocytosis challenge.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect a challenge folder.", no_args_is_help=True)
submission_app = typer.Typer(help="Leaderboard submission files.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: speed and accuracy figures.", no_args_is_help=True)
cache_app = typer.Typer(help="The feature-store cache: verify, prune.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")
app.add_typer(submission_app, name="submission")
app.add_typer(bench_app, name="bench")

# Piped output (logs, CI) gets a wide fixed width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 150)
# Messages are never hard-wrapped: they name paths that must stay searchable.
error_console = Console(stderr=True, soft_wrap=True, highlight=False)
# Errors a user can fix from the message alone: shown without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileExistsError, FileNotFoundError, KeyError,
                                               ExecutionError)

Backend = Annotated[str | None, typer.Option(
    help="Where fits run: local (worker processes) or ray (default: the config's execution.backend).")]
DEFAULT_CONFIG = Path("configs/pipeline.yaml")
Jobs = Annotated[int | None, typer.Option(
    help="Fits at once (default: the config's execution.jobs).")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])


SHORT_NAMES = {"balanced_accuracy": "bal_acc", "seconds_per_fit": "s/fit",
               "hidden_test_balanced_accuracy": "test_bal_acc", "hidden_test_roc_auc": "test_auc"}


def _fail(error: BaseException) -> None:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    error_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=2)


def _overrides(set_: list[str] | None, data: Path | None, backend: str | None = None,
               jobs: int | None = None) -> list[str]:
    """``--set`` items, then ``--data`` and ``--backend`` / ``--jobs`` as config overrides."""
    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.root={data}")
    return overrides + [f"execution.{key}={value}" for key, value in
                        (("backend", backend), ("jobs", jobs)) if value is not None]


def _print_table(frame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column))
    for row in frame.itertuples(index=False):
        table.add_row(*[("–" if v != v else f"{v:.3f}") if isinstance(v, float) else str(v) for v in row])
    console.print(table)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(
        help="YAML run config (default configs/pipeline.yaml; with --resume alone, the run's own).")]
    = None,
    data: Annotated[Path | None, typer.Option(help="Challenge folder; default: a generated cohort.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key.sub=value")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    resume: Annotated[Path | None, typer.Option(
        help="Continue this interrupted run directory (same config, data and code).")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
):
    """Train and evaluate the models a config names; write a run directory and submissions."""
    from milbench.config import load_config
    from milbench.core.metrics import format_intervals

    overrides = _overrides(set_, data, backend, jobs)
    try:
        from milbench.runs import requested_config_path

        if config is None:  # resuming a run directory continues with the config it recorded
            config = requested_config_path(resume) if resume is not None else DEFAULT_CONFIG
        # The config (model parameters included) is checked before the pipeline and its heavy
        # libraries load: a typo fails in about a second.
        resolved = load_config(config, overrides)
        from milbench.pipeline import RunInterrupted, run_pipeline

        outcome = run_pipeline(resolved, progress=progress, resume=resume)
    except USER_ERRORS as error:
        _fail(error)
    except RunInterrupted as stopped:
        # The run directory records the config asked for, overrides included.
        error_console.print(f"{stopped}. Resume with:\n  milbench run --resume {stopped.run_dir}")
        raise typer.Exit(130) from None
    # The terminal shows the headline columns; metrics.csv and report.md hold every metric.
    shown = outcome.table.drop(columns=["balanced_accuracy_mean", "f1", "precision", "recall"])
    if "hidden_test_ci_low" in shown:
        shown["hidden_test_balanced_accuracy"] = format_intervals(
            shown.pop("hidden_test_balanced_accuracy"), shown.pop("hidden_test_ci_low"),
            shown.pop("hidden_test_ci_high"))
    shown = shown.rename(columns=SHORT_NAMES)
    _print_table(shown, "Cross-validation: mean ± std (max) over repeats"
                 + ("; test_*: hidden synthetic truth" if "test_bal_acc" in shown else ""))
    if not outcome.comparisons.empty:
        compared = outcome.comparisons[["model", "comparison", "reference"]].copy()
        compared["bal_acc difference [95% CI]"] = format_intervals(
            outcome.comparisons["mean_difference"], outcome.comparisons["ci_low"],
            outcome.comparisons["ci_high"], signed=True)
        compared["verdict"] = outcome.comparisons["verdict"]
        _print_table(compared, "Paired differences over the same folds (corrected resampled t-test)")
    for name, path in outcome.submissions.items():
        console.print(f"submission [bold]{name}[/]: {path}")
    console.print(f"run directory: {outcome.run_dir}")


@app.command()
def ablate(
    config: Annotated[Path, typer.Argument(help="Ablation YAML (variants × repeats).")],
    data: Annotated[Path | None, typer.Option(help="Challenge folder; default: a generated cohort.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every variant.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted grid there.")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Run an ablation grid; print and save the mean ± std (max) table."""
    from milbench.ablation import run_ablation

    overrides = _overrides(set_, data)  # the grid's own execution section takes --backend/--jobs
    try:
        run_dir, _ = run_ablation(config, overrides, resume=resume, backend=backend, jobs=jobs,
                                  progress=progress)
    except USER_ERRORS as error:
        _fail(error)
    console.print((run_dir / "ablation.md").read_text())
    console.print(f"ablation directory: {run_dir}")


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="YAML run config with a tune.<label> search space.")],
    model: Annotated[str, typer.Option(help="Label of the model to tune.")],
    trials: Annotated[int, typer.Option(help="Completed trials in all (a resumed study included).")]
    = 20,
    data: Annotated[Path | None, typer.Option(help="Challenge folder; default: a generated cohort.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key.sub=value")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the study in this directory.")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Optuna study over a model's parameters, scored by the run's repeated CV; resumable."""
    from milbench.config import load_config

    overrides = _overrides(set_, data, backend, jobs)
    try:
        resolved = load_config(config, overrides)
        from milbench.tune import TuneInterrupted, run_tune

        outcome = run_tune(resolved, model, trials, resume=resume, progress=progress)
    except USER_ERRORS as error:
        _fail(error)
    except TuneInterrupted as stopped:
        command = [arg for arg in sys.argv if arg not in ("--resume", str(resume))]
        error_console.print(f"{stopped}. Resume with:\n  {' '.join(command)} --resume "
                            f"{stopped.run_dir}")
        raise typer.Exit(130) from None
    console.print((outcome.run_dir / "tune.md").read_text())
    console.print(f"tuning directory: {outcome.run_dir}")


@app.command()
def synth(
    preset: Annotated[str, typer.Argument(
        help="tiny, small, challenge, realistic, realistic_small, or allidb2")],
    out: Annotated[Path, typer.Option(help="Folder to create (must not exist or be empty).")],
    seed: int = 0,
    witness_rate: Annotated[float | None, typer.Option(help="Atypical share in tumoral bags.")] = None,
    signal_strength: Annotated[float | None, typer.Option(help="0 = atypical cells look typical.")] = None,
    clinical_informativeness: Annotated[
        float | None, typer.Option(help="0 = clinical data useless.")
    ] = None,
    knob: Annotated[list[str] | None, typer.Option(
        help="Any generator knob as key=value (YAML value), e.g. label_noise=0.1, n_sites=3, "
             "site_mix_test=[1,1,1]; see milbench.synth.KNOBS.")] = None,
    workers: int = 2,
):
    """Generate a synthetic cohort in the exact challenge layout (or an ALL-IDB2-layout set);
    its truth/difficulty.json says how hard it is."""
    import yaml

    from milbench.synth import generate_allidb2, generate_cohort
    from milbench.synth.presets import parse_knob_assignments

    started = time.perf_counter()
    try:
        knobs = parse_knob_assignments(knob)
        if preset == "allidb2":
            path = generate_allidb2(out, seed=seed, workers=workers, progress=True)
        else:
            path = generate_cohort(out, preset=preset, seed=seed, witness_rate=witness_rate,
                                   signal_strength=signal_strength,
                                   clinical_informativeness=clinical_informativeness,
                                   knobs=knobs, workers=workers, progress=True)
    except (*USER_ERRORS, yaml.YAMLError) as error:
        _fail(error)
    console.print(f"wrote {path} in {time.perf_counter() - started:.1f} s")


@data_app.command("summary")
def data_summary(
    root: Annotated[Path, typer.Argument(help="Challenge folder.")],
    out: Annotated[Path | None, typer.Option(help="Where to write tables and plots.")] = None,
    reference_date: Annotated[str, typer.Option(help="Date ages are computed at.")] = "2021-01-01",
):
    """Patients, images per patient and clinical distributions per split and label, with plots."""
    from milbench.data import load_challenge
    from milbench.data.summary import summary_table, write_summary

    try:
        cohort = load_challenge(root, date.fromisoformat(reference_date))
    except USER_ERRORS as error:
        _fail(error)
    table = summary_table(cohort).set_index("group").T.reset_index(names="")
    _print_table(table, f"Cohort {root}")
    if cohort.skipped:
        console.print(f"[yellow]{len(cohort.skipped)} files skipped[/] (see skipped.csv)")
    written = write_summary(cohort, out or root.parent / f"{root.name}-summary")
    for path in written.values():
        console.print(f"wrote {path}")


@submission_app.command("check")
def submission_check(
    file: Annotated[Path, typer.Argument(help="Submission CSV.")],
    data: Annotated[Path, typer.Option(help="Challenge folder whose test patients it must cover.")],
):
    """Validate a submission CSV against a challenge folder's test patients."""
    from milbench.data import load_challenge
    from milbench.submit import check_submission

    try:
        test_ids = load_challenge(data).test().ids
    except USER_ERRORS as error:
        _fail(error)
    problems = check_submission(file, test_ids)
    if problems:
        for problem in problems:
            error_console.print(f"[red]✗[/] {escape(problem)}")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/] {file}: valid submission for {len(test_ids)} test patients")


@app.command("models")
def models_list():
    """List the registered bag models and what they consume."""
    from milbench.models import list_models, model_tags

    for name in list_models():
        console.print(f"{name}  [dim]{', '.join(sorted(model_tags(name)))}[/]")


@bench_app.command("slides")
def bench_slides(
    n_slides: Annotated[int, typer.Option(help="Test slides per generator.")] = 50,
    seed: int = 0,
    mode: Annotated[str, typer.Option(help="stochastic, distorted or both.")] = "both",
    out: Annotated[Path | None, typer.Option(help="Folder for CSV and markdown tables.")] = None,
):
    """Cluster/EMD slide classification on scikit-learn's digits: CNN vs VAE, grid, Bayesian."""
    from milbench.bench.slides import bench_slides_command

    try:
        bench_slides_command(n_slides, seed, out, mode)
    except USER_ERRORS as error:
        _fail(error)


@bench_app.command("execution")
def bench_execution(
    tasks: Annotated[int, typer.Option(help="Tasks per grid.")] = 200,
    jobs: Annotated[int, typer.Option(help="Worker processes / Ray CPUs.")] = 2,
    task_seconds: Annotated[float, typer.Option(help="Length of a task of the second grid.")] = 0.05,
    out: Annotated[Path | None, typer.Option(help="Folder for execution.md.")] = None,
):
    """Per-task overhead and parallel efficiency of the local pool and of Ray."""
    from milbench.bench.execution import bench_execution_command

    try:
        frame = bench_execution_command(tasks, jobs, task_seconds, out=out)
    except USER_ERRORS as error:
        _fail(error)
    _print_table(frame, f"Execution overhead: {tasks} tasks per grid")


@bench_app.command("mil")
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
    from milbench.bench.mil import bench_mil_command

    try:
        bench_mil_command(config, datasets, models, repeats, splits, out, seed, backend, jobs)
    except USER_ERRORS as error:
        _fail(error)


@bench_app.command("cohorts")
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
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Many cohorts: every model's mean gain over the clinical baseline across independent
    synthetic cohorts (CV and hidden test), with intervals, win shares, power and a forest plot."""
    from milbench.bench.cohorts import parse_seeds, run_cohorts_bench

    started = time.perf_counter()
    try:
        outcome = run_cohorts_bench(config, out, preset, parse_seeds(cohorts, seeds), knob or [],
                                    sweep, set_ or [], backend, jobs, target_gain, progress)
    except USER_ERRORS as error:
        _fail(error)
    console.print((out / "table.md").read_text(encoding="utf-8"))
    console.print(f"wrote {len(outcome.files)} files to {out} in {time.perf_counter() - started:.0f} s")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (its saved models).")],
    data: Annotated[Path, typer.Option(help="Challenge folder whose test patients to predict.")],
    models: Annotated[str | None, typer.Option(help="Comma-separated model names (default: all).")]
    = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default RUN_DIR/predictions/<time>).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Predict new patients with a run's saved models: features extracted with the recorded
    extractors (saved autoencoder weights, never retrained), submissions and a predictions table."""
    from milbench.prediction import predict_run

    try:
        chosen = [m.strip() for m in models.split(",") if m.strip()] if models else None
        outcome = predict_run(run_dir, data, chosen, out, progress)
    except USER_ERRORS as error:
        _fail(error)
    for name, path in outcome.submissions.items():
        console.print(f"submission [bold]{name}[/]: {path}")
    console.print(f"wrote {outcome.out / 'predictions.csv'} in {outcome.seconds:.1f} s")


@app.command()
def segment(
    root: Annotated[Path, typer.Argument(help="Challenge folder.")],
    variant: Annotated[str, typer.Option(help="Segmentation variant (see preprocessing.segmentation).")]
    = "kmeans_saturation_hue",
    out: Annotated[Path | None, typer.Option(help="Cache folder; default ROOT/segmentation.")] = None,
    workers: int = 1,
    seed: int = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Segment the lymphocyte of every image; masks and masked images are cached on disk."""
    from preprocessing.commands import segment_command

    try:
        path = segment_command(root, variant, out, seed=seed, workers=workers, progress=progress)
    except USER_ERRORS as error:
        _fail(error)
    console.print(f"segmentation cache: {path}")


@app.command()
def features(
    root: Annotated[Path, typer.Argument(help="Challenge folder.")],
    extractor: Annotated[str, typer.Option(help="Name in configs/features/ or a YAML path.")],
    cache: Annotated[Path, typer.Option(help="Cache folder for stores and checkpoints.")]
    = Path(".milbench/cache"),
    batch_size: int = 32,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    shards: Annotated[int, typer.Option(
        help="Split the forward pass into this many tasks (with --backend ray: over Ray workers, "
             "one GPU each with --device cuda); the parts are merged into one store.")] = 1,
    backend: Backend = "local",
    jobs: Jobs = 1,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
):
    """Extract (or reuse, or resume) the instance features of every image of a challenge folder."""
    from milbench.config import read_extractor
    from milbench.execution import ExecutionConfig, Executor
    from preprocessing.commands import features_command

    try:
        mapping, _ = read_extractor(extractor)
        execution = ExecutionConfig(backend=backend or "local", jobs=jobs or 1,
                                    gpus_per_task=1 if device.startswith("cuda") else 0)
        with Executor(execution, shared_paths=[root, cache]) as executor:
            store = features_command(root, mapping, cache, seed=seed, batch_size=batch_size,
                                     progress=progress, device=device, shards=shards,
                                     map_tasks=executor.map)
    except USER_ERRORS as error:
        _fail(error)
    console.print(f"feature store: {store.root} ({store.n_rows} images × {store.dim})")


@cache_app.command("verify")
def cache_verify(
    cache: Annotated[Path, typer.Argument(help="Cache folder.")] = Path(".milbench/cache"),
):
    """Check every feature store: complete marker, sizes, SHA-256 checksums, changed sources."""
    from preprocessing.store import verify_cache

    table = verify_cache(cache)
    _print_table(table.fillna(""), f"Feature stores under {cache / 'features'}")
    damaged = table[table["state"] == "damaged"]
    if len(damaged):
        _fail(ValueError(f"{len(damaged)} damaged store(s): {', '.join(damaged['key'])}; the next "
                         "extraction rebuilds them, or `milbench cache prune` removes them"))


@cache_app.command("prune")
def cache_prune(
    workdir: Annotated[Path, typer.Argument(help="Work folder (holds cache/ and runs/).")]
    = Path(".milbench"),
    dry_run: Annotated[bool, typer.Option(help="List what would go; remove nothing.")] = False,
):
    """Remove complete or damaged feature stores that no run directory refers to (incomplete
    ones may be an extraction in progress and stay)."""
    import shutil

    from milbench.runs import referenced_store_keys
    from preprocessing.store import verify_cache

    table = verify_cache(workdir / "cache")
    kept = referenced_store_keys(workdir)
    unused = table[~table["key"].isin(kept) & (table["state"] != "incomplete")]
    for key in unused["key"]:
        if not dry_run:
            shutil.rmtree(workdir / "cache" / "features" / key)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(unused)} of {len(table)} feature stores "
                  f"({len(table) - len(unused)} kept: referenced by a run or incomplete)")


@app.command()
def pretrain(
    root: Annotated[Path, typer.Argument(help="Folder-per-class set: ROOT/<split>/<CLASS>/*.jpg")],
    out: Annotated[Path, typer.Option(help="Folder for backbone.pt and metrics.")],
    arch: str = "resnet18",
    weights: Annotated[str | None, typer.Option(help="Torchvision weights name or a local file.")] = None,
    input_size: int = 224,
    head_epochs: int = 3,
    finetune_epochs: int = 5,
    seed: int = 0,
):
    """Two-phase fine-tuning of a backbone on a cell-type dataset; the result serves as weights."""
    from preprocessing.commands import pretrain_command

    try:
        metrics = pretrain_command(root, out, arch=arch, weights=weights, input_size=input_size,
                                   head_epochs=head_epochs, finetune_epochs=finetune_epochs, seed=seed)
    except USER_ERRORS as error:
        _fail(error)
    console.print_json(data=metrics)


@bench_app.command("pipeline")
def bench_pipeline(
    config: Annotated[Path, typer.Argument(help="YAML run config.")] = Path("configs/pipeline.yaml"),
    preset: Annotated[str, typer.Option(help="Synthetic preset when no --data.")] = "challenge",
    data: Annotated[Path | None, typer.Option(help="Challenge folder instead of a preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key.sub=value")] = None,
    warm_cache: Annotated[bool, typer.Option(help="Reuse cached features instead of timing them.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the table, JSON, plot and work files.")]
    = Path(".milbench/bench/pipeline"),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    goal_minutes: Annotated[float, typer.Option(help="The wall-time goal of the whole run.")] = 20,
):
    """Wall time of each stage of a whole run (default: the default pipeline on `challenge`)."""
    from milbench.bench.pipeline import bench_pipeline_command

    try:
        table = bench_pipeline_command(config, preset=preset, data=data, overrides=list(set_ or []),
                                       warm_cache=warm_cache, out=out, progress=progress,
                                       goal_seconds=goal_minutes * 60)
    except USER_ERRORS as error:
        _fail(error)
    total = float(table["total_seconds"].iloc[0])
    shown = table[["stage", "seconds", "share"]]
    _print_table(shown.assign(seconds=shown["seconds"].round(1), share=shown["share"].round(3)),
                 f"pipeline stages: {total / 60:.1f} min in all; goal {goal_minutes:g} min "
                 + ("met" if table["goal_met"].iloc[0] else "missed"))
    console.print(f"written: {out / 'pipeline_bench.csv'}, .json, .png")


@bench_app.command("features")
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

    try:
        bench_features_command(data, extractor, n_images=n_images, batch_size=batch_size,
                               repeats=repeats, out=out)
    except USER_ERRORS as error:
        _fail(error)


@bench_app.command("segmentation")
def bench_segmentation(
    root: Annotated[Path | None, typer.Option(help="Synthetic cohort with truth masks.")] = None,
    preset: Annotated[str, typer.Option(help="Preset generated when no root is given.")] = "tiny",
    limit: Annotated[int | None, typer.Option(help="At most this many images.")] = None,
    out: Path = Path(".milbench/bench/segmentation"),
    seed: int = 0,
):
    """Mean IoU of the cell mask per segmentation variant against synthetic truth; PNG grid."""
    from milbench.bench.segmentation import bench_segmentation_command

    try:
        bench_segmentation_command(root, out=out, limit=limit, preset=preset, seed=seed)
    except USER_ERRORS as error:
        _fail(error)


@bench_app.command("semisup")
def bench_semisup(
    config: Annotated[Path | None, typer.Argument(help="Default: configs/bench/semisup.yaml.")] = None,
    out: Annotated[Path, typer.Option(help="Report, tables, plot.")] = Path(".milbench/bench/semisup"),
    max_folds: Annotated[int | None, typer.Option(help="Stop after this many folds (quick looks).")] = None,
):
    """Semi-supervised pseudo-labelling model in head mode: CV score, pseudo-label precision per
    iteration against the synthetic truth, wall time."""
    from milbench.bench.semisup import bench_semisup_command

    try:
        bench_semisup_command(config, out, max_folds=max_folds)
    except USER_ERRORS as error:
        _fail(error)


@bench_app.command("cohort")
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

    try:
        figures = cohort_difficulty(root, n_repeats=repeats)
        if pixel_ceiling:
            from milbench.bench.ceiling import pixel_ceiling as ceiling

            figures["pixel_ceiling"] = ceiling(root, cache, input_size=input_size)
    except USER_ERRORS as error:
        _fail(error)
    table = Table(title=f"Difficulty of {root}")
    table.add_column("figure")
    table.add_column("value")

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            table.add_row(prefix, f"{value:.3f}" if isinstance(value, float) else str(value))

    add("", figures)
    console.print(table)
    if out is not None:
        atomic_write_json(out, figures)
        console.print(f"wrote {out}")

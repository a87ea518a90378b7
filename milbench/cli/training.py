"""Commands that train and evaluate: ``run``, ``ablate``, ``tune``, and ``predict`` with a run's
saved models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from milbench.cli.common import (
    DEFAULT_CONFIG,
    Backend,
    DataOption,
    Jobs,
    Progress,
    comma_list,
    console,
    error_console,
    overrides,
    print_table,
    user_errors,
)

Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override: key.sub=value")]


@user_errors
def run(
    config: Annotated[Path | None, typer.Argument(
        help="YAML run config (default configs/pipeline.yaml; with --resume alone, the run's own).")]
    = None,
    data: DataOption = None,
    set_: Overrides = None,
    progress: Progress = True,
    resume: Annotated[Path | None, typer.Option(
        help="Continue this interrupted run directory (same config, data and code).")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
):
    """Train and evaluate the models a config names; write a run directory and submissions."""
    from milbench.config import load_config
    from milbench.runs import requested_config_path

    if config is None:  # resuming a run directory continues with the config it recorded
        config = requested_config_path(resume) if resume is not None else DEFAULT_CONFIG
    # The config (model parameters included) is checked before the pipeline and its heavy
    # libraries load: a typo fails in about a second.
    resolved = load_config(config, overrides(set_, data, backend, jobs))
    from milbench.pipeline import RunInterrupted, run_pipeline
    from milbench.report import terminal_tables

    try:
        outcome = run_pipeline(resolved, progress=progress, resume=resume)
    except RunInterrupted as stopped:
        # The run directory records the config asked for, overrides included.
        error_console.print(f"{stopped}. Resume with:\n  milbench run --resume {stopped.run_dir}")
        raise typer.Exit(130) from None
    shown, compared = terminal_tables(outcome.table, outcome.comparisons)
    print_table(shown, "Cross-validation: mean ± std (max) over repeats"
                + ("; test_*: hidden synthetic truth" if "test_bal_acc" in shown else ""))
    if compared is not None:
        print_table(compared, "Paired differences over the same folds (corrected resampled t-test)")
    for name, path in outcome.submissions.items():
        console.print(f"submission [bold]{name}[/]: {path}")
    console.print(f"run directory: {outcome.run_dir}")


@user_errors
def ablate(
    config: Annotated[Path, typer.Argument(help="Ablation YAML (variants × repeats).")],
    data: DataOption = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every variant.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted grid there.")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
    progress: Progress = True,
):
    """Run an ablation grid; print and save the mean ± std (max) table."""
    from milbench.ablation import run_ablation

    # The grid's own execution section takes --backend/--jobs.
    run_dir, _ = run_ablation(config, overrides(set_, data), resume=resume, backend=backend,
                              jobs=jobs, progress=progress)
    console.print((run_dir / "ablation.md").read_text())
    console.print(f"ablation directory: {run_dir}")


@user_errors
def tune(
    config: Annotated[Path, typer.Argument(help="YAML run config with a tune.<label> search space.")],
    model: Annotated[str, typer.Option(help="Label of the model to tune.")],
    trials: Annotated[int, typer.Option(help="Completed trials in all (a resumed study included).")]
    = 20,
    data: DataOption = None,
    set_: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the study in this directory.")] = None,
    backend: Backend = None,
    jobs: Jobs = None,
    progress: Progress = True,
):
    """Optuna study over a model's parameters, scored by the run's repeated CV; resumable."""
    from milbench.config import load_config

    resolved = load_config(config, overrides(set_, data, backend, jobs))
    from milbench.tune import TuneInterrupted, run_tune

    try:
        outcome = run_tune(resolved, model, trials, resume=resume, progress=progress)
    except TuneInterrupted as stopped:
        command = [arg for arg in sys.argv if arg not in ("--resume", str(resume))]
        error_console.print(f"{stopped}. Resume with:\n  {' '.join(command)} --resume "
                            f"{stopped.run_dir}")
        raise typer.Exit(130) from None
    console.print((outcome.run_dir / "tune.md").read_text())
    console.print(f"tuning directory: {outcome.run_dir}")


@user_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (its saved models).")],
    data: Annotated[Path, typer.Option(help="Challenge folder whose test patients to predict.")],
    models: Annotated[str | None, typer.Option(help="Comma-separated model names (default: all).")]
    = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default RUN_DIR/predictions/<time>).")] = None,
    progress: Progress = True,
):
    """Predict new patients with a run's saved models: features extracted with the recorded
    extractors (saved autoencoder weights, never retrained), submissions and a predictions table."""
    from milbench.prediction import predict_run

    outcome = predict_run(run_dir, data, comma_list(models), out, progress)
    for name, path in outcome.submissions.items():
        console.print(f"submission [bold]{name}[/]: {path}")
    console.print(f"wrote {outcome.out / 'predictions.csv'} in {outcome.seconds:.1f} s")

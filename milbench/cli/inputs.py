"""Commands on a run's inputs and outputs: synthetic cohorts, challenge folders, submission
files, segmentation, feature stores and their cache, backbone pretraining, the model list."""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from milbench.cli.common import (
    Backend,
    Jobs,
    Progress,
    console,
    error_console,
    fail,
    print_table,
    user_errors,
)

data_app = typer.Typer(help="Inspect a challenge folder.", no_args_is_help=True)
submission_app = typer.Typer(help="Leaderboard submission files.", no_args_is_help=True)
cache_app = typer.Typer(help="The feature-store cache: verify, prune.", no_args_is_help=True)


@user_errors
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
    from milbench.synth import generate_allidb2, generate_cohort
    from milbench.synth.presets import parse_knob_assignments

    started = time.perf_counter()
    knobs = parse_knob_assignments(knob)
    if preset == "allidb2":
        path = generate_allidb2(out, seed=seed, workers=workers, progress=True)
    else:
        path = generate_cohort(out, preset=preset, seed=seed, witness_rate=witness_rate,
                               signal_strength=signal_strength,
                               clinical_informativeness=clinical_informativeness,
                               knobs=knobs, workers=workers, progress=True)
    console.print(f"wrote {path} in {time.perf_counter() - started:.1f} s")


@data_app.command("summary")
@user_errors
def data_summary(
    root: Annotated[Path, typer.Argument(help="Challenge folder.")],
    out: Annotated[Path | None, typer.Option(help="Where to write tables and plots.")] = None,
    reference_date: Annotated[str, typer.Option(help="Date ages are computed at.")] = "2021-01-01",
):
    """Patients, images per patient and clinical distributions per split and label, with plots."""
    from milbench.data import load_challenge
    from milbench.data.summary import summary_table, write_summary

    cohort = load_challenge(root, date.fromisoformat(reference_date))
    table = summary_table(cohort).set_index("group").T.reset_index(names="")
    print_table(table, f"Cohort {root}")
    if cohort.skipped:
        console.print(f"[yellow]{len(cohort.skipped)} files skipped[/] (see skipped.csv)")
    written = write_summary(cohort, out or root.parent / f"{root.name}-summary")
    for path in written.values():
        console.print(f"wrote {path}")


@submission_app.command("check")
@user_errors
def submission_check(
    file: Annotated[Path, typer.Argument(help="Submission CSV.")],
    data: Annotated[Path, typer.Option(help="Challenge folder whose test patients it must cover.")],
):
    """Validate a submission CSV against a challenge folder's test patients."""
    from milbench.data import load_challenge
    from milbench.submit import check_submission

    test_ids = load_challenge(data).test().ids
    problems = check_submission(file, test_ids)
    if problems:
        for problem in problems:
            error_console.print(f"[red]✗[/] {escape(problem)}")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/] {file}: valid submission for {len(test_ids)} test patients")


def models_list():
    """List the registered bag models and what they consume."""
    from milbench.models import list_models, model_tags

    for name in list_models():
        console.print(f"{name}  [dim]{', '.join(sorted(tag.value for tag in model_tags(name)))}[/]")


@user_errors
def segment(
    root: Annotated[Path, typer.Argument(help="Challenge folder.")],
    variant: Annotated[str, typer.Option(help="Segmentation variant (see preprocessing.segmentation).")]
    = "kmeans_saturation_hue",
    out: Annotated[Path | None, typer.Option(help="Cache folder; default ROOT/segmentation.")] = None,
    workers: int = 1,
    seed: int = 0,
    progress: Progress = True,
):
    """Segment the lymphocyte of every image; masks and masked images are cached on disk."""
    from preprocessing.commands import segment_command

    path = segment_command(root, variant, out, seed=seed, workers=workers, progress=progress)
    console.print(f"segmentation cache: {path}")


@user_errors
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
    progress: Progress = True,
):
    """Extract (or reuse, or resume) the instance features of every image of a challenge folder."""
    from milbench.config import read_extractor
    from milbench.execution import ExecutionConfig, Executor
    from preprocessing.commands import features_command

    mapping, _ = read_extractor(extractor)
    execution = ExecutionConfig(backend=backend or "local", jobs=jobs or 1,
                                gpus_per_task=1 if device.startswith("cuda") else 0)
    with Executor(execution, shared_paths=[root, cache]) as executor:
        store = features_command(root, mapping, cache, seed=seed, batch_size=batch_size,
                                 progress=progress, device=device, shards=shards,
                                 map_tasks=executor.map)
    console.print(f"feature store: {store.root} ({store.n_rows} images × {store.dim})")


@cache_app.command("verify")
def cache_verify(
    cache: Annotated[Path, typer.Argument(help="Cache folder.")] = Path(".milbench/cache"),
):
    """Check every feature store: complete marker, sizes, SHA-256 checksums, changed sources."""
    from preprocessing.store import verify_cache

    table = verify_cache(cache)
    print_table(table.fillna(""), f"Feature stores under {cache / 'features'}")
    damaged = table[table["state"] == "damaged"]
    if len(damaged):
        fail(ValueError(f"{len(damaged)} damaged store(s): {', '.join(damaged['key'])}; the next "
                        "extraction rebuilds them, or `milbench cache prune` removes them"))


@cache_app.command("prune")
def cache_prune(
    workdir: Annotated[Path, typer.Argument(help="Work folder (holds cache/ and runs/).")]
    = Path(".milbench"),
    dry_run: Annotated[bool, typer.Option(help="List what would go; remove nothing.")] = False,
):
    """Remove complete or damaged feature stores that no run directory refers to (incomplete
    ones may be an extraction in progress and stay)."""
    from milbench.runs import prune_unused_stores

    removed, total = prune_unused_stores(workdir, dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(removed)} of {total} feature stores "
                  f"({total - len(removed)} kept: referenced by a run or incomplete)")


@user_errors
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

    metrics = pretrain_command(root, out, arch=arch, weights=weights, input_size=input_size,
                               head_epochs=head_epochs, finetune_epochs=finetune_epochs, seed=seed)
    console.print_json(data=metrics)

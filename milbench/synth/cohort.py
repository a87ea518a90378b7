"""Synthetic lymphocytosis cohorts and ALL-IDB2-style crops, written in the real data layouts.

``generate_cohort`` writes a patient cohort exactly as the Kaggle lymphocytosis challenge ships
it (see docs/data.md), plus a hidden ``truth/`` folder (test labels, per-image atypia, masks) and a
``synth.json`` manifest. ``generate_allidb2`` writes instance-labelled single-cell crops in the
ALL-IDB2 layout. Both are deterministic: the same arguments give byte-identical files, whatever
the number of worker processes, because every patient (or crop) draws from its own child of
``numpy.random.SeedSequence(seed)``.

Output appears atomically: everything is written into a hidden sibling directory that is renamed
onto the target at the end (manifest last), and existing non-empty targets are never touched.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milbench import __version__
from milbench.io import atomic_write_json, atomic_write_text
from milbench.synth.layout import (
    AGE_REFERENCE_DATE,
    CHECKSUMS_NAME,
    CLINICAL_CSV_COLUMNS,
    GENERATOR_VERSION,
    INSTANCE_COLUMNS,
    MANIFEST_NAME,
    PATIENT_TRUTH_COLUMNS,
    file_checksums,
    staged_directory,
)
from milbench.synth.plan import Patient, plan_cohort
from milbench.synth.presets import (
    BagSizes,
    SynthPreset,
    _check_count,
    resolve_knobs,
)
from milbench.synth.render import (
    Stain,
    encode_jpeg,
    encode_png,
    encode_tiff,
    perturb_stain,
    render_cell,
    sample_stain,
)

# --------------------------------------------------------------------------- rendering workers


def _image_name(index: int) -> str:
    return f"{index:06d}.jpg"


def _render_patient(task: tuple[str, str, tuple[str, ...], float, np.random.SeedSequence, bool,
                                Stain | None, np.ndarray | None]) -> int:
    """Render one patient's bag into ``<staging>/<split>set/<id>/``; returns the image count."""
    staging, relative, variants, signal_strength, seed_seq, masks, site_stain, traits = task
    rng = np.random.default_rng(seed_seq)
    stain = sample_stain(rng) if site_stain is None else perturb_stain(rng, site_stain)
    folder = Path(staging) / relative
    folder.mkdir(parents=True)
    mask_folder = Path(staging) / "truth" / "masks" / Path(relative).name
    if masks:
        mask_folder.mkdir(parents=True)
    for index, variant in enumerate(variants):
        cell_traits = None if traits is None or variant == "reactive" else traits[index]
        cell = render_cell(rng, stain, variant, signal_strength, traits=cell_traits)
        # Plain writes are enough here: the whole staging tree only becomes visible by rename.
        (folder / _image_name(index)).write_bytes(encode_jpeg(cell.image, stain.jpeg_quality))
        if masks:
            stem = f"{index:06d}"
            (mask_folder / f"{stem}_cell.png").write_bytes(encode_png(cell.cell_mask))
            (mask_folder / f"{stem}_nucleus.png").write_bytes(encode_png(cell.nucleus_mask))
    return len(variants)


def _render_crop(task: tuple[str, str, str, np.random.SeedSequence]) -> int:
    staging, name, variant, seed_seq = task
    rng = np.random.default_rng(seed_seq)
    # Every ALL-IDB crop gets its own stain: the set was acquired over many sessions.
    stain = sample_stain(rng)
    cell = render_cell(rng, stain, variant, 1.0, size=257, magnification=1.35, jitter=6.0)
    (Path(staging) / name).write_bytes(encode_tiff(cell.image))
    return 1


def _init_worker() -> None:
    import cv2

    # One OpenCV thread per process: the pool already fills the cores.
    cv2.setNumThreads(1)


def _run_tasks(
    function: Callable[[Any], int], tasks: Sequence[Any], total: int, workers: int,
    progress: bool, description: str,
) -> None:
    from milbench.progress import progress_bar

    with progress_bar(description, total, enabled=progress, unit="img") as advance:
        if workers == 1:
            for done in map(function, tasks):
                advance(done)
        else:
            # spawn, not fork: the caller may hold threads (torch, rich) that fork would copy.
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, initializer=_init_worker) as pool:
                for done in pool.imap_unordered(function, tasks):
                    advance(done)


# --------------------------------------------------------------------------- writers


def _csv(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_csv(index=index, lineterminator="\n")


def _clinical_frame(patients: Sequence[Patient], hide_labels: bool) -> pd.DataFrame:
    return pd.DataFrame({
        "ID": [p.patient_id for p in patients],
        "LABEL": [-1 if hide_labels else p.observed_label for p in patients],
        "GENDER": [p.gender for p in patients],
        "DOB": [p.dob for p in patients],
        "LYMPH_COUNT": [p.lymph_count for p in patients],
    }, columns=CLINICAL_CSV_COLUMNS)


def _write_tables(root: Path, patients: Sequence[Patient]) -> pd.DataFrame:
    train = [p for p in patients if p.split == "train"]
    test = [p for p in patients if p.split == "test"]
    train_frame = _clinical_frame(train, hide_labels=False)
    test_frame = _clinical_frame(test, hide_labels=True)
    everything = pd.concat([train_frame, test_frame], ignore_index=True)
    atomic_write_text(root / "clinical_annotation.csv", _csv(everything, index=True))
    atomic_write_text(root / "trainset" / "trainset_true.csv", _csv(train_frame))
    atomic_write_text(root / "testset" / "testset_data.csv", _csv(test_frame))
    submission = pd.DataFrame({"Id": [p.patient_id for p in test], "Predicted": 0})
    atomic_write_text(root / "sample_submission.csv", _csv(submission))

    truth = root / "truth"
    labels = pd.DataFrame({"ID": [p.patient_id for p in test], "LABEL": [p.label for p in test]})
    atomic_write_text(truth / "test_labels.csv", _csv(labels))
    instances = pd.DataFrame(
        [
            (p.patient_id, _image_name(i), p.split, int(v == "atypical"), v, round(float(a), 6))
            for p in patients
            for i, (v, a) in enumerate(zip(p.variants, p.atypia(), strict=True))
        ],
        columns=INSTANCE_COLUMNS,
    )
    atomic_write_text(truth / "instances.csv", _csv(instances))
    truth_patients = pd.DataFrame(
        [(p.patient_id, p.split, p.label, p.observed_label if p.split == "train" else -1,
          int(p.split == "train" and p.observed_label != p.label), p.site,
          round(p.signal_strength, 6), round(p.witness_fraction, 6), len(p.variants))
         for p in patients],
        columns=PATIENT_TRUTH_COLUMNS,
    )
    atomic_write_text(truth / "patients.csv", _csv(truth_patients))
    return instances


def generate_cohort(
    out_dir: str | os.PathLike,
    preset: str | SynthPreset = "small",
    seed: int = 0,
    *,
    witness_rate: float | None = None,
    signal_strength: float | None = None,
    clinical_informativeness: float | None = None,
    knobs: dict[str, Any] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write a synthetic cohort in the lymphocytosis-challenge layout under ``out_dir``.

    ``knobs`` override any field of the preset (``KNOBS``; see ``SynthPreset``); the three named
    ones are shortcuts: ``witness_rate`` is the mean fraction of atypical cells in tumoral
    patients, ``signal_strength`` how different atypical cells look (0 = indistinguishable),
    ``clinical_informativeness`` how much age and lymphocyte count say about the label
    (0 = nothing). Raises ``FileExistsError`` if ``out_dir`` is non-empty. ``workers > 1``
    renders in spawned processes (same bytes as one worker); a calling script then needs the
    usual ``if __name__ == "__main__":`` guard. ``truth/difficulty.json`` records how hard the
    cohort is (see :mod:`milbench.synth.difficulty`).
    """
    named = {"witness_rate": witness_rate, "signal_strength": signal_strength,
             "clinical_informativeness": clinical_informativeness}
    overrides = {**(knobs or {}), **{k: v for k, v in named.items() if v is not None}}
    spec = resolve_knobs(preset, overrides)
    seed = _check_count("seed", seed, 0)
    workers = _check_count("workers", workers, 1)
    out_dir = Path(out_dir)
    children = np.random.SeedSequence(seed).spawn(1 + spec.n_patients)
    patients, site_stains = plan_cohort(spec, children[0], spec.witness_rate,
                                         spec.clinical_informativeness)

    with staged_directory(out_dir) as staging:
        instances = _write_tables(staging, patients)
        tasks = [
            (str(staging), f"{p.split}set/{p.patient_id}", p.variants, p.signal_strength,
             child, spec.masks, site_stains[p.site] if p.site >= 0 else None, p.traits)
            for p, child in zip(patients, children[1:], strict=True)
        ]
        # Largest bags first so the pool's last tasks are short ones.
        tasks.sort(key=lambda task: -len(task[2]))
        _run_tasks(_render_patient, tasks, len(instances), workers, progress,
                   f"synth {spec.name}")
        counts = {}
        for split in ("train", "test"):
            members = [p for p in patients if p.split == split]
            counts[split] = {
                "patients": len(members),
                "tumoral": sum(p.label == 1 for p in members),
                "reactive": sum(p.label == 0 for p in members),
                "images": int((instances["split"] == split).sum()),
                "atypical_images": int(
                    instances.loc[instances["split"] == split, "atypical"].sum()),
            }
        manifest = {
            "kind": "lymphocytosis",
            "preset": spec.name,
            "preset_spec": asdict(spec),
            "seed": seed,
            "knobs": _json_ready(overrides),
            "generator_version": GENERATOR_VERSION,
            "milbench_version": __version__,
            "age_reference_date": AGE_REFERENCE_DATE.isoformat(),
            "masks": spec.masks,
            "counts": counts,
        }
        from milbench.synth.difficulty import cohort_difficulty

        atomic_write_json(staging / "truth" / "difficulty.json", cohort_difficulty(staging))
        atomic_write_json(staging / CHECKSUMS_NAME, file_checksums(staging))
        atomic_write_json(staging / MANIFEST_NAME, manifest)
    return out_dir


def _json_ready(knobs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(
        {k: asdict(v) if isinstance(v, BagSizes) else v for k, v in knobs.items()}, default=list))


def generate_allidb2(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_per_class: int = 130,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write ALL-IDB2-style crops: ``out_dir/ALL_IDB2/img/ImNNN_L.tif`` (257x257 RGB TIFF).

    Label 1 (blast) crops hold an atypical cell at full signal strength, label 0 (healthy) a
    typical one; ``n_per_class`` of each, numbered from 001 with labels shuffled.
    """
    seed = _check_count("seed", seed, 0)
    n_per_class = _check_count("n_per_class", n_per_class, 1)
    workers = _check_count("workers", workers, 1)
    out_dir = Path(out_dir)
    total = 2 * n_per_class
    children = np.random.SeedSequence(seed).spawn(1 + total)
    labels = np.random.default_rng(children[0]).permutation([1] * n_per_class + [0] * n_per_class)
    width = max(3, len(str(total)))
    names = [f"Im{i + 1:0{width}d}_{label}.tif" for i, label in enumerate(labels)]
    with staged_directory(out_dir) as staging:
        image_dir = staging / "ALL_IDB2" / "img"
        image_dir.mkdir(parents=True)
        tasks = [
            (str(image_dir), name, "atypical" if label == 1 else "typical", child)
            for name, label, child in zip(names, labels.tolist(), children[1:], strict=True)
        ]
        _run_tasks(_render_crop, tasks, total, workers, progress, "synth ALL-IDB2")
        manifest = {
            "kind": "all_idb2",
            "seed": seed,
            "n_per_class": n_per_class,
            "generator_version": GENERATOR_VERSION,
            "milbench_version": __version__,
            "counts": {"blast": int(labels.sum()), "healthy": int(total - labels.sum())},
        }
        atomic_write_json(staging / CHECKSUMS_NAME, file_checksums(staging))
        atomic_write_json(staging / MANIFEST_NAME, manifest)
    return out_dir


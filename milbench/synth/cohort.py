"""Synthetic lymphocytosis cohorts and ALL-IDB2-style crops, written in the real data layouts.

``generate_cohort`` writes a patient cohort exactly as the Kaggle lymphocytosis challenge ships
it (see DATA.md), plus a hidden ``truth/`` folder (test labels, per-image atypia, masks) and a
``synth.json`` manifest. ``generate_allidb2`` writes instance-labelled single-cell crops in the
ALL-IDB2 layout. Both are deterministic: the same arguments give byte-identical files, whatever
the number of worker processes, because every patient (or crop) draws from its own child of
``numpy.random.SeedSequence(seed)``.

Output appears atomically: everything is written into a hidden sibling directory that is renamed
onto the target at the end (manifest last), and existing non-empty targets are never touched.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milbench import __version__
from milbench.io import atomic_write_json, atomic_write_text, file_sha256
from milbench.synth.presets import (
    BagSizes,
    SynthPreset,
    _check_count,
    resolve_knobs,
)
from milbench.synth.render import (
    TRAITS,
    Stain,
    encode_jpeg,
    encode_png,
    encode_tiff,
    perturb_stain,
    render_cell,
    sample_site_stain,
    sample_stain,
)

GENERATOR_VERSION = "2"
MANIFEST_NAME = "synth.json"
CHECKSUMS_NAME = "checksums.json"  # SHA-256 of every generated file, checked when reused
# Ages are drawn first and turned into birth dates relative to this day; loaders computing age
# from DOB should use the same reference to recover them.
AGE_REFERENCE_DATE = date(2020, 1, 1)
CLINICAL_COLUMNS = ["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"]
INSTANCE_COLUMNS = ["patient_id", "image", "split", "atypical", "variant", "atypia"]
PATIENT_TRUTH_COLUMNS = ["patient_id", "split", "label", "observed_label", "label_flipped", "site",
                         "signal_strength", "witness_fraction", "n_images"]


@dataclass(frozen=True)
class SyntheticTruth:
    """Hidden truth of a synthetic cohort."""

    test_labels: dict[str, int]
    instances: pd.DataFrame  # patient_id, image, split, atypical (0/1), variant
    mask_dir: Path | None


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    split: str  # "train" or "test"
    label: int  # the truth
    gender: str
    dob: str
    lymph_count: float
    variants: tuple[str, ...]
    observed_label: int  # what the training CSV says (label noise flips a few)
    site: int = -1  # acquisition site; -1 without sites
    signal_strength: float = 0.0
    traits: np.ndarray | None = None  # (n_images, len(TRAITS)) strengths, realistic renderer only

    @property
    def witness_fraction(self) -> float:
        return sum(v == "atypical" for v in self.variants) / len(self.variants)

    def atypia(self) -> np.ndarray:
        """Each cell's true atypia: the mean of its trait strengths (0 for reactive cells)."""
        if self.traits is not None:
            return self.traits.mean(axis=1)
        return np.array([self.signal_strength if v == "atypical" else 0.0 for v in self.variants])


# --------------------------------------------------------------------------- output directory


def _require_empty_target(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not empty; refusing to write into it")
    elif out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a directory")


@contextmanager
def _staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden sibling directory that becomes ``out_dir`` only if the body succeeds."""
    _require_empty_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                    dir=out_dir.parent))
    try:
        yield staging
        # mkdtemp makes a private (0700) directory; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        _require_empty_target(out_dir)
        try:
            # rename replaces an empty directory atomically and fails on a non-empty one, so a
            # cohort written by someone else meanwhile is never clobbered.
            os.rename(staging, out_dir)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{out_dir} was filled while generating") from error
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- cohort plan


def _bag_sizes(rng: np.random.Generator, labels: np.ndarray, sizes: BagSizes) -> np.ndarray:
    medians = np.where(labels == 1, sizes.tumoral_median, sizes.reactive_median)
    drawn = medians * np.exp(sizes.sigma * rng.standard_normal(labels.size))
    return np.clip(np.round(drawn), sizes.low, sizes.high).astype(int)


def _clinical(
    rng: np.random.Generator, labels: np.ndarray, informativeness: float,
    reactive_count_cap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ages (years) and lymphocyte counts (G/L) whose link to the label grows with the knob.

    Counts mix a reactive-like component (median ~4.6, rarely above 8) and a high, wide
    component (above 8, median ~28, up to 295). At informativeness 0 both labels share one
    mixture; as it grows, tumoral patients move to the high component and reactive ones leave
    it (cubically, so that at the default 0.5 a count above 8 already points strongly to
    tumoral, as in the real data, while many tumoral patients still have low counts). Tumoral
    patients also get older.

    With ``reactive_count_cap`` (the realistic cohorts), reactive patients never leave the low
    component and stay at or below the cap, and fewer tumoral patients reach the high one
    (0.25 + 0.4 x informativeness), so a high count is proof but a low one says little.
    """
    n = labels.size
    tumoral = labels == 1
    if reactive_count_cap is None:
        p_high = np.where(tumoral, 0.5 + 0.4 * informativeness, 0.5 * (1 - informativeness) ** 3)
    else:
        p_high = np.where(tumoral, 0.25 + 0.4 * informativeness, 0.0)
    high = rng.uniform(size=n) < p_high
    low_counts = 4.6 * np.exp(0.3 * rng.standard_normal(n))
    high_counts = 8.0 + 20.0 * np.exp(1.0 * rng.standard_normal(n))
    counts = np.where(high, high_counts, low_counts)
    if reactive_count_cap is not None:
        over = ~tumoral & (counts > reactive_count_cap)
        counts[over] = reactive_count_cap * rng.uniform(0.85, 1.0, int(over.sum()))
    counts = np.round(np.clip(counts, 2.28, 295.0), 2)
    age_mean = np.where(tumoral, 64 + 10 * informativeness, 64 - 8 * informativeness)
    ages = np.clip(age_mean + 13.0 * rng.standard_normal(n), 18, 99)
    return ages, counts


def _dates_of_birth(rng: np.random.Generator, ages: np.ndarray) -> list[str]:
    """``M/D/YYYY`` strings, except a contiguous block in ``DD-MM-YYYY`` (a quirk of the data)."""
    n = ages.size
    days = np.round(ages * 365.25 + rng.uniform(0, 365, n)).astype(int)
    births = [AGE_REFERENCE_DATE - timedelta(days=int(d)) for d in days]
    block = max(1, round(0.12 * n))
    start = int(rng.integers(0, n - block + 1))
    dobs = []
    for i, born in enumerate(births):
        if start <= i < start + block:
            dobs.append(f"{born.day:02d}-{born.month:02d}-{born.year}")
        else:
            dobs.append(f"{born.month}/{born.day}/{born.year}")
    return dobs


def _genders(rng: np.random.Generator, n: int) -> list[str]:
    genders = np.where(rng.uniform(size=n) < 0.55, "M", "F").astype(object)
    females = np.flatnonzero(genders == "F")
    if females.size == 0:
        females = np.array([int(rng.integers(n))])
        genders[females] = "F"
    # The real file has a few lowercase "f" entries; keep at least one.
    lowercase = rng.uniform(size=females.size) < 0.04
    lowercase[int(rng.integers(females.size))] = True
    genders[females[lowercase]] = "f"
    return [str(g) for g in genders]


def _instance_variants(
    rng: np.random.Generator, label: int, n_images: int, preset: SynthPreset, witness_rate: float
) -> tuple[str, ...]:
    variants = np.full(n_images, "typical", dtype=object)
    if label == 1 and preset.witness_concentration is not None:
        concentration = preset.witness_concentration
        fraction = rng.beta(witness_rate * concentration, (1 - witness_rate) * concentration)
        # Binomial: a tumoral bag may hold no witness at all, as real ones do.
        n_atypical = int(rng.binomial(n_images, fraction))
        confounder_rate = rng.uniform(*preset.reactive_variant_rate_tumoral)
    elif label == 1:
        fraction = float(np.clip(rng.normal(witness_rate, 0.15), 0.1, 0.95))
        n_atypical = max(1, int(round(fraction * n_images)))
        confounder_rate = rng.uniform(*preset.reactive_variant_rate_tumoral)
    else:
        n_atypical = int(rng.binomial(n_images, rng.uniform(0, preset.reactive_atypical_rate)))
        confounder_rate = rng.uniform(*preset.reactive_variant_rate_reactive)
    order = rng.permutation(n_images)
    variants[order[:n_atypical]] = "atypical"
    rest = order[n_atypical:]
    n_reactive = int(rng.binomial(rest.size, confounder_rate))
    variants[rest[:n_reactive]] = "reactive"
    return tuple(str(v) for v in variants)


def _cell_traits(rng: np.random.Generator, variants: tuple[str, ...], signal: float,
                 preset: SynthPreset) -> np.ndarray:
    """Per cell and trait, a strength in [0, 1]: atypical cells scatter around their patient's
    signal, typical ones around 0, and a few typical ones carry one strong atypical trait (a
    nucleolus or a notched nucleus). Reactive cells are drawn separately (zeros here)."""
    n = len(variants)
    atypical = np.array([v == "atypical" for v in variants])
    typical = np.array([v == "typical" for v in variants])
    # Each atypical cell is atypical to its own degree (some barely), then each trait moves
    # around that degree on its own.
    centre = np.where(atypical, np.clip(signal + preset.cell_spread * rng.standard_normal(n), 0, 1),
                      0.0)[:, None]
    traits = np.clip(centre + preset.cell_spread * rng.standard_normal((n, len(TRAITS))), 0.0, 1.0)
    mimic = typical & (rng.uniform(size=n) < preset.typical_atypia_rate)
    which = rng.choice([TRAITS.index("outline"), TRAITS.index("nucleoli")], size=n)
    strong = rng.uniform(0.6, 1.0, n)
    traits[mimic, which[mimic]] = strong[mimic]
    traits[~(atypical | typical)] = 0.0
    return traits


def _assign_sites(rng: np.random.Generator, labels: np.ndarray, splits: list[str],
                  preset: SynthPreset) -> np.ndarray:
    """Each patient's site given its label and split: the split's site mix, tilted towards the
    sites with more tumoral patients for tumoral ones (so prevalence differs by site)."""
    odds = np.asarray(preset.site_tumoral_odds)
    sites = np.empty(labels.size, dtype=int)
    for i, (label, split) in enumerate(zip(labels, splits, strict=True)):
        weights = np.asarray(preset.site_mix_train if split == "train" else preset.site_mix_test)
        weights = weights * (odds if label == 1 else 1.0)
        sites[i] = rng.choice(preset.n_sites, p=weights / weights.sum())
    return sites


def _flip_labels(rng: np.random.Generator, labels: np.ndarray, counts: np.ndarray, n_train: int,
                 preset: SynthPreset) -> np.ndarray:
    """Observed training labels: as many tumoral as reactive ones flipped (class counts stay as
    the preset says); with a count cap only patients under it, so a high count stays tumoral."""
    observed = labels.copy()
    per_class = int(round(preset.label_noise * n_train / 2))
    if per_class == 0:
        return observed
    eligible = np.arange(n_train)
    if preset.reactive_count_cap is not None:
        eligible = eligible[counts[:n_train] <= preset.reactive_count_cap]
    for label in (0, 1):
        candidates = eligible[labels[eligible] == label]
        chosen = rng.choice(candidates, size=min(per_class, candidates.size), replace=False)
        observed[chosen] = 1 - label
    return observed


def _plan_cohort(
    preset: SynthPreset, seed_seq: np.random.SeedSequence, witness_rate: float,
    clinical_informativeness: float,
) -> tuple[list[_Patient], list[Stain]]:
    rng = np.random.default_rng(seed_seq)
    n = preset.n_patients
    id_pool = max(300, 3 * n)
    ids = [f"P{i}" for i in rng.choice(id_pool, size=n, replace=False)]
    train_labels = rng.permutation(
        np.array([1] * preset.n_train_tumoral + [0] * preset.n_train_reactive, dtype=int)
    )
    test_labels = rng.permutation(
        np.array([1] * preset.n_test_tumoral + [0] * preset.n_test_reactive, dtype=int)
    )
    labels = np.concatenate([train_labels, test_labels])
    splits = ["train"] * train_labels.size + ["test"] * test_labels.size
    sizes = np.concatenate([
        _bag_sizes(rng, train_labels, preset.train_bags),
        _bag_sizes(rng, test_labels, preset.test_bags),
    ])
    ages, counts = _clinical(rng, labels, clinical_informativeness, preset.reactive_count_cap)
    dobs = _dates_of_birth(rng, ages)
    genders = _genders(rng, n)
    variants = [_instance_variants(rng, int(labels[i]), int(sizes[i]), preset, witness_rate)
                for i in range(n)]
    # Everything below draws only when its knob is on, so the easy presets keep their bytes.
    observed = _flip_labels(rng, labels, counts, train_labels.size, preset)
    site_stains = [sample_site_stain(rng) for _ in range(preset.n_sites)]
    sites = _assign_sites(rng, labels, splits, preset) if preset.n_sites else np.full(n, -1)
    signals = np.full(n, preset.signal_strength)
    if preset.signal_spread > 0:
        signals = np.clip(preset.signal_strength + preset.signal_spread * rng.standard_normal(n),
                          0.0, 1.0)
    traits = [_cell_traits(rng, variants[i], float(signals[i]), preset)
              if preset.per_cell_traits else None for i in range(n)]
    patients = [
        _Patient(
            patient_id=ids[i], split=splits[i], label=int(labels[i]), gender=genders[i],
            dob=dobs[i], lymph_count=float(counts[i]), variants=variants[i],
            observed_label=int(observed[i]), site=int(sites[i]), signal_strength=float(signals[i]),
            traits=traits[i],
        )
        for i in range(n)
    ]
    return patients, site_stains


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


def _clinical_frame(patients: Sequence[_Patient], hide_labels: bool) -> pd.DataFrame:
    return pd.DataFrame({
        "ID": [p.patient_id for p in patients],
        "LABEL": [-1 if hide_labels else p.observed_label for p in patients],
        "GENDER": [p.gender for p in patients],
        "DOB": [p.dob for p in patients],
        "LYMPH_COUNT": [p.lymph_count for p in patients],
    }, columns=CLINICAL_COLUMNS)


def _write_tables(root: Path, patients: Sequence[_Patient]) -> pd.DataFrame:
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
    patients, site_stains = _plan_cohort(spec, children[0], spec.witness_rate,
                                         spec.clinical_informativeness)

    with _staged_directory(out_dir) as staging:
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
    with _staged_directory(out_dir) as staging:
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


# --------------------------------------------------------------------------- readers


def file_checksums(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (but the manifest and this record), by relative path."""
    root = Path(root)
    return {path.relative_to(root).as_posix(): file_sha256(path)
            for path in sorted(root.rglob("*"))
            if path.is_file() and path.name not in (MANIFEST_NAME, CHECKSUMS_NAME)}


def verify_generated(root: str | os.PathLike) -> list[str] | None:
    """What changed in a generated directory since it was written: missing, altered and
    unexpected files (empty when intact); None when it records no checksums (made before
    milbench recorded them)."""
    root = Path(root)
    record = root / CHECKSUMS_NAME
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text(encoding="utf-8"))
    found = file_checksums(root)
    problems = [f"missing {name}" for name in recorded if name not in found]
    problems += [f"altered {name}" for name, digest in recorded.items()
                 if name in found and found[name] != digest]
    problems += [f"unexpected {name}" for name in found if name not in recorded]
    return problems


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The ``synth.json`` manifest of a generated directory, or None if there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_truth(root: str | os.PathLike) -> SyntheticTruth:
    """Read the hidden truth of a synthetic cohort (``root/truth``)."""
    truth = Path(root) / "truth"
    if not truth.is_dir():
        raise FileNotFoundError(f"{truth} not found: {root} is not a synthetic cohort")
    labels = pd.read_csv(truth / "test_labels.csv", dtype={"ID": str, "LABEL": int})
    instances = pd.read_csv(
        truth / "instances.csv",
        dtype={"patient_id": str, "image": str, "split": str, "atypical": int, "variant": str},
    )
    masks = truth / "masks"
    return SyntheticTruth(
        test_labels={str(i): int(v) for i, v in zip(labels["ID"], labels["LABEL"], strict=True)},
        instances=instances,
        mask_dir=masks if masks.is_dir() else None,
    )


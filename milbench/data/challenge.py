"""Loader for the lymphocytosis challenge folder (Kaggle ``dlmi-lymphocytosis-classification``).

Layout (see docs/data.md)::

    ROOT/clinical_annotation.csv           all patients (optional unnamed index column)
    ROOT/trainset/trainset_true.csv        train rows   } used when clinical_annotation.csv
    ROOT/testset/testset_data.csv          test rows    } is absent
    ROOT/trainset/P26/000000.jpg ...       one folder per patient
    ROOT/testset/P71/000000.jpg ...

Policy on bad input (also in the README): problems that make a patient unusable or ambiguous are
errors naming the file, line and field; individual image files that cannot be used (zero bytes,
not an image, unreadable header) and non-image files are skipped and recorded in
``Cohort.skipped`` (and logged), unless ``strict_images=True`` turns them into errors.
"""

from __future__ import annotations

import csv
import logging
import re
from datetime import date, datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from milbench.data.cohort import Cohort, Patient, SkipRecord

log = logging.getLogger(__name__)

DEFAULT_REFERENCE_DATE = date(2021, 1, 1)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
REQUIRED_COLUMNS = ("ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT")
SPLIT_FOLDERS = {"train": "trainset", "test": "testset"}
SPLIT_CSVS = {"train": "trainset/trainset_true.csv", "test": "testset/testset_data.csv"}
# Files that operating systems drop into folders; skipped without a record.
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


class ChallengeDataError(ValueError):
    """The challenge folder is inconsistent or a CSV holds a value that cannot be used."""


def _location(csv_path: Path, line: int, patient_id: str | None = None) -> str:
    where = f"{csv_path} line {line}"
    return f"{where} (ID {patient_id})" if patient_id else where


def parse_dob(text: str) -> date:
    """Parse the two DOB formats of the real data: ``M/D/YYYY`` and ``DD-MM-YYYY``."""
    value = text.strip()
    if re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}", value, flags=re.ASCII):
        layout = "%m/%d/%Y"
    elif re.fullmatch(r"\d{1,2}-\d{1,2}-\d{4}", value, flags=re.ASCII):
        layout = "%d-%m-%Y"
    else:
        raise ValueError(f"{text!r} is neither M/D/YYYY nor DD-MM-YYYY")
    try:
        return datetime.strptime(value, layout).date()
    except ValueError as error:
        raise ValueError(f"{text!r} is not a valid date ({error})") from None


def age_at(dob: date, reference: date) -> float:
    return (reference - dob).days / 365.25


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """Rows of a clinical CSV as ``(line number, {column: raw text})``; an unnamed first column
    (the pandas index of ``clinical_annotation.csv``) is dropped."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ChallengeDataError(f"{csv_path}: not UTF-8 text ({error})") from error
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise ChallengeDataError(f"{csv_path}: empty file, expected header {','.join(REQUIRED_COLUMNS)}")
    header = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ChallengeDataError(f"{csv_path} line 1: missing columns {missing} in header {header}")
    rows = []
    for line, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue  # blank line
        if len(values) != len(header):
            raise ChallengeDataError(
                f"{_location(csv_path, line)}: {len(values)} fields, header has {len(header)}"
            )
        rows.append((line, {name: value.strip() for name, value in zip(header, values, strict=True) if name}))
    return rows


def _parse_row(csv_path: Path, line: int, row: dict[str, str], reference: date) -> dict:
    patient_id = row["ID"]
    where = _location(csv_path, line, patient_id or None)
    if not patient_id:
        raise ChallengeDataError(f"{where}, field ID: empty")
    try:
        label = int(float(row["LABEL"]))
        if float(row["LABEL"]) != label or label not in (-1, 0, 1):
            raise ValueError
    except ValueError:
        raise ChallengeDataError(
            f"{where}, field LABEL: {row['LABEL']!r} is not one of 0, 1 or -1 (test)"
        ) from None
    gender = row["GENDER"].upper()
    if gender not in ("M", "F"):
        raise ChallengeDataError(f"{where}, field GENDER: {row['GENDER']!r} is not M or F")
    try:
        dob = parse_dob(row["DOB"])
    except ValueError as error:
        raise ChallengeDataError(f"{where}, field DOB: {error}") from None
    if dob > reference:
        raise ChallengeDataError(f"{where}, field DOB: {dob} is after the reference date {reference}")
    try:
        count = float(row["LYMPH_COUNT"])
    except ValueError:
        raise ChallengeDataError(
            f"{where}, field LYMPH_COUNT: {row['LYMPH_COUNT']!r} is not a number"
        ) from None
    if not count > 0 or count == float("inf"):
        raise ChallengeDataError(f"{where}, field LYMPH_COUNT: {count} is not a positive count")
    return {
        "id": patient_id,
        "label": label,
        "gender": gender,
        "dob": dob,
        "age": age_at(dob, reference),
        "lymph_count": count,
        "where": where,
    }


def _check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None if its header reads fine."""
    if path.stat().st_size == 0:
        return "zero-byte file"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        return f"unreadable image ({error})"
    return None


def _list_images(folder: Path, strict: bool, skipped: list[SkipRecord]) -> list[Path]:
    images = []
    for path in sorted(folder.iterdir()):
        if path.name in IGNORED_NAMES:
            continue
        if path.is_dir():
            reason = "sub-folder inside a patient folder"
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            reason = "not an image file (extension)"
        else:
            reason = _check_image(path)
        if reason is None:
            images.append(path)
            continue
        if strict:
            raise ChallengeDataError(f"{path}: {reason}")
        log.warning("skipping %s: %s", path, reason)
        skipped.append(SkipRecord(str(path), reason))
    return images


def _patient_folders(root: Path, split: str) -> dict[str, Path]:
    split_dir = root / SPLIT_FOLDERS[split]
    if not split_dir.is_dir():
        raise ChallengeDataError(f"{split_dir}: folder missing (expected one sub-folder per patient)")
    return {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir()}


def _read_clinical(root: Path, reference: date) -> list[dict]:
    """Parsed rows with the CSV they came from; ``split_hint`` is set when the CSV implies it."""
    combined = root / "clinical_annotation.csv"
    if combined.is_file():
        sources = [(combined, None)]
    else:
        sources = [(root / SPLIT_CSVS[s], s) for s in ("train", "test")]
        for path, _ in sources:
            if not path.is_file():
                raise ChallengeDataError(
                    f"{root}: no clinical_annotation.csv and no {path.relative_to(root)}"
                )
    records = []
    for csv_path, split_hint in sources:
        for line, row in _read_rows(csv_path):
            record = _parse_row(csv_path, line, row, reference)
            record["split_hint"] = split_hint
            records.append(record)
    return records


def load_challenge(
    root: str | Path,
    reference_date: date = DEFAULT_REFERENCE_DATE,
    strict_images: bool = False,
) -> Cohort:
    """Read a challenge folder into a :class:`Cohort` (train patients first, each split by ID)."""
    root = Path(root)
    if not root.is_dir():
        raise ChallengeDataError(f"{root}: not a folder")
    records = _read_clinical(root, reference_date)

    seen: dict[str, str] = {}
    for record in records:
        if record["id"] in seen:
            raise ChallengeDataError(
                f"{record['where']}: duplicate ID, first seen at {seen[record['id']]}"
            )
        seen[record["id"]] = record["where"]

    folders = {split: _patient_folders(root, split) for split in SPLIT_FOLDERS}
    both = set(folders["train"]) & set(folders["test"])
    if both:
        raise ChallengeDataError(f"{root}: patient folders in both trainset and testset: {sorted(both)}")
    folder_split = {pid: split for split, found in folders.items() for pid in found}
    orphans = sorted(set(folder_split) - set(seen))
    if orphans:
        paths = [str(folders[folder_split[pid]][pid]) for pid in orphans]
        raise ChallengeDataError(f"patient folders with no clinical CSV row: {paths}")

    skipped: list[SkipRecord] = []
    patients = []
    for record in records:
        pid = record["id"]
        split = folder_split.get(pid)
        if split is None:
            raise ChallengeDataError(
                f"{record['where']}: no patient folder {pid} in trainset/ or testset/"
            )
        if record["split_hint"] not in (None, split):
            raise ChallengeDataError(
                f"{record['where']}: listed in the {record['split_hint']} CSV but its folder is in "
                f"{SPLIT_FOLDERS[split]}/"
            )
        label = record["label"]
        if split == "test" and label != -1:
            raise ChallengeDataError(
                f"{record['where']}, field LABEL: test patients must have -1, got {label}"
            )
        if split == "train" and label == -1:
            raise ChallengeDataError(
                f"{record['where']}, field LABEL: train patients need 0 or 1, got -1"
            )
        folder = folders[split][pid]
        images = _list_images(folder, strict_images, skipped)
        if not images:
            raise ChallengeDataError(f"{folder}: patient folder holds no usable image")
        patients.append(
            Patient(
                id=pid,
                split=split,
                label=None if label == -1 else label,
                gender=record["gender"],
                dob=record["dob"],
                age=record["age"],
                lymph_count=record["lymph_count"],
                image_paths=tuple(images),
            )
        )
    patients.sort(key=lambda p: (p.split != "train", _id_sort_key(p.id)))
    return Cohort(root=root, patients=patients, reference_date=reference_date, skipped=skipped)


def _id_sort_key(patient_id: str) -> tuple:
    """P9 before P10: compare the numeric part numerically when there is one."""
    match = re.fullmatch(r"(\D*)(\d+)", patient_id)
    return (match.group(1), int(match.group(2)), "") if match else (patient_id, -1, patient_id)

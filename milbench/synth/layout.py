"""The folder a generator writes: its file names and columns, staged atomic writing, the
checksums that tell a reused folder is intact, and the readers of its manifest and hidden truth.

Kept apart from the generator so that the readers (and the difficulty figures, which read a
written cohort) load without the renderer.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from milbench.io import file_sha256

GENERATOR_VERSION = "2"
MANIFEST_NAME = "synth.json"
CHECKSUMS_NAME = "checksums.json"  # SHA-256 of every generated file, checked when reused
# Ages are drawn first and turned into birth dates relative to this day; loaders computing age
# from DOB should use the same reference to recover them.
AGE_REFERENCE_DATE = date(2020, 1, 1)
CLINICAL_CSV_COLUMNS = ["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"]
INSTANCE_COLUMNS = ["patient_id", "image", "split", "atypical", "variant", "atypia"]
# A cohort's pixel ceiling (milbench.bench.ceiling), computed on demand into truth/ after the
# cohort was written: a figure about the cohort, not one of its files, so not checksummed.
PIXEL_CEILING_GLOB = "pixel_ceiling_*px.json"
PATIENT_TRUTH_COLUMNS = ["patient_id", "split", "label", "observed_label", "label_flipped", "site",
                         "signal_strength", "witness_fraction", "n_images"]


@dataclass(frozen=True)
class SyntheticTruth:
    """Hidden truth of a synthetic cohort."""

    test_labels: dict[str, int]
    instances: pd.DataFrame  # patient_id, image, split, atypical (0/1), variant
    mask_dir: Path | None


# --------------------------------------------------------------------------- output directory


def require_empty_target(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not empty; refusing to write into it")
    elif out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a directory")


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden sibling directory that becomes ``out_dir`` only if the body succeeds."""
    require_empty_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                    dir=out_dir.parent))
    try:
        yield staging
        # mkdtemp makes a private (0700) directory; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        require_empty_target(out_dir)
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


# --------------------------------------------------------------------------- readers


def file_checksums(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (but the manifest, this record and the figures
    computed later), by relative path."""
    root = Path(root)
    return {path.relative_to(root).as_posix(): file_sha256(path)
            for path in sorted(root.rglob("*"))
            if path.is_file() and path.name not in (MANIFEST_NAME, CHECKSUMS_NAME)
            and not _computed_later(root, path)}


def _computed_later(root: Path, path: Path) -> bool:
    """Figures computed from the written cohort on demand (the pixel ceiling)."""
    return path.parent == root / "truth" and path.match(PIXEL_CEILING_GLOB)


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


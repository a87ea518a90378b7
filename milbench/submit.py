"""Leaderboard submissions: the only writer of submission CSVs.

A submission is ``Id,Predicted`` with one row per test patient and 0/1 predictions. It is
validated against the cohort's test IDs before writing, written atomically under a new versioned
name (an earlier file is never overwritten), with a provenance JSON beside it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from milbench.io import atomic_write_json, write_new_file

HEADER = ("Id", "Predicted")


class SubmissionError(ValueError):
    """A submission does not match the cohort's test patients or the required format."""


def validate_predictions(predictions: Mapping[str, int], test_ids: list[str]) -> None:
    problems = []
    missing = sorted(set(test_ids) - set(predictions))
    extra = sorted(set(predictions) - set(test_ids))
    if missing:
        problems.append(f"missing test patients: {missing[:10]}{' …' if len(missing) > 10 else ''}")
    if extra:
        problems.append(f"patients that are not test patients: {extra[:10]}")
    bad = {pid: v for pid, v in predictions.items() if v not in (0, 1) or isinstance(v, bool)}
    if bad:
        problems.append(f"predictions must be 0 or 1: {dict(list(bad.items())[:10])}")
    if problems:
        raise SubmissionError("; ".join(problems))


def _next_free_stem(directory: Path, stem: str) -> int:
    pattern = re.compile(rf"^{re.escape(stem)}-v(\d+)\.csv$")
    versions = [int(m.group(1)) for p in directory.glob(f"{stem}-v*.csv") if (m := pattern.match(p.name))]
    return max(versions, default=0) + 1


def write_submission(
    predictions: Mapping[str, int],
    test_ids: list[str],
    directory: str | Path,
    stem: str,
    provenance: dict[str, Any],
) -> Path:
    """Validate and write ``directory/<stem>-v<N>.csv`` (N = first free version) plus its JSON.

    Rows follow ``test_ids`` order. Returns the CSV path.
    """
    predictions = {pid: int(v) if not isinstance(v, bool) else v for pid, v in predictions.items()}
    validate_predictions(predictions, test_ids)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [",".join(HEADER)] + [f"{pid},{predictions[pid]}" for pid in test_ids]
    text = "\n".join(lines) + "\n"
    version = _next_free_stem(directory, stem)
    while True:
        path = directory / f"{stem}-v{version}.csv"
        try:
            write_new_file(path, lambda tmp: tmp.write_text(text))
            break
        except FileExistsError:  # another writer took this version meanwhile
            version += 1
    atomic_write_json(path.with_suffix(".json"), {"submission": path.name, **provenance})
    return path


def check_submission(path: str | Path, test_ids: list[str]) -> list[str]:
    """Every problem found in a submission CSV, as messages naming the line; empty if valid."""
    path = Path(path)
    problems: list[str] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        return [f"{path}: cannot read ({error})"]
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return [f"{path}: empty file, expected header {','.join(HEADER)}"]
    if tuple(cell.strip() for cell in rows[0]) != HEADER:
        problems.append(f"{path} line 1: header must be {','.join(HEADER)}, got {','.join(rows[0])}")
    seen: dict[str, int] = {}
    expected = set(test_ids)
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            problems.append(f"{path} line {line}: expected 2 fields, got {len(row)}")
            continue
        pid, value = row[0].strip(), row[1].strip()
        if pid in seen:
            problems.append(f"{path} line {line}: duplicate Id {pid} (first on line {seen[pid]})")
        seen.setdefault(pid, line)
        if pid not in expected:
            problems.append(f"{path} line {line}: Id {pid!r} is not a test patient")
        if value not in ("0", "1"):
            problems.append(f"{path} line {line}: Predicted must be 0 or 1, got {value!r}")
    missing = sorted(expected - set(seen))
    if missing:
        problems.append(f"{path}: missing test patients {missing[:10]}{' …' if len(missing) > 10 else ''}")
    return problems

"""The feature store: per-image vectors on disk, memory-mapped, keyed by what made them.

Layout of one store, ``<cache>/features/<key>/``::

    manifest.json   extractor config (resolved), key, dim, n_rows, how the key was made
    index.csv       row, patient_id, position, path, size, mtime_ns
    features.f32    raw little-endian float32 matrix, n_rows x dim (numpy memmap); a store of
                    ``dtype: uint8`` (the ``pixels`` extractor: preprocessed images, flattened)
                    holds ``features.u8`` instead
    progress.json   {"rows_done": k}: rows [0, k) are flushed and final
    complete.json   written last; only its presence makes the store complete. It records the
                    byte size and SHA-256 of features.f32 and index.csv, which
                    :meth:`FeatureStore.verify` checks: a truncated or altered store is named
                    and never silently read

The key is a SHA-256 of the canonical JSON of the resolved extractor config and of the source
files as ``(path, size in bytes, mtime in ns)`` in index order. Size + mtime rather than content
hashes: hashing 17k JPEGs on every run costs more than extraction of a small model, and any
rewrite of an image (synthetic regeneration, re-download) changes its mtime. A copy that keeps
mtimes (``cp -p``) of identical files keeps the key, which is what we want.

Resumability: rows are written in order into the memmap; a commit flushes the memmap to disk
and only then replaces ``progress.json`` atomically. Commits happen after a batch once
``commit_seconds`` have passed since the last one (0: after every batch), and always at the
end. A crash or Ctrl-C loses at most the uncommitted rows, which the next run recomputes;
flushing by time rather than every batch keeps msync off the hot path for small models.
One writer per store at a time: extractions into one cache folder hold its
``extraction.lock`` (:func:`exclusive`), so a second run waits for the first, then reuses what
it built instead of writing the same files beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milbench.io import atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger(__name__)
_held_locks: set[str] = set()  # locks this process holds: a nested acquisition passes through
_held_guard = threading.Lock()

MANIFEST = "manifest.json"
INDEX = "index.csv"
# The matrix file per manifest ``dtype``: numpy dtype and file name.
MATRIX_DTYPES = {"float32": ("<f4", "features.f32"), "uint8": ("u1", "features.u8")}
PROGRESS = "progress.json"
COMPLETE = "complete.json"
INDEX_COLUMNS = ["row", "patient_id", "position", "path", "size", "mtime_ns"]


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if needed) across processes;
    waits, saying so in the log, while another process holds it."""
    lock_path = Path(lock_path).resolve()
    with _held_guard:
        nested = str(lock_path) in _held_locks
    if nested:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process %s (%s)", what, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        with _held_guard:
            _held_locks.add(str(lock_path))
        try:
            yield
        finally:
            with _held_guard:
                _held_locks.discard(str(lock_path))
            fcntl.flock(handle, fcntl.LOCK_UN)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the byte string that hashes into a key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_key(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def source_table(image_table: pd.DataFrame) -> pd.DataFrame:
    """The cohort's image table plus file size and mtime, which go into the key.

    Paths are made absolute so the key and the index do not depend on the working directory.
    """
    sizes, mtimes = [], []
    paths = [os.path.abspath(p) for p in image_table["path"]]
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"image listed in the cohort is missing: {path}") from error
        sizes.append(stat.st_size)
        mtimes.append(stat.st_mtime_ns)
    table = image_table.loc[:, ["patient_id", "position", "path"]].reset_index(drop=True)
    table.insert(0, "row", np.arange(len(table)))
    table["path"] = paths
    table["size"] = sizes
    table["mtime_ns"] = mtimes
    return table


def sources_fingerprint(sources: pd.DataFrame) -> str:
    records = sources.loc[:, ["path", "size", "mtime_ns"]].itertuples(index=False, name=None)
    digest = hashlib.sha256()
    for path, size, mtime in records:
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def store_key(config: dict, sources: pd.DataFrame) -> str:
    return hash_key({"config": config, "sources": sources_fingerprint(sources)})


class StoreIntegrityError(RuntimeError):
    """A complete store whose files no longer match what was recorded when it was finished."""


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


class FeatureStore:
    """Read side of one store directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no feature store at {self.root} (missing {MANIFEST})")
        self.manifest: dict = json.loads(manifest_path.read_text())
        self.key: str = self.manifest["key"]
        self.dim: int = int(self.manifest["dim"])
        self.n_rows: int = int(self.manifest["n_rows"])
        self.dtype, self.matrix_name = matrix_layout(self.manifest)
        self._index: pd.DataFrame | None = None
        self._row_of_path: dict[str, int] | None = None

    def __repr__(self) -> str:
        state = "complete" if self.is_complete else f"{self.rows_done}/{self.n_rows} rows"
        return f"FeatureStore({self.root}, dim={self.dim}, {state})"

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def is_complete(self) -> bool:
        return (self.root / COMPLETE).is_file()

    @property
    def rows_done(self) -> int:
        if self.is_complete:
            return self.n_rows
        return read_rows_done(self.root)

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            self._index = pd.read_csv(self.root / INDEX, dtype={"patient_id": str, "path": str})
        return self._index

    def features(self) -> np.ndarray:
        """The whole ``(n_rows, dim)`` matrix, memory-mapped read-only; complete stores only."""
        self._require_complete()
        return np.memmap(self.root / self.matrix_name, dtype=self.dtype, mode="r",
                         shape=(self.n_rows, self.dim))

    def rows(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Row numbers of the given image paths; unknown paths raise naming them."""
        if self._row_of_path is None:
            self._row_of_path = dict(zip(self.index["path"], self.index["row"], strict=True))
        absolute = [os.path.abspath(p) for p in paths]
        missing = [p for p in absolute if p not in self._row_of_path]
        if missing:
            raise KeyError(f"images not in feature store {self.root}: {missing[:5]}")
        return np.array([self._row_of_path[p] for p in absolute], dtype=np.int64)

    def bags(self, cohort) -> list[np.ndarray]:
        """One ``(n_i, dim)`` array (of the store's dtype) per patient, in ``cohort.patients``
        order."""
        matrix = self.features()
        return [np.asarray(matrix[self.rows(p.image_paths)]) for p in cohort.patients]

    def _require_complete(self) -> None:
        if not self.is_complete:
            raise RuntimeError(f"feature store {self.root} is incomplete "
                               f"({self.rows_done}/{self.n_rows} rows); rerun the extraction")
        expected = self.n_rows * self.dim * self.dtype.itemsize
        matrix = self.root / self.matrix_name
        size = matrix.stat().st_size if matrix.is_file() else None
        if size != expected:  # cheap, on every read: a truncated matrix never reaches a model
            raise StoreIntegrityError(f"feature store {self.root}: {self.matrix_name} has "
                                      f"{size} bytes, expected {expected}")

    def verify(self) -> list[str]:
        """Problems with a complete store (empty when sound): missing files, sizes and SHA-256
        checksums against those recorded when it was finished."""
        if not self.is_complete:
            return [f"incomplete ({self.rows_done}/{self.n_rows} rows)"]
        recorded = json.loads((self.root / COMPLETE).read_text()).get("files")
        if recorded is None:
            return ["no checksums recorded (written by an older milbench); rebuild it"]
        problems = []
        for name, record in recorded.items():
            path = self.root / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != record["bytes"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, recorded "
                                f"{record['bytes']}")
            elif file_sha256(path) != record["sha256"]:
                problems.append(f"{name} does not match its recorded SHA-256")
        return problems


def matrix_layout(manifest: dict) -> tuple[np.dtype, str]:
    """The matrix's numpy dtype and file name for a store manifest (float32 when unstated)."""
    name = manifest.get("dtype", "float32")
    if name not in MATRIX_DTYPES:
        raise ValueError(f"feature store dtype must be one of {sorted(MATRIX_DTYPES)}, "
                         f"got {name!r}")
    dtype, file_name = MATRIX_DTYPES[name]
    return np.dtype(dtype), file_name


def read_rows_done(root: Path) -> int:
    path = Path(root) / PROGRESS
    if not path.is_file():
        return 0
    return int(json.loads(path.read_text())["rows_done"])


class StoreWriter:
    """Write side: create or resume a store, append flushed batches, mark it complete."""

    def __init__(self, root: str | os.PathLike, manifest: dict, sources: pd.DataFrame,
                 commit_seconds: float = 0.0) -> None:
        self.root = Path(root)
        self.commit_seconds = commit_seconds
        self.n_rows = int(manifest["n_rows"])
        self.dim = int(manifest["dim"])
        self.dtype, self.matrix_name = matrix_layout(manifest)
        expected_bytes = self.n_rows * self.dim * self.dtype.itemsize
        existing = self.root / MANIFEST
        matrix = self.root / self.matrix_name
        resumable = (existing.is_file()
                     and json.loads(existing.read_text()).get("key") == manifest["key"]
                     and matrix.is_file() and matrix.stat().st_size == expected_bytes)
        if not resumable:
            self._create(manifest, sources, expected_bytes)
        self.rows_done = read_rows_done(self.root)  # committed (durable) rows
        self.rows_written = self.rows_done
        self._last_commit = time.monotonic()
        self._matrix = np.memmap(matrix, dtype=self.dtype, mode="r+",
                                 shape=(self.n_rows, self.dim)) if self.n_rows else None

    def _create(self, manifest: dict, sources: pd.DataFrame, expected_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in (COMPLETE, PROGRESS):
            (self.root / name).unlink(missing_ok=True)
        atomic_write_text(self.root / INDEX, sources.loc[:, INDEX_COLUMNS].to_csv(index=False))
        with open(self.root / self.matrix_name, "wb") as handle:
            handle.truncate(expected_bytes)  # sparse until written
        atomic_write_json(self.root / PROGRESS, {"rows_done": 0})
        atomic_write_json(self.root / MANIFEST, manifest)

    def write(self, start: int, block: np.ndarray) -> None:
        """Write rows ``[start, start + len(block))``; commit if ``commit_seconds`` passed."""
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected {self.rows_written}, "
                             f"got {start}")
        if block.shape[1] != self.dim:
            raise ValueError(f"extractor produced {block.shape[1]} features, store expects "
                             f"{self.dim}")
        if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
            raise ValueError(f"non-finite features in rows {start}..{start + len(block) - 1}")
        self._matrix[start:start + len(block)] = block
        self.rows_written = start + len(block)
        if time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        """Make the written rows durable, then record them (in that order)."""
        if self.rows_written == self.rows_done:
            return
        self._matrix.flush()
        atomic_write_json(self.root / PROGRESS, {"rows_done": self.rows_written})
        self.rows_done = self.rows_written
        self._last_commit = time.monotonic()

    def finish(self, info: dict | None = None) -> FeatureStore:
        self.commit()
        if self.rows_done != self.n_rows:
            raise RuntimeError(f"store {self.root} has {self.rows_done}/{self.n_rows} rows")
        if self._matrix is not None:
            self._matrix.flush()
        del self._matrix
        files = {name: file_record(self.root / name) for name in (self.matrix_name, INDEX)}
        atomic_write_json(self.root / COMPLETE, {"rows": self.n_rows, "files": files,
                                                 **(info or {})})
        return FeatureStore(self.root)


def changed_sources(root: Path) -> int:
    """How many of a store's source images no longer have the recorded size and mtime (its key
    would differ today: the store is stale, a candidate for pruning)."""
    index = pd.read_csv(Path(root) / INDEX, dtype={"path": str})
    changed = 0
    for path, size, mtime in index[["path", "size", "mtime_ns"]].itertuples(index=False):
        try:
            stat = os.stat(path)
        except OSError:
            changed += 1
            continue
        changed += int(stat.st_size != size or stat.st_mtime_ns != mtime)
    return changed


def verify_cache(cache_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per store under ``<cache_dir>/features``: key, extractor, rows, state
    (complete, incomplete, damaged), the problems found (sizes, checksums, complete marker) and
    how many source images changed since it was made."""
    rows = []
    for root in sorted(Path(cache_dir, "features").glob("*")):
        if not root.is_dir():
            continue
        try:
            store = FeatureStore(root)
        except (FileNotFoundError, ValueError, KeyError) as error:
            rows.append({"key": root.name, "extractor": "?", "rows": 0, "state": "damaged",
                         "problems": str(error), "changed_sources": None})
            continue
        problems = store.verify()
        state = ("complete" if not problems else
                 "incomplete" if not store.is_complete else "damaged")
        rows.append({"key": root.name, "extractor": str(store.config.get("name")),
                     "rows": store.rows_done, "state": state,
                     "problems": "; ".join(problems) if store.is_complete else "",
                     "changed_sources": changed_sources(root) if (root / INDEX).is_file() else None})
    return pd.DataFrame(rows, columns=["key", "extractor", "rows", "state", "problems",
                                       "changed_sources"])

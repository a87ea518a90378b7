"""Atomic file writing: a file either appears whole under its final name or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _temporary_sibling(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    # mkstemp makes owner-only files; results are meant to be shared like any other file.
    os.chmod(name, 0o644)
    return Path(name)


def _write_through_temporary(path: str | os.PathLike, write: Callable[[Path], None],
                             place: Callable[[Path, Path], None]) -> Path:
    """``write(tmp)`` to a temporary sibling of ``path``, then ``place(tmp, path)``; the
    temporary file never outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    Readers never see a half-written file; on any error the temporary file is removed and
    an existing file at ``path`` is left untouched.
    """
    return _write_through_temporary(path, write, os.replace)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks (the project's one file checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_new_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file that must not exist yet; raise FileExistsError rather than replace one.

    The content goes to a temporary file first and is hard-linked into place, so the final
    name appears atomically and an earlier file of the same name is never overwritten.
    """
    return _write_through_temporary(path, write, os.link)

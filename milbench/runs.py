"""Run directories: every training or evaluation command writes a new one, never overwriting.

A run records its resolved config (with the seed actually used), the package version, the git
commit with a dirty flag, library versions, and everything it produced. This module is the only
writer of run directories.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import milbench
from milbench.io import atomic_write, atomic_write_json, atomic_write_text, write_new_file

RECORDED_LIBRARIES = (
    "numpy", "pandas", "scikit-learn", "scipy", "torch", "torchvision", "xgboost", "lightgbm",
    "opencv-python-headless", "pillow", "pot", "matplotlib", "torchmil", "optuna", "ray",
)


# The config as the user asked for it (validated, before data preparation fills in source
# features): what `milbench run --resume RUN_DIR` continues with, and compares a config with.
REQUESTED_CONFIG = "config_requested.yaml"


def requested_config_path(run_dir: str | Path) -> Path:
    path = Path(run_dir) / REQUESTED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: it holds no {REQUESTED_CONFIG} (not a "
                                "run directory, or one written by an older milbench)")
    return path


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding the milbench sources (None outside git)."""
    where = path or Path(milbench.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_record() -> dict[str, Any]:
    return {
        "milbench_version": milbench.__version__,
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": library_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }


class Run:
    """A run directory; every file goes through its atomic writers."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, base: str | Path, name: str) -> Run:
        """Make ``base/<UTC time>-<name>``; a suffix keeps two runs in one second apart."""
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"
        for attempt in range(1000):
            suffix = f"-{attempt}" if attempt else ""
            path = base / f"{stamp}-{safe_name}{suffix}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            run = cls(path)
            run.write_json("environment.json", environment_record())
            return run
        raise RuntimeError(f"could not create a new run directory under {base}")

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run directory, to resume work in it (its config is never rewritten)."""
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
        return cls(path)

    def file(self, relative: str) -> Path:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_config(self, resolved: dict[str, Any]) -> Path:
        """The resolved config is written once; a second save is an error, never an overwrite."""
        text = yaml.safe_dump(resolved, sort_keys=False)
        return write_new_file(self.file("config.yaml"), lambda tmp: tmp.write_text(text))

    def write_json(self, relative: str, obj: Any) -> Path:
        return atomic_write_json(self.file(relative), obj)

    def write_text(self, relative: str, text: str) -> Path:
        return atomic_write_text(self.file(relative), text)

    def write_csv(self, relative: str, table: pd.DataFrame, index: bool = False) -> Path:
        return atomic_write(self.file(relative), lambda tmp: table.to_csv(tmp, index=index))

    def save_figure(self, relative: str, figure) -> Path:
        import matplotlib.pyplot as plt

        path = atomic_write(self.file(relative), lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        plt.close(figure)
        return path


def referenced_store_keys(workdir: str | Path) -> set[str]:
    """Feature-store keys that some run directory under ``workdir`` recorded (``features.json``,
    ``feature_stores.json``), with the pixels stores those were computed from: the stores
    ``milbench cache prune`` keeps."""
    keys = set()
    for path in Path(workdir, "runs").glob("*/feature*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if path.name == "features.json" and isinstance(record.get("key"), str):
            manifests = [record]
        elif path.name == "feature_stores.json":
            manifests = [store.get("manifest", {}) for store in record.values()]
        else:
            continue
        for manifest in manifests:
            keys.update(str(manifest[name]) for name in ("key", "pixels_key") if manifest.get(name))
    return keys


def prune_unused_stores(workdir: str | Path, dry_run: bool = False) -> tuple[list[str], int]:
    """Remove the complete or damaged feature stores under ``workdir/cache`` that no run
    directory under ``workdir/runs`` refers to; incomplete ones may be an extraction in progress
    and stay. Returns the keys removed (or, with ``dry_run``, that would be) and the store count."""
    from preprocessing.store import verify_cache

    table = verify_cache(Path(workdir) / "cache")
    kept = referenced_store_keys(workdir)
    unused = table[~table["key"].isin(kept) & (table["state"] != "incomplete")]
    if not dry_run:
        for key in unused["key"]:
            shutil.rmtree(Path(workdir) / "cache" / "features" / key)
    return list(unused["key"]), len(table)

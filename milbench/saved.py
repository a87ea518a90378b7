"""Saved final models: a run keeps every model it refitted on all training patients, so a team
can reload it on another day and predict without retraining.

``models/<name>/model/`` of a run directory holds:

- ``model.pkl``: the fitted estimator, pickled (its networks' tensors, scikit-learn, XGBoost and
  LightGBM parts inside it). An ensemble's members that the run also saved as models of their
  own are not copied: the pickle refers to them by name (``models/<member>/model/``), so each
  fitted member is stored once;
- ``model.json``: the model spec (name, label, params, features), the features it read (store
  key and extractor settings), the milbench version and git commit, the library versions;
- ``checksums.json``: the SHA-256 of both files.

``extractors/`` of the run holds the weights of every feature extractor it trained on the
cohort (an autoencoder, a self-supervised encoder) or read from a file (a pretrained backbone),
with their checksums: ``milbench predict`` encodes new patients with them
(``milbench.prediction``).

:func:`load_saved_model` verifies the checksums (a damaged or missing file is refused, naming
it) and the major versions of the libraries that pickled the model (a different major version is
refused, naming the library), then unpickles it. Only load runs you trust: unpickling runs code.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

from milbench.io import atomic_write_bytes, atomic_write_json, file_sha256
from milbench.runs import environment_record

MODEL_FOLDER = "model"
PICKLE = "model.pkl"
RECORD = "model.json"
CHECKSUMS = "checksums.json"
# Libraries whose pickles must be read by the same major version.
CHECKED_LIBRARIES = ("numpy", "scikit-learn", "torch", "xgboost", "lightgbm", "pandas", "scipy")


class SavedModelError(ValueError):
    """A saved model that cannot be loaded: missing, damaged, or from other library versions."""


def model_folder(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "models" / name / MODEL_FOLDER


class _Saver(pickle.Pickler):
    """Pickles a model, writing models saved before (by identity) as references by name."""

    def __init__(self, stream, saved: dict[int, str]):
        super().__init__(stream, protocol=pickle.HIGHEST_PROTOCOL)
        self.saved = saved
        self.references: set[str] = set()

    def persistent_id(self, obj):
        name = self.saved.get(id(obj))
        if name is not None:
            self.references.add(name)
        return name


# Classes that moved to another module since models were first saved: (old module, name) → new
# module, so a model saved by an earlier version still loads.
MOVED_CLASSES = {("preprocessing.images", "Preprocessor"): "preprocessing.preprocess",
                 ("preprocessing.images", "ImageDataset"): "preprocessing.preprocess",
                 ("milbench.models.dmil", "DMILNetwork"): "milbench.models.bag_network",
                 ("milbench.models.dmil", "GatedFusion"): "milbench.models.bag_network"}


class _Loader(pickle.Unpickler):
    def __init__(self, stream, run_dir: Path, cache: dict[str, Any]):
        super().__init__(stream)
        self.run_dir, self.cache = run_dir, cache

    def persistent_load(self, name):
        return _load(self.run_dir, name, self.cache)

    def find_class(self, module: str, name: str):
        return super().find_class(MOVED_CLASSES.get((module, name), module), name)


def save_model(model, run_dir: str | Path, name: str, record: dict[str, Any],
               saved: dict[int, str]) -> Path:
    """Save ``model`` as run model ``name``; ``record`` (spec, features) goes into model.json.
    ``saved`` maps ``id(model)`` to the name of every model saved before in this run (members
    are stored by reference to those) and gains this one."""
    folder = model_folder(run_dir, name)
    stream = io.BytesIO()
    saver = _Saver(stream, {key: value for key, value in saved.items() if key != id(model)})
    saver.dump(model)
    atomic_write_bytes(folder / PICKLE, stream.getvalue())
    environment = environment_record()
    atomic_write_json(folder / RECORD, {
        "name": name, **record, "references": sorted(saver.references),
        "milbench_version": environment["milbench_version"], "git": environment["git"],
        "libraries": environment["libraries"]})
    atomic_write_json(folder / CHECKSUMS, {f: file_sha256(folder / f) for f in (PICKLE, RECORD)})
    saved[id(model)] = name
    return folder


EXTRACTORS = "extractors"


def extractor_weights_name(resolved: dict) -> str | None:
    """The file name under ``extractors/`` of the weights an extractor's features depend on
    (its resolved settings, as its feature store records them): an extractor trained on the
    cohort (``TRAINED_WEIGHTS``: an autoencoder, a self-supervised encoder), or one given a
    weights file (a pretrained backbone); None for weights the code alone decides."""
    from preprocessing.extract import TRAINED_WEIGHTS

    kind = resolved.get("kind")
    if kind in TRAINED_WEIGHTS and resolved.get(TRAINED_WEIGHTS[kind][0]):
        return f"{kind}-{resolved[TRAINED_WEIGHTS[kind][0]]}.pt"
    if resolved.get("weights_sha256"):
        return f"{kind}-{resolved['weights_sha256'][:16]}.pt"
    return None


def save_extractors(run_dir: str | Path, manifests: list[dict], cache_dir: str | Path) -> list[Path]:
    """Copy the weights every feature store of the run depends on (``manifests``; see
    :func:`extractor_weights_name`) into ``run_dir/extractors/``, with their checksums, so that
    ``milbench predict`` encodes new patients with them and never needs the training data."""
    from preprocessing.extract import TRAINED_WEIGHTS

    written = []
    for manifest in manifests:
        config = manifest.get("config") or {}
        name = extractor_weights_name(config)
        if name is None:
            continue
        kind = config["kind"]
        if kind in TRAINED_WEIGHTS and config.get(TRAINED_WEIGHTS[kind][0]):
            key, folder, file = TRAINED_WEIGHTS[kind]
            source = Path(cache_dir) / folder / config[key] / file
        else:
            source = Path(config["weights"])
        target = Path(run_dir) / EXTRACTORS / name
        atomic_write_bytes(target, source.read_bytes())
        written.append(target)
    if written:
        atomic_write_json(Path(run_dir) / EXTRACTORS / CHECKSUMS,
                          {p.name: file_sha256(p) for p in written})
    return written


def load_saved_model(run_dir: str | Path, name: str):
    """The fitted model ``name`` of the run at ``run_dir`` (see the module docstring)."""
    return _load(Path(run_dir), name, {})


def _load(run_dir: Path, name: str, cache: dict[str, Any]):
    if name in cache:
        return cache[name]
    folder = model_folder(run_dir, name)
    if not folder.is_dir():
        saved = sorted(p.parent.name for p in (run_dir / "models").glob(f"*/{MODEL_FOLDER}"))
        raise SavedModelError(f"{folder}: no saved model {name!r} in {run_dir} (saved: "
                              f"{', '.join(saved) or 'none'})")
    check_saved_files(folder)
    record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    check_library_versions(record.get("libraries", {}), folder)
    with open(folder / PICKLE, "rb") as stream:
        model = _Loader(stream, run_dir, cache).load()
    cache[name] = model
    return model


def check_saved_files(folder: Path) -> None:
    """Every file the checksums list is there and unchanged; raises naming the first that is not."""
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise SavedModelError(f"{listing}: missing; the saved model cannot be verified")
    for file, digest in json.loads(listing.read_text(encoding="utf-8")).items():
        path = folder / file
        if not path.is_file():
            raise SavedModelError(f"{path}: missing from the saved model")
        if file_sha256(path) != digest:
            raise SavedModelError(f"{path}: damaged or changed since it was saved (checksum differs)")


def check_library_versions(recorded: dict[str, str | None], folder: Path) -> None:
    """The libraries that pickled the model have the same major version here."""
    now = environment_record()["libraries"]
    for library in CHECKED_LIBRARIES:
        then, here = recorded.get(library), now.get(library)
        if then and here and then.split(".")[0] != here.split(".")[0]:
            raise SavedModelError(f"{folder}: saved with {library} {then}, this environment has "
                                  f"{here} (another major version); install {library}=={then}")

"""`milbench predict RUN_DIR --data ROOT`: a finished run's saved models on new patients.

The patients are the test patients of the challenge folder ``ROOT`` (its ``testset/``, as in
the challenge layout; a second-stage test set, say). For each saved model, the features it read
are extracted from their images with the extractor recorded in ``model.json``: the same
preprocessing and backbone, the stain reference recorded numbers (the source set need not be
there), and the weights of an extractor trained on the training cohort (an autoencoder, a
self-supervised encoder) from the run's ``extractors/`` (never retrained). Nothing of
the training data is read. Before any extraction, each model file is verified (checksums,
library versions) and each extractor is checked against the one the model was trained with:
a setting that differs is refused, naming it.

Written to ``OUT`` (default ``RUN_DIR/predictions/<UTC time>``): ``predictions.csv`` (model,
patient_id, score, predicted), ``instance_scores.csv`` for models that score instances, and a
validated submission CSV per model under ``submissions/``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from milbench.config import ConfigError, RunConfig
from milbench.io import atomic_write, file_sha256
from milbench.models.base import NO_FEATURES, BagViews, has_capability
from milbench.models.registry import Tag
from milbench.saved import (
    CHECKSUMS,
    EXTRACTORS,
    RECORD,
    SavedModelError,
    extractor_weights_name,
    load_saved_model,
    model_folder,
)

log = logging.getLogger(__name__)

# Extractor settings that decide the features (a model trained on one cannot read another's).
COMPARED_SETTINGS = ("kind", "name", "input_size", "segmentation", "background", "latent",
                     "normalize")
EXTRACTOR_FIELDS = ("kind", "name", "weights", "input_size", "segmentation", "background", "stain",
                    "latent", "epochs", "train_batch_size", "learning_rate")


@dataclass
class PredictOutcome:
    out: Path
    predictions: pd.DataFrame
    submissions: dict[str, Path]
    seconds: float


def run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    saved["data"].pop("resolved_root", None)  # recorded beside the config, not part of it
    return RunConfig.model_validate(saved)


def saved_model_names(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "models").glob("*/model"))


def prediction_extractor(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The extractor of one recorded feature view, as it runs on new patients: the model's
    extractor with the recorded stain numbers and the weights it depends on (trained on the
    training cohort, or a pretrained file) from the run's extractors/."""
    extractor = dict(record["extractor"])
    resolved = record.get("resolved") or {}
    if resolved.get("stain"):
        extractor["stain"] = {k: resolved["stain"][k] for k in ("space", "mean", "std")}
    name = extractor_weights_name(resolved)
    if name is not None:
        weights = run_dir / EXTRACTORS / name
        if not weights.is_file():
            raise SavedModelError(f"{weights}: the weights of the {extractor.get('kind')} extractor "
                                  "this model reads were not saved with the run")
        listed = json.loads((run_dir / EXTRACTORS / CHECKSUMS).read_text(encoding="utf-8"))
        if listed.get(weights.name) != file_sha256(weights):
            raise SavedModelError(f"{weights}: damaged or changed since it was saved (checksum differs)")
        extractor["weights"] = str(weights)
    return {k: v for k, v in extractor.items() if k in EXTRACTOR_FIELDS}


def check_extractor(extractor: dict[str, Any], recorded: dict[str, Any], model: str) -> None:
    """Refuse an extractor whose feature-deciding settings differ from the recorded ones."""
    from preprocessing.extract import ExtractorConfig

    settings = ExtractorConfig.from_dict(extractor).to_dict()
    settings["latent"] = (ExtractorConfig.from_dict(extractor).resolved_latent
                          if settings["kind"] == "autoencoder" else settings.get("latent"))
    settings["normalize"] = "imagenet" if settings["kind"] == "backbone" else None
    for key in COMPARED_SETTINGS:
        if key in recorded and settings.get(key) != recorded[key]:
            raise SavedModelError(f"model {model}: extractor setting {key!r} is "
                                  f"{settings.get(key)!r} here, {recorded[key]!r} when the model "
                                  "was trained")


def predict_run(run_dir: str | Path, data_root: str | Path, models: list[str] | None = None,
                out: str | Path | None = None, progress: bool = True) -> PredictOutcome:
    """Predict the test patients of ``data_root`` with the saved models of ``run_dir`` (all, or
    ``models``); see the module docstring."""
    from milbench.data import load_challenge
    from milbench.preparation import image_path_bags
    from milbench.submit import write_submission
    from preprocessing.extract import extract_features

    started = time.perf_counter()
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    available = saved_model_names(run_dir)
    names = list(models) if models else available
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise SavedModelError(f"{run_dir}: no saved model {unknown or ''} (saved: "
                              f"{', '.join(available) or 'none'})")
    # Every check before any extraction: models, their records and their extractors.
    loaded, views = {}, {}
    for name in names:
        model = load_saved_model(run_dir, name)
        record = json.loads((model_folder(run_dir, name) / RECORD).read_text(encoding="utf-8"))
        for key, view in record["features"].items():
            if key != NO_FEATURES and view["extractor"] != NO_FEATURES and \
                    view["extractor"].get("kind") != "paths":
                extractor = prediction_extractor(view, run_dir)
                check_extractor(extractor, view.get("resolved") or {}, name)
                view = {**view, "prediction_extractor": extractor}
            views.setdefault(key, view)
        loaded[name] = (model, record)
    patients = load_challenge(Path(data_root), config.data.reference_date).test()
    if len(patients) == 0:
        raise ConfigError(f"{data_root}: no test patients (testset/) to predict")
    out = Path(out) if out is not None else (
        run_dir / "predictions" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    bags = {}
    for key, view in views.items():
        if key == NO_FEATURES or view["extractor"] == NO_FEATURES:
            bags[key] = [np.zeros((p.n_images, 0)) for p in patients.patients]
        elif view["extractor"].get("kind") == "paths":
            bags[key] = image_path_bags(patients)
        else:
            store = extract_features(patients, view["prediction_extractor"], out / "cache",
                                     seed=config.seed, progress=progress)
            bags[key] = store.bags(patients)
    clinical = patients.clinical_table()
    rows, instances, submissions = [], [], {}
    for name, (model, record) in loaded.items():
        default = next(key for key, view in record["features"].items() if view["default"])
        model_bags = (BagViews({key: bags[key] for key in record["features"]}, default)
                      if len(record["features"]) > 1 else bags[default])
        scores = model.predict_proba(model_bags, clinical)[:, 1]
        predicted = model.predict(model_bags, clinical)
        rows += [{"model": name, "patient_id": pid, "score": float(score), "predicted": int(label)}
                 for pid, score, label in zip(patients.ids, scores, predicted, strict=True)]
        if has_capability(model, Tag.INSTANCE_SCORES):
            for patient, values in zip(patients.patients, model.instance_scores(model_bags, clinical),
                                       strict=True):
                instances += [{"model": name, "patient_id": patient.id, "image": Path(path).name,
                               "score": float(value)}
                              for path, value in zip(patient.image_paths, values, strict=True)]
        submissions[name] = write_submission(
            dict(zip(patients.ids, predicted.tolist(), strict=True)), patients.ids,
            out / "submissions", f"{config.name}-{name}",
            provenance={"run_dir": str(run_dir.resolve()), "model": name,
                        "data_root": str(Path(data_root).resolve())})
    predictions = pd.DataFrame(rows, columns=["model", "patient_id", "score", "predicted"])
    atomic_write(out / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    if instances:
        table = pd.DataFrame(instances)
        atomic_write(out / "instance_scores.csv", lambda tmp: table.to_csv(tmp, index=False))
    return PredictOutcome(out, predictions, submissions, time.perf_counter() - started)

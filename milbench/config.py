"""Run configuration: a YAML file, overridden by ``--set key.sub=value`` flags, validated.

Unknown keys and wrong types are errors that name the key. The resolved config (with the seed
actually used) is what a run directory records.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milbench.execution import ExecutionConfig
from milbench.models.spec import ModelSpec, check_unique_labels

# The configs/ folder of a source checkout (editable install), for names given without a path.
PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticData(_Strict):
    preset: Literal["tiny", "small", "challenge", "realistic", "realistic_small"] = "realistic"
    seed: int = 0
    knobs: dict[str, Any] = Field(
        {}, description="overrides of the preset's generator knobs (milbench.synth.KNOBS)")

    @model_validator(mode="after")
    def _known_knobs(self) -> SyntheticData:
        from milbench.synth.presets import resolve_knobs

        resolve_knobs(self.preset, self.knobs)  # raises naming the knob
        return self


class DataConfig(_Strict):
    root: str | None = Field(None, description="challenge folder; null generates a synthetic cohort")
    synthetic: SyntheticData = SyntheticData()
    reference_date: date = date(2021, 1, 1)
    strict_images: bool = False


class FeaturesConfig(_Strict):
    extractor: str | dict[str, Any] = Field(
        "none", description="'none' (clinical models only), a name in configs/features/, a YAML path, "
        "or an inline extractor mapping; names and paths are resolved to the mapping on loading")
    source: str | None = Field(None, description="the file the extractor mapping was read from")
    batch_size: int = Field(32, ge=1)
    device: str = Field("cpu", description="torch device for extraction and autoencoder training")
    shards: int = Field(1, ge=1, description="forward-pass parts run as execution tasks (Ray GPU "
                        "workers), merged into one store")


class SourceConfig(_Strict):
    """An instance-labelled source set (ALL-IDB2 layout) for models that bootstrap from one."""

    root: str | None = Field(None, description="ALL-IDB2 root; null generates a synthetic set")
    seed: int = 0
    n_per_class: int = Field(130, ge=2)
    stain_space: Literal["rgb", "lab"] = "rgb"


class EvaluationConfig(_Strict):
    n_splits: int = Field(5, ge=2)
    n_repeats: int = Field(5, ge=1)
    stratify: list[Literal["gender", "age", "lymph_count"]] = ["gender", "age", "lymph_count"]
    age_threshold: float | None = None
    count_threshold: float | None = None
    baseline: str | None = Field(
        None, description="label of the model every other is compared with (comparisons.csv); "
        "null: the first clinical-only model")


class SubmissionConfig(_Strict):
    enabled: bool = True
    dir: str = "submissions"


class TrackingConfig(_Strict):
    """Optional MLflow logging of a finished run (``pip install milbench[mlflow]``)."""

    mlflow: bool = False
    tracking_uri: str | None = Field(
        None, description="an MLflow tracking URI or a local folder; null: a file store in <workdir>/mlruns")
    experiment: str | None = Field(None, description="MLflow experiment name; null: the config's name")

    @field_validator("tracking_uri", "experiment")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be null or a non-empty string")
        return value


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    workdir: str = ".milbench"
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    source: SourceConfig | None = None
    evaluation: EvaluationConfig = EvaluationConfig()
    models: list[ModelSpec] = Field(min_length=1)
    submission: SubmissionConfig = SubmissionConfig()
    tracking: TrackingConfig = TrackingConfig()
    execution: ExecutionConfig = ExecutionConfig()
    save_models: bool = Field(True, description="keep every refitted model in the run directory "
                              "(models/<name>/model/; milbench.saved), to reload and predict")
    tune: dict[str, dict[str, Any]] = Field(
        {}, description="search spaces of `milbench tune`: model label -> {parameter: range}")

    @field_validator("models")
    @classmethod
    def _unique_labels(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        return check_unique_labels(models, "models")

    @model_validator(mode="after")
    def _known_baseline(self) -> RunConfig:
        names = [m.display_name for m in self.models]
        if self.evaluation.baseline is not None and self.evaluation.baseline not in names:
            raise ValueError(f"evaluation.baseline {self.evaluation.baseline!r} is not one of the "
                             f"models {names}")
        return self

    @model_validator(mode="after")
    def _known_tuned_models(self) -> RunConfig:
        from milbench.core.search import check_space
        from milbench.models.spec import constructor_parameters

        entries = {m.display_name: m for m in self.models}
        for label, space in self.tune.items():
            if label not in entries:
                raise ValueError(f"tune.{label}: no model has the label {label!r} (models: "
                                 f"{list(entries)})")
            name = entries[label].name
            check_space(space, name, constructor_parameters(name), f"tune.{label}")
        return self


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` in place; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r} has an empty key part")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML ({error})") from None
    node = config
    for part in parts[:-1]:
        if isinstance(node, list):
            node = _list_item(node, part, assignment)
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    if isinstance(node, list):
        index = int(parts[-1]) if parts[-1].isdigit() else None
        if index is None or index >= len(node):
            raise ConfigError(f"override {assignment!r}: {parts[-1]!r} is not an index of the list")
        node[index] = value
    else:
        node[parts[-1]] = value


def _list_item(node: list, part: str, assignment: str):
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {assignment!r}: {part!r} is not an index of a {len(node)}-item list")
    return node[int(part)]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    config_dir = path.parent if path is not None else PACKAGE_CONFIGS
    _resolve_extractor(raw, config_dir)
    for index, entry in enumerate(raw.get("models") or []):
        _resolve_model_features(entry, config_dir, f"models.{index}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()
        ]
        raise ConfigError(f"{path or 'config'}: invalid config\n" + "\n".join(lines)) from None


def _resolve_extractor(raw: dict[str, Any], config_dir: Path) -> None:
    """Replace a named or file extractor by its mapping, so the run records the full settings."""
    features = raw.get("features")
    if not isinstance(features, dict):
        return
    extractor = features.get("extractor")
    if isinstance(extractor, str) and extractor != "none":
        features["extractor"], source = read_extractor(extractor, config_dir)
        features["source"] = str(source)


def _resolve_model_features(entry: Any, config_dir: Path, where: str) -> None:
    """Replace a model's (and its ensemble members') named or file ``features`` by the mapping;
    an unknown name fails here, naming the model and the key."""
    if not isinstance(entry, dict):
        return
    features = entry.get("features")
    if isinstance(features, str):
        label = entry.get("label") or entry.get("name")
        try:
            entry["features"], _ = read_extractor(features, config_dir)
        except ConfigError as error:
            raise ConfigError(f"{where}.features (model {label!r}): {error}") from None
    members = (entry.get("params") or {}).get("members") if isinstance(entry.get("params"), dict) else None
    if isinstance(members, list):
        for index, member in enumerate(members):
            _resolve_model_features(member, config_dir, f"{where}.params.members.{index}")


def read_extractor(name_or_path: str, config_dir: Path = PACKAGE_CONFIGS) -> tuple[dict[str, Any], Path]:
    """An extractor mapping from a YAML path or a name in ``configs/features/``, and its file."""
    candidates = [Path(name_or_path), config_dir / "features" / f"{name_or_path}.yaml",
                  PACKAGE_CONFIGS / "features" / f"{name_or_path}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        names = sorted(p.stem for p in (PACKAGE_CONFIGS / "features").glob("*.yaml"))
        raise ConfigError(f"extractor {name_or_path!r}: no such file, and not one of {names}")
    try:
        mapping = yaml.safe_load(found.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{found}: not valid YAML ({error})") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"{found}: an extractor config must be a mapping")
    return mapping, found


def resolved_dict(config: RunConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")

"""Models that learn from an instance-labelled source set (the semi-supervised model): the
source set's features, computed with each such model's extractor and stain-matched, attached
to its spec."""

from __future__ import annotations

from pathlib import Path

from milbench.config import ConfigError, RunConfig
from milbench.data_roots import resolve_source_root
from milbench.models import Tag, model_tags
from milbench.models.base import has_capability
from milbench.models.spec import ModelSpec, features_key
from milbench.preflight import PATHS, walk_models


def _full_mode(spec: ModelSpec) -> bool:
    """A model that fine-tunes a network on the source set's images (its ``source_root``)."""
    return has_capability(spec.build(), Tag.SOURCE_IMAGES)


def _needs_source(spec: ModelSpec) -> bool:
    """A model tagged ``source_set`` whose source parameter (``source_root`` in full mode, else
    ``source_features``: the tag's protocol) is still empty."""
    if Tag.SOURCE_SET not in model_tags(spec.name):
        return False
    if _full_mode(spec):
        return not spec.params.get("source_root")
    return not spec.params.get("source_features")


def attach_source_features(config: RunConfig, progress: bool = True) -> RunConfig:
    """Give every model that learns from an instance-labelled source set (tagged ``source_set``,
    its source parameter left empty; ensemble members too) the source's features,
    computed with that model's extractor. The model's cohort and source images are
    stain-matched to the source set (as in the seed report): its ``features`` become its extractor plus
    the source stain, which the resolved config records; other models keep theirs. Returns that
    config (``config`` itself when no model needs a source); ``config`` is left as it is."""
    needing = []
    walk_models(config, lambda spec, features, top: needing.append(spec) or spec)
    needing = [spec.display_name for spec in needing if _needs_source(spec)]
    if not needing:
        return config
    if config.source is None:
        raise ConfigError(f"models {needing} learn from an instance-labelled source set: add a "
                          "`source:` section (root: null generates a synthetic ALL-IDB2 set)")
    from milbench.semisup.source import prepare_source_features, source_stain

    root = resolve_source_root(config, progress)
    stain = source_stain(root, config.source.stain_space)
    paths: dict[str, str] = {}

    def visit(spec, features, top):
        if not _needs_source(spec):
            return spec
        if _full_mode(spec):  # it reads the source images and matches their stain itself
            return spec.model_copy(update={"params": {**spec.params, "source_root": str(root)}})
        if not isinstance(features, dict) or features.get("kind") == PATHS:
            raise ConfigError(f"model {spec.display_name!r} learns from a source set and needs "
                              "backbone features: set features.extractor or the model's features")
        stained = {**features, "stain": stain}
        key = features_key(stained)
        if key not in paths:
            paths[key] = str(prepare_source_features(
                root, stained, Path(config.workdir) / "cache", seed=config.seed, progress=progress))
        return spec.model_copy(update={"features": stained,
                                       "params": {**spec.params, "source_features": paths[key]}})
    return walk_models(config, visit)

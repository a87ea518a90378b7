"""Model registry: bag classifiers are created by name, so configs, the CLI and the tests never
need an ``if`` chain over model types.

The registry is a leaf: it maps each built-in name to the import path of its class and to its
capability tags, and imports a model's module only when that model is created (or its class is
asked for). So ``import milbench.models`` loads no model, no torch, and no ensemble; models and
ensembles never import each other through it. Adding a built-in model = one line in ``BUILTIN``;
other code (tests, plug-ins) registers a class directly with ``register_model``.

Tags (``Tag``) are the capabilities the pipeline reads:
``clinical`` needs the clinical table, ``clinical_optional`` uses it when given, ``instances``
reads instance feature vectors, ``ensemble`` combines member models (and needs what they need),
``selection`` wraps another model. Two more are outputs a fitted model offers, declared by its
class (``capabilities``) and read by the pipeline: ``instance_scores`` (a score per instance,
``instance_scores(bags, clinical=None)``) and ``bag_features`` (a table per bag,
``bag_features(bags)``, which ensembles feed to their meta-classifier).
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")


class Tag(str, Enum):
    CLINICAL = "clinical"
    CLINICAL_OPTIONAL = "clinical_optional"
    INSTANCES = "instances"
    ENSEMBLE = "ensemble"
    SELECTION = "selection"
    INSTANCE_SCORES = "instance_scores"
    BAG_FEATURES = "bag_features"


# name → ("module:Class", tags). The one list of built-in models.
BUILTIN: dict[str, tuple[str, tuple[Tag, ...]]] = {
    "clinical_logreg": ("milbench.models.clinical:ClinicalLogistic", (Tag.CLINICAL,)),
    "clinical_xgb": ("milbench.models.clinical:ClinicalXGBoost", (Tag.CLINICAL,)),
    "misvm": ("milbench.models.misvm:MISVM", (Tag.INSTANCES,)),
    "mi_svm": ("milbench.models.misvm:MiSVM", (Tag.INSTANCES,)),
    "meanpool_svm": ("milbench.models.misvm:MeanPoolSVM", (Tag.INSTANCES,)),
    "migraph": ("milbench.models.migraph:MIGraph", (Tag.INSTANCES,)),
    "mi_kernel": ("milbench.models.migraph:MIKernel", (Tag.INSTANCES,)),
    "mifv": ("milbench.models.mifv:MIFisherVector", (Tag.INSTANCES,)),
    "dmil": ("milbench.models.dmil:AttentionDMIL", (Tag.INSTANCES, Tag.CLINICAL_OPTIONAL)),
    "semisup": ("milbench.models.semisup:SemiSupervisedCNN", (Tag.INSTANCES, Tag.CLINICAL)),
    "cluster_emd": ("milbench.models.cluster_emd:ClusterEMDClassifier", (Tag.INSTANCES,)),
    "image_mil": ("milbench.models.image_mil:ImageMIL", (Tag.INSTANCES, Tag.CLINICAL_OPTIONAL)),
    "instance_cnn": ("milbench.models.instance_cnn:InstanceCNN",
                     (Tag.INSTANCES, Tag.CLINICAL_OPTIONAL)),
    "oneclass_svm": ("milbench.models.oneclass:OneClassMIL", (Tag.INSTANCES, Tag.CLINICAL_OPTIONAL)),
    "torchmil_abmil": ("milbench.models.peers:TorchmilABMIL", (Tag.INSTANCES,)),
    "inner_cv": ("milbench.models.selection:InnerCVSelection",
                 (Tag.SELECTION, Tag.CLINICAL_OPTIONAL)),
    "stacker": ("milbench.ensemble.stacker:ClinicalStacker", (Tag.ENSEMBLE, Tag.CLINICAL)),
    "voting": ("milbench.ensemble.voting:VotingEnsemble", (Tag.ENSEMBLE, Tag.CLINICAL)),
    "shrinkage": ("milbench.ensemble.shrinkage:ShrinkageEnsemble", (Tag.ENSEMBLE, Tag.CLINICAL)),
}

_REGISTRY: dict[str, str | Callable[..., Any]] = {name: path for name, (path, _) in BUILTIN.items()}
_TAGS: dict[str, frozenset[str]] = {name: frozenset(t.value for t in tags)
                                    for name, (_, tags) in BUILTIN.items()}


def register_model(name: str, *, tags: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Register a bag-model class (or factory) under ``name`` with capability ``tags``."""
    unknown = set(tags) - {t.value for t in Tag}
    if unknown:
        raise ValueError(f"unknown tags {sorted(unknown)}; tags are {[t.value for t in Tag]}")

    def decorate(factory: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory  # type: ignore[assignment]
        _TAGS[name] = frozenset(tags)
        return factory

    return decorate


def unregister_model(name: str) -> None:
    """Remove a model registered with :func:`register_model` (a plug-in's, a test's); the
    built-in models stay."""
    _check_name(name)
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in model and cannot be unregistered")
    del _REGISTRY[name], _TAGS[name]


def list_models(pattern: str = "*", tag: str | None = None) -> list[str]:
    """Sorted registered names matching a glob ``pattern`` and, if given, carrying ``tag``."""
    return sorted(
        name
        for name in _REGISTRY
        if fnmatch.fnmatch(name, pattern) and (tag is None or tag in _TAGS[name])
    )


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise KeyError(_unknown_model_message(name))


def model_tags(name: str) -> frozenset[str]:
    _check_name(name)
    return _TAGS[name]


def import_path(name: str) -> str | None:
    """``module:Class`` of a built-in model (None for one registered as a class)."""
    _check_name(name)
    target = _REGISTRY[name]
    return target if isinstance(target, str) else None


def model_class(name: str) -> Callable[..., Any]:
    """The class (or factory) registered as ``name``, importing its module on first use."""
    _check_name(name)
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _REGISTRY[name] = target
    return target


def create_model(name: str, **params: Any) -> Any:
    """Instantiate the registered model ``name`` with constructor parameters ``params``."""
    return model_class(name)(**params)


def _unknown_model_message(name: str) -> str:
    return f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY)) or 'none'}"

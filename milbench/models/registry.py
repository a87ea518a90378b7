"""Model registry: bag classifiers are created by name, so configs, the CLI and the tests never
need an ``if`` chain over model types.

The registry is a leaf: it maps each built-in name to the import path of its class and imports
a model's module only when that model is created (or its class is asked for). So
``import milbench.models`` loads no model, no torch, and no ensemble; models and ensembles never
import each other through it. Adding a built-in model = one line in ``BUILTIN``; other code
(tests, plug-ins) registers a class directly with ``register_model``.

What a model reads and offers is declared once, on its class: ``mil_tags``, a literal set of
``Tag`` members that ``BagClassifier.__sklearn_tags__`` exposes as scikit-learn tags (see
:func:`milbench.models.base.tags_of`). :func:`model_tags` answers by name without importing the
model, by reading that literal from the module's source.

The tags: ``clinical`` needs the clinical table, ``clinical_optional`` uses it when given,
``instances`` reads instance feature vectors, ``images`` reads them as pixels-store rows (the
end-to-end image models), ``source_set`` learns from an instance-labelled source set (its
features, or with ``source_images`` its images), ``ensemble`` combines member models (and needs
what they need), ``selection`` wraps another model it chooses. Outputs a fitted model offers:
``instance_scores`` (``instance_scores(bags, clinical=None)``), ``bag_features``
(``bag_features(bags)``, which ensembles feed to their meta-classifier) and ``fusion_gate``
(``fusion_gates(bags, clinical)``, each patient's weight on the image expert).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
from collections.abc import Callable
from enum import Enum
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


class Tag(str, Enum):
    CLINICAL = "clinical"
    CLINICAL_OPTIONAL = "clinical_optional"
    INSTANCES = "instances"
    IMAGES = "images"
    SOURCE_SET = "source_set"
    SOURCE_IMAGES = "source_images"
    ENSEMBLE = "ensemble"
    SELECTION = "selection"
    INSTANCE_SCORES = "instance_scores"
    BAG_FEATURES = "bag_features"
    FUSION_GATE = "fusion_gate"


# name → "module:Class". The one list of built-in models.
BUILTIN: dict[str, str] = {
    "clinical_logreg": "milbench.models.clinical:ClinicalLogistic",
    "clinical_xgb": "milbench.models.clinical:ClinicalXGBoost",
    "misvm": "milbench.models.misvm:MISVM",
    "mi_svm": "milbench.models.misvm:MiSVM",
    "meanpool_svm": "milbench.models.misvm:MeanPoolSVM",
    "migraph": "milbench.models.migraph:MIGraph",
    "mi_kernel": "milbench.models.migraph:MIKernel",
    "mifv": "milbench.models.mifv:MIFisherVector",
    "dmil": "milbench.models.dmil:AttentionDMIL",
    "semisup": "milbench.models.semisup:SemiSupervisedCNN",
    "cluster_emd": "milbench.models.cluster_emd:ClusterEMDClassifier",
    "image_mil": "milbench.models.image_mil:ImageMIL",
    "instance_cnn": "milbench.models.instance_cnn:InstanceCNN",
    "oneclass_svm": "milbench.models.oneclass:OneClassMIL",
    "sil": "milbench.models.propagation:PropagatedInstanceMIL",
    "torchmil_abmil": "milbench.models.peers:TorchmilABMIL",
    "inner_cv": "milbench.models.selection:InnerCVSelection",
    "stacker": "milbench.ensemble.stacker:ClinicalStacker",
    "voting": "milbench.ensemble.voting:VotingEnsemble",
    "shrinkage": "milbench.ensemble.shrinkage:ShrinkageEnsemble",
}

_REGISTRY: dict[str, str | Callable[..., Any]] = dict(BUILTIN)
_TAGS: dict[str, frozenset[Tag]] = {}  # read on first ask


def register_model(name: str) -> Callable[[T], T]:
    """Register a bag-model class under ``name``; its ``mil_tags`` say what it reads and offers."""

    def decorate(factory: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name]!r}")
        tags = getattr(factory, "mil_tags", frozenset())
        unknown = [tag for tag in tags if not isinstance(tag, Tag)]
        if unknown:
            raise ValueError(f"{name!r}: mil_tags holds {unknown}, not Tag members "
                             f"({', '.join(t.name for t in Tag)})")
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
    del _REGISTRY[name]
    _TAGS.pop(name, None)


def list_models(pattern: str = "*", tag: str | None = None) -> list[str]:
    """Sorted registered names matching a glob ``pattern`` and, if given, carrying ``tag``."""
    return sorted(
        name
        for name in _REGISTRY
        if fnmatch.fnmatch(name, pattern) and (tag is None or Tag(tag) in model_tags(name))
    )


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise KeyError(_unknown_model_message(name))


def model_tags(name: str) -> frozenset[Tag]:
    """The tags model ``name``'s class declares (``mil_tags``), read from its module's source
    where it is a literal (no import: checking a config loads no model), else from the class."""
    _check_name(name)
    if name not in _TAGS:
        target = _REGISTRY[name]
        declared = _declared_tags(target) if isinstance(target, str) else None
        _TAGS[name] = (declared if declared is not None
                       else frozenset(getattr(model_class(name), "mil_tags", frozenset())))
    return _TAGS[name]


@cache
def source_tree(module: str) -> ast.Module | None:
    """The parsed source of ``module`` without importing it (None where it has no ``.py``
    source): what the registry and the parameter reader learn about a model before loading it.
    Parsed once per module."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as handle:
        return ast.parse(handle.read())


def _declared_tags(path: str) -> frozenset[Tag] | None:
    """The ``mil_tags = frozenset({Tag.X, ...})`` literal in the body of class ``path``
    (``module:Class``), or None where the source does not hold one."""
    module, _, class_name = path.partition(":")
    tree = source_tree(module)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                target = (item.target if isinstance(item, ast.AnnAssign) else
                          item.targets[0] if isinstance(item, ast.Assign) else None)
                if isinstance(target, ast.Name) and target.id == "mil_tags" and item.value:
                    return _tag_literal(item.value)
    return None


def _tag_literal(node: ast.expr) -> frozenset[Tag] | None:
    """``frozenset({Tag.A, Tag.B})`` or ``frozenset()`` → the tags; anything else → None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "frozenset" and len(node.args) <= 1):
        return None
    if not node.args:
        return frozenset()
    members = node.args[0]
    if not isinstance(members, ast.Set | ast.List | ast.Tuple):
        return None
    tags = []
    for element in members.elts:
        if not (isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name)
                and element.value.id == "Tag" and element.attr in Tag.__members__):
            return None
        tags.append(Tag[element.attr])
    return frozenset(tags)


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

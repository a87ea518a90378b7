"""Model registry: bag classifiers are created by name, so configs, the CLI and the tests never
need an ``if`` chain over model types. Adding a model = decorating one class with ``register_model``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, Callable[..., Any]] = {}
_TAGS: dict[str, frozenset[str]] = {}


def register_model(name: str, *, tags: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Register a bag-model class (or factory) under ``name``.

    ``tags`` describe what the model consumes, e.g. ``"clinical"`` (reads the clinical table),
    ``"instances"`` (reads instance feature vectors), ``"images"`` (needs image bags).
    """

    def decorate(factory: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory  # type: ignore[assignment]
        _TAGS[name] = frozenset(tags)
        return factory

    return decorate


def _ensure_builtin_models_loaded() -> None:
    # Importing the package registers every built-in model exactly once.
    import milbench.models  # noqa: F401


def list_models(pattern: str = "*", tag: str | None = None) -> list[str]:
    """Sorted registered names matching a glob ``pattern`` and, if given, carrying ``tag``."""
    _ensure_builtin_models_loaded()
    return sorted(
        name
        for name in _REGISTRY
        if fnmatch.fnmatch(name, pattern) and (tag is None or tag in _TAGS[name])
    )


def model_tags(name: str) -> frozenset[str]:
    _ensure_builtin_models_loaded()
    if name not in _REGISTRY:
        raise KeyError(_unknown_model_message(name))
    return _TAGS[name]


def create_model(name: str, **params: Any) -> Any:
    """Instantiate the registered model ``name`` with constructor parameters ``params``."""
    _ensure_builtin_models_loaded()
    if name not in _REGISTRY:
        raise KeyError(_unknown_model_message(name))
    return _REGISTRY[name](**params)


def _unknown_model_message(name: str) -> str:
    return f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY)) or 'none'}"

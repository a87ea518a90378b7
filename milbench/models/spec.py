"""``ModelSpec``: the one way to name a model with parameters (a run's models, ensemble members,
``inner_cv``'s wrapped model, ablation variants).

A spec is checked when it is made: the name must be registered and every parameter must be one
of the model's constructor parameters. Built-in constructors are read from their source with
``ast``, so a misspelled parameter fails in milliseconds, naming the model, the key and the valid
keys, without importing torch or any model. Ensemble members and ``inner_cv``'s model (specs
too: a name or ``{name, params, label}``) and grid are checked the same way, recursively.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import inspect
import json
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from milbench.models.registry import (
    Tag,
    create_model,
    import_path,
    model_class,
    model_tags,
    source_tree,
)


class ModelSpec(BaseModel):
    """A registered model name, its constructor parameters and an optional display label."""

    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = {}
    label: str | None = Field(None, description="display name; defaults to the model name")
    features: str | dict[str, Any] | None = Field(
        None, description="the instance features this model reads, overriding the run's "
        "features.extractor: a name in configs/features/, a YAML path or an extractor mapping "
        "(resolved to the mapping when the config is loaded); ensemble members without their "
        "own read their ensemble's")

    @property
    def features_key(self) -> str | None:
        """The key of this model's own features (None: it reads its ensemble's or the run's)."""
        return None if self.features is None else features_key(self.features)

    @property
    def display_name(self) -> str:
        return self.label or self.name

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        """A bare registered name is a spec at the model's defaults, wherever a spec is read."""
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        check_params(self.name, self.params)
        return self

    @classmethod
    def coerce(cls, value: Any) -> ModelSpec:
        """A spec from a spec, a bare model name or a mapping ``{name, params, label}``."""
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError(f"a model must be a name or a mapping with 'name', got {value!r}")
        unknown = set(value) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"model {value.get('name')!r} has unknown keys {sorted(unknown)}; "
                             f"use {sorted(cls.model_fields)}")
        return cls(**value)

    @property
    def fixes_seed(self) -> bool:
        """The spec sets ``random_state`` itself: cross-validation keeps it instead of seeding
        each fold (every fold then starts from the same seed)."""
        return "random_state" in self.params

    @property
    def reads_instances(self) -> bool:
        """Whether the model, or a model it wraps (an ensemble's listed members, ``inner_cv``'s
        model), reads instance feature vectors."""
        if Tag.INSTANCES in model_tags(self.name):
            return True
        return any(spec.reads_instances for spec in self.wrapped)

    @property
    def wrapped(self) -> list[ModelSpec]:
        """The specs this model wraps: an ensemble's listed members, ``inner_cv``'s model (a
        spec too: a name or ``{name, params}``); none for other models."""
        tags = model_tags(self.name)
        if Tag.ENSEMBLE in tags and isinstance(self.params.get("members"), list | tuple):
            return [ModelSpec.coerce(member) for member in self.params["members"]]
        if Tag.SELECTION in tags:
            return [ModelSpec.coerce(self.params.get("model",
                                                     constructor_defaults(self.name).get("model")))]
        return []

    def build(self):
        """A new, unfitted model of this spec."""
        return create_model(self.name, **self.params)



def features_key(extractor: str | dict[str, Any]) -> str:
    """A short stable key of an extractor setting (its canonical JSON); equal settings, one key."""
    text = json.dumps(extractor, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_unique_labels(specs: list[ModelSpec], owner: str) -> list[ModelSpec]:
    """``specs`` when their display names are unique, else an error naming the repeats."""
    labels = [spec.display_name for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"{owner}: model names/labels must be unique, repeated: {repeated} "
                         "(set `label`)")
    return specs


def _literal(node: ast.expr | None) -> Any:
    try:
        return ast.literal_eval(node) if node is not None else inspect.Parameter.empty
    except ValueError:
        return inspect.Parameter.empty  # a default that is not a literal


def _init_arguments(tree: ast.Module, class_name: str) -> dict[str, Any] | None:
    """Parameter → default (``Parameter.empty`` when none or not a literal) of the class's
    ``__init__`` in a parsed module, following bases defined in the same module."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    node = classes.get(class_name)
    while node is not None:
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                positional = [*item.args.posonlyargs, *item.args.args]
                defaults = [None] * (len(positional) - len(item.args.defaults)) + item.args.defaults
                pairs = [*zip(positional, defaults, strict=True),
                         *zip(item.args.kwonlyargs, item.args.kw_defaults, strict=True)]
                return {a.arg: _literal(d) for a, d in pairs if a.arg != "self"}
        # Inherited constructor: follow the first base defined in the same module.
        bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
        node = classes[bases[0]] if bases else None
    return None


@cache
def constructor_defaults(name: str) -> dict[str, Any]:
    """Model ``name``'s constructor parameters and their defaults, read from source where
    possible (no import), else from the imported class."""
    path = import_path(name)
    if path is not None:
        module, _, class_name = path.partition(":")
        tree = source_tree(module)
        arguments = None if tree is None else _init_arguments(tree, class_name)
        if arguments is not None:
            return arguments
    signature = inspect.signature(model_class(name).__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.name != "self"}


def constructor_parameters(name: str) -> tuple[str, ...]:
    """The constructor parameters of model ``name``."""
    return tuple(constructor_defaults(name))


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise naming model, key and valid keys when ``params`` does not fit model ``name``;
    members of ensembles and the model of ``inner_cv`` are checked too."""
    try:
        model_tags(name)
    except KeyError as error:  # a config error, naming the registered models
        raise ValueError(error.args[0]) from None
    valid = constructor_parameters(name)
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model {name!r}: unknown parameter {key!r}{hint}; valid parameters: "
                             f"{', '.join(valid)}")
    if params.get("pool_params"):  # the zoo aggregations' own keys (imports torch: only then)
        from milbench.models.bag_network import check_pool_params

        try:
            check_pool_params(params.get("aggregation", constructor_defaults(name).get("aggregation")),
                              params["pool_params"])
        except ValueError as error:
            raise ValueError(f"model {name!r}: {error}") from None
    tags = model_tags(name)
    members = params.get("members")
    if Tag.ENSEMBLE in tags and isinstance(members, list | tuple):
        check_unique_labels([ModelSpec.coerce(member) for member in members],
                            f"model {name!r}'s members")
    if Tag.SELECTION in tags and "model" in params:
        wrapped = ModelSpec.coerce(params["model"]).name  # checks its own parameters
        grid = params.get("grid") or {}
        for candidate in grid if isinstance(grid, list) else [grid]:
            check_params(wrapped, {key: None for key in candidate})
        if params.get("space") is not None:
            from milbench.core.search import check_space

            check_space(params["space"], wrapped, constructor_parameters(wrapped),
                        f"model {name!r}: space")


def walk_spec(spec: ModelSpec, inherited, visit, top: ModelSpec) -> ModelSpec:
    """Visit every model of ``spec`` with the features it reads (its own, else ``inherited``):
    ``visit(spec, features, top)`` returns the spec to keep. Ensembles' listed members are
    walked too, and rewritten when a visit changed one."""
    features = spec.features if spec.features is not None else inherited
    members = spec.params.get("members")
    if Tag.ENSEMBLE in model_tags(spec.name) and isinstance(members, list | tuple):
        coerced = [ModelSpec.coerce(m) for m in members]
        walked = [walk_spec(m, features, visit, top) for m in coerced]
        if walked != coerced:
            spec = spec.model_copy(update={"params": {**spec.params, "members": [
                m.model_dump(exclude_defaults=True) for m in walked]}})
    return visit(spec, features, top)

"""Member handling shared by the stacker and the voting ensemble.

Members are given as model names or ``{"name": ..., "params": {...}, "label": optional}``
mappings (``ModelSpec`` in plain data), so that ensembles stay plain-data constructor arguments
(clone and configs work unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from milbench.models.base import NO_FEATURES, BagViews, has_capability, with_seed
from milbench.models.registry import Tag, model_tags
from milbench.models.reuse import fit_model
from milbench.models.spec import ModelSpec, check_unique_labels


def member_label(member: str | dict[str, Any] | ModelSpec) -> str:
    return ModelSpec.coerce(member).display_name


def check_members(members) -> list[ModelSpec]:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    checked = []
    for index, member in enumerate(members):
        try:
            checked.append(ModelSpec.coerce(member))
        except ValueError as error:
            raise ValueError(f"member {index}: {error}") from None
    return check_unique_labels(checked, "members")


def member_bags(member: ModelSpec, bags):
    """The bags ``member`` reads. Where the ensemble got several feature views
    (:class:`~milbench.models.base.BagViews`), a member with its own ``features`` reads that
    view and one without reads the ensemble's default; an ensemble member keeps every view."""
    if not isinstance(bags, BagViews):
        return bags
    if Tag.ENSEMBLE in model_tags(member.name):
        return bags.rebased(member.features_key)
    if not member.reads_instances:  # zero-width bags: its fits match its standalone ones
        return bags.view(NO_FEATURES)
    return bags.view(member.features_key)


def fit_member(member: ModelSpec, random_state: int | None, bags, y, clinical):
    """A member fitted on its bags (shared with an identical earlier fit inside a pipeline run);
    ``random_state`` None leaves the member's own."""
    model = member.build()
    if random_state is not None:
        model = with_seed(model, random_state)
    return fit_model(model, member_bags(member, bags), y, clinical)


def member_outputs(member: ModelSpec, model, bags, clinical) -> pd.DataFrame:
    """A member's patient-level outputs: its tumoral probability and, where the model has them,
    its bag features (positive-instance rate, counts, distances ...), prefixed by its label."""
    label, bags = member.display_name, member_bags(member, bags)
    columns = {f"{label}:proba": model.predict_proba(bags, clinical)[:, 1]}
    if has_capability(model, Tag.BAG_FEATURES):
        features = pd.DataFrame(model.bag_features(bags)).reset_index(drop=True)
        for name in features.columns:
            columns[f"{label}:{name}"] = np.asarray(features[name], dtype=float)
    return pd.DataFrame(columns)


def is_selection(members) -> bool:
    """Whether ``members`` asks for the best k of the run's models (``{"best": k}``) instead of
    naming them."""
    return isinstance(members, dict)


def check_selection(selection: dict[str, Any], metrics: tuple[str, ...]) -> tuple[int, str]:
    """``(k, metric)`` of a ``{"best": k, "by": metric}`` selection; k defaults to 5 and the
    metric to balanced accuracy."""
    unknown = set(selection) - {"best", "by"}
    if unknown:
        raise ValueError(f"members selection has unknown keys {sorted(unknown)}; use best and by")
    best, by = selection.get("best", 5), selection.get("by", "balanced_accuracy")
    if isinstance(best, bool) or not isinstance(best, int) or best < 1:
        raise ValueError(f"members: best must be a positive integer, got {best!r}")
    if by not in metrics:
        raise ValueError(f"members: by must be one of {list(metrics)}, got {by!r}")
    return best, by


def select_best(candidates: list[tuple[dict[str, Any], float]], k: int) -> list[dict[str, Any]]:
    """The ``k`` member specs with the highest CV score; ties keep the candidates' order."""
    def order(i: int) -> tuple[float, int]:
        score = candidates[i][1]
        return (-score if np.isfinite(score) else np.inf, i)

    ranked = sorted(range(len(candidates)), key=order)
    return [candidates[i][0] for i in ranked[:k]]

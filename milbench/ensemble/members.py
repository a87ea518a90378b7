"""Member handling shared by the stacker and the voting ensemble.

Members are given as ``{"name": registered model name, "params": {...}, "label": optional}``
so that ensembles stay plain-data constructor arguments (clone and configs work unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from milbench.models.registry import create_model
from milbench.models.reuse import fit_model


def member_label(member: dict[str, Any]) -> str:
    return member.get("label") or member["name"]


def check_members(members) -> list[dict[str, Any]]:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    checked = []
    for index, member in enumerate(members):
        if isinstance(member, str):
            member = {"name": member}
        if not isinstance(member, dict) or "name" not in member:
            raise ValueError(f"member {index} must be a model name or a mapping with 'name'")
        unknown = set(member) - {"name", "params", "label"}
        if unknown:
            raise ValueError(f"member {index} has unknown keys {sorted(unknown)}")
        checked.append(member)
    labels = [member_label(m) for m in checked]
    if len(set(labels)) != len(labels):
        raise ValueError(f"member labels must be unique, got {labels}")
    return checked


def build_member(member: dict[str, Any], random_state: int | None):
    model = create_model(member["name"], **member.get("params", {}))
    if random_state is not None and "random_state" in model.get_params():
        model.set_params(random_state=random_state)
    return model


def fit_member(member: dict[str, Any], random_state: int | None, bags, y, clinical):
    """A member fitted on ``bags`` (shared with an identical earlier fit inside a pipeline run)."""
    return fit_model(build_member(member, random_state), bags, y, clinical)


def member_outputs(label: str, model, bags, clinical) -> pd.DataFrame:
    """A member's patient-level outputs: its tumoral probability and, where the model has them,
    its bag features (positive-instance rate, counts, distances ...), prefixed by its label."""
    columns = {f"{label}:proba": model.predict_proba(bags, clinical)[:, 1]}
    if hasattr(model, "bag_features"):
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

"""Member handling shared by the stacker and the voting ensemble.

Members are given as ``{"name": registered model name, "params": {...}, "label": optional}``
so that ensembles stay plain-data constructor arguments (clone and configs work unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from milbench.models.registry import create_model


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


def member_outputs(label: str, model, bags, clinical) -> pd.DataFrame:
    """A member's patient-level outputs: its tumoral probability and, where the model has them,
    its bag features (positive-instance rate, counts, distances ...), prefixed by its label."""
    columns = {f"{label}:proba": model.predict_proba(bags, clinical)[:, 1]}
    if hasattr(model, "bag_features"):
        features = pd.DataFrame(model.bag_features(bags)).reset_index(drop=True)
        for name in features.columns:
            columns[f"{label}:{name}"] = np.asarray(features[name], dtype=float)
    return pd.DataFrame(columns)

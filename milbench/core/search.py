"""Parameter ranges for guided searches (``inner_cv`` with ``search: optuna``, ``milbench tune``).

A space maps a model parameter to its range:

- ``{low: 1e-4, high: 1e-1, log: true}``: a float (``log`` samples on a log scale);
- ``{low: 8, high: 64, step: 8}``: an integer, when ``low`` and ``high`` are both integers;
- ``[relu, gelu]``: one of the listed values (None, booleans, numbers or strings).

Names are checked against the model's constructor and ranges for shape before any training.
Optuna is imported only where a search runs.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

RANGE_KEYS = {"low", "high", "log", "step"}
CHOICE_TYPES = (type(None), bool, int, float, str)


def check_space(space: Any, model: str, known: Collection[str], where: str) -> dict[str, Any]:
    """``space`` over ``model``'s parameters ``known``, or a ValueError naming ``where`` and
    the key."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{where}: a search space is a non-empty mapping of parameter to range, "
                         f"got {space!r}")
    for name, spec in space.items():
        key = f"{where}.{name}"
        if name not in known:
            raise ValueError(f"{key}: {model!r} has no parameter {name!r} (it has {sorted(known)})")
        if isinstance(spec, list):
            if not spec or not all(isinstance(value, CHOICE_TYPES) for value in spec):
                raise ValueError(f"{key}: choices must be a non-empty list of None, booleans, "
                                 f"numbers or strings, got {spec!r}")
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
            raise ValueError(f"{key}: a range is {{low, high}} with optional log and step, or a "
                             f"list of choices; got {spec!r}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"{key}: low and high must be numbers, got {low!r} and {high!r}")
        if not low < high:
            raise ValueError(f"{key}: low ({low}) must be below high ({high})")
        if spec.get("log") and low <= 0:
            raise ValueError(f"{key}: a log range needs low > 0, got {low}")
    return space


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """One point of ``space`` drawn by an Optuna trial."""
    point = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            point[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            point[name] = trial.suggest_int(name, spec["low"], spec["high"],
                                            step=spec.get("step", 1), log=bool(spec.get("log")))
        else:
            point[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                              step=spec.get("step"), log=bool(spec.get("log")))
    return point


def sampler(name: str, seed: int | None, n_startup_trials: int = 10):
    """Optuna's TPE or Gaussian-process sampler, seeded."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    raise ValueError(f"sampler must be 'tpe' or 'gp', got {name!r}")

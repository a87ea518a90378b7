"""Reuse of fitted bag models inside one pipeline run.

A run fits the same model on the same patients more than once: an ensemble's members in an
outer fold are exactly the members cross-validated on that fold (same parameters, same fold
seed), and the final refit of an ensemble repeats its members' final refits. Every model is
deterministic for a given ``random_state``, so such a fit is done once and shared.

Reuse is switched on only inside ``with reusing_fits():`` (``run_pipeline`` does), so a
long-lived process does not hoard fitted models. A fit is identified by the model's class and
parameters (``random_state`` included) and the content of its training bags, labels and
clinical table; bags are hashed once per array object.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import joblib
import numpy as np

log = logging.getLogger(__name__)


class FitReuse:
    def __init__(self) -> None:
        self.models: dict[str, object] = {}
        self.hits = 0
        # id(array) → (array, digest); the array is kept so that its id is not reused.
        self._digests: dict[int, tuple[np.ndarray, str]] = {}

    def _bag_digest(self, bag: np.ndarray) -> str:
        known = self._digests.get(id(bag))
        if known is None or known[0] is not bag:
            known = (bag, joblib.hash(np.asarray(bag)))
            self._digests[id(bag)] = known
        return known[1]

    def key(self, model, bags, y, clinical) -> str:
        return joblib.hash((
            type(model).__module__, type(model).__qualname__, model.get_params(deep=False),
            [self._bag_digest(bag) for bag in bags], np.asarray(y),
            clinical,
        ))


_active: FitReuse | None = None


@contextlib.contextmanager
def reusing_fits() -> Iterator[FitReuse]:
    """Within this block, ``fit_model`` returns an earlier identical fit instead of refitting."""
    global _active
    outer, _active = _active, FitReuse()
    try:
        yield _active
    finally:
        if _active.hits:
            log.info("reused %d fitted models (%d distinct fits)", _active.hits, len(_active.models))
        _active = outer


def fit_model(model, bags, y, clinical=None):
    """``model.fit(bags, y, clinical)``, or, inside ``reusing_fits``, the fitted model of an
    identical earlier fit (the same object: treat fitted models as read-only)."""
    if _active is None:
        return model.fit(bags, y, clinical)
    key = _active.key(model, bags, y, clinical)
    fitted = _active.models.get(key)
    if fitted is not None:
        _active.hits += 1
        return fitted
    fitted = model.fit(bags, y, clinical)
    _active.models[key] = fitted
    return fitted

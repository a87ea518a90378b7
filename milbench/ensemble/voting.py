"""Voting ensemble over named bag models.

``soft``: the (weighted) mean of the members' tumoral probabilities, thresholded at 0.5.
``hard``: each member votes with its own ``predict``; ``predict_proba`` is the (weighted) share of
tumoral votes. Tie rule (an exact 50 % vote share, possible with an even number of members or
with weights): the soft average decides, and an exact 0.5 there too goes to tumoral (1), the
majority class of the challenge.

``seeds`` > 1 ensembles over seeds too: each member is fitted that many times, copy k seeded
``random_state + k`` (0 + k without a random_state), and a member's output is the mean over its
copies (its soft probability, or its share of tumoral votes) before the members are weighed.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted

from milbench.ensemble.members import check_members, fit_member, member_bags
from milbench.models.base import BagClassifier, store_params
from milbench.models.registry import Tag


class VotingEnsemble(BagClassifier):

    mil_tags = frozenset({Tag.ENSEMBLE, Tag.CLINICAL})

    def __init__(self, members=("clinical_logreg",), voting: str = "soft", weights=None,
                 seeds: int = 1, random_state=None):
        store_params(self, locals())

    def _weights(self, n: int) -> np.ndarray:
        if self.weights is None:
            return np.full(n, 1.0 / n)
        weights = np.asarray(self.weights, dtype=float)
        if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, "
                             f"got {self.weights}")
        return weights / weights.sum()

    def _validate_params(self) -> None:
        if self.voting not in ("soft", "hard"):
            raise ValueError(f"voting must be 'soft' or 'hard', got {self.voting!r}")
        self._weights(len(check_members(self.members)))
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {self.seeds!r}")

    def _check_fit_bags(self, bags):
        return bags  # passed on unchanged: each member checks its own (and fits stay shareable)

    def _copy_seeds(self) -> list[int | None]:
        if self.seeds == 1:
            return [self.random_state]  # None leaves each member its own seed
        return [(self.random_state or 0) + copy for copy in range(self.seeds)]

    def _fit(self, bags, labels, clinical) -> None:
        members = check_members(self.members)
        # Member-major: member i's copies are members_[i * seeds:(i + 1) * seeds].
        self.members_ = [fit_member(m, seed, bags, labels, clinical)
                         for m in members for seed in self._copy_seeds()]

    def _fitted_members(self, bags):
        """(fitted copy, the bags it reads) per member copy, member-major."""
        specs = [spec for spec in check_members(self.members) for _ in range(self.seeds)]
        return [(model, member_bags(spec, bags))
                for spec, model in zip(specs, self.members_, strict=True)]

    def _per_member(self, columns: list[np.ndarray]) -> np.ndarray:
        """(bags, members): each member's mean over its copies."""
        return np.column_stack(columns).reshape(len(columns[0]), -1, self.seeds).mean(axis=2)

    def _member_probabilities(self, bags, clinical) -> np.ndarray:
        return self._per_member([model.predict_proba(own, clinical)[:, 1]
                                 for model, own in self._fitted_members(bags)])

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        weights = self._weights(len(self.members))
        if self.voting == "soft":
            tumoral = self._member_probabilities(bags, clinical) @ weights
        else:
            votes = self._per_member([model.predict(own, clinical)
                                      for model, own in self._fitted_members(bags)])
            tumoral = votes @ weights
        return np.column_stack([1 - tumoral, tumoral])

    def predict(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        share = self.predict_proba(bags, clinical)[:, 1]
        if self.voting == "soft":
            return (share >= 0.5).astype(int)
        soft = self._member_probabilities(bags, clinical) @ self._weights(len(self.members))
        tie = np.isclose(share, 0.5)
        soft_tumoral = (soft > 0.5) | np.isclose(soft, 0.5)
        return np.where(tie, soft_tumoral, share > 0.5).astype(int)

"""How many pseudo-labelled images each iteration adds.

The seed added 2 positive + 2 negative images per iteration for the first 5 iterations, then
5 + 5, for 23 iterations: 100 + 100 images in all. The early steps are small because the
source-only model is least trustworthy on cohort images at the start.
"""

from __future__ import annotations

from collections.abc import Sequence


def make_schedule(n_iterations: int = 23, early_iterations: int = 5, early_per_iteration: int = 2,
                  late_per_iteration: int = 5) -> list[int]:
    """Images of each class to add per iteration (the seed's default: 5 x 2 then 18 x 5)."""
    for name, value, minimum in (("n_iterations", n_iterations, 0),
                                 ("early_iterations", early_iterations, 0),
                                 ("early_per_iteration", early_per_iteration, 1),
                                 ("late_per_iteration", late_per_iteration, 1)):
        if int(value) != value or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return [int(early_per_iteration) if i < early_iterations else int(late_per_iteration)
            for i in range(int(n_iterations))]


def check_schedule(schedule: Sequence[int]) -> list[int]:
    """A schedule given as a list: positive integers, one per iteration."""
    steps = list(schedule)
    bad = [s for s in steps if isinstance(s, bool) or int(s) != s or s < 1]
    if bad:
        raise ValueError(f"schedule entries must be positive integers, got {bad[:5]}")
    return [int(s) for s in steps]

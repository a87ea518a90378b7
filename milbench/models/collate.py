"""Padding bags of different sizes into one batch with a mask (torchmil-style collate).

Bag models that train on real batches pad every bag to the largest one in the batch; the mask
says which rows are instances, so padded rows can be kept out of every aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_bags(
    bags: Sequence[np.ndarray], fill_value: float = 0.0, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Stack bags into ``(n_bags, max_size, d)`` with a boolean ``(n_bags, max_size)`` mask.

    ``mask[i, j]`` is True where row ``j`` of bag ``i`` is a real instance.
    """
    if len(bags) == 0:
        raise ValueError("no bags to pad")
    width = bags[0].shape[1]
    sizes = np.array([len(bag) for bag in bags])
    padded = np.full((len(bags), int(sizes.max()), width), fill_value, dtype=dtype)
    mask = np.zeros((len(bags), int(sizes.max())), dtype=bool)
    for index, bag in enumerate(bags):
        padded[index, : len(bag)] = bag
        mask[index, : len(bag)] = True
    return padded, mask


def stack_instances(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All instances in one ``(n_instances, d)`` array plus the bag index of each row."""
    instances = np.concatenate(bags, axis=0)
    bag_index = np.repeat(np.arange(len(bags)), [len(bag) for bag in bags])
    return instances, bag_index


def split_by_bag(values: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Inverse of :func:`stack_instances` for per-instance values."""
    return np.split(np.asarray(values), np.cumsum(sizes)[:-1])

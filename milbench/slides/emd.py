"""Earth Mover's Distance between point clouds (POT) and cluster-to-class assignment (scipy).

Distances are Euclidean (Wasserstein-1), so EMD is in the units of the latent space and the
EMD of a single point to a cloud is simply its mean distance to the cloud.
"""

from __future__ import annotations

import math

import numpy as np
import ot
from scipy.optimize import linear_sum_assignment

ASSIGNMENT_METHODS = ("hungarian", "nearest")


def emd(source: np.ndarray, target: np.ndarray) -> float:
    """Exact EMD between two uniformly weighted clouds ``(m, d)`` and ``(r, d)``."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(
            f"clouds must be 2-D with equal widths, got {source.shape} and {target.shape}"
        )
    if len(source) == 0 or len(target) == 0:
        raise ValueError("EMD needs two non-empty clouds")
    cost = ot.dist(source, target, metric="euclidean")
    weights_source = np.full(len(source), 1.0 / len(source))
    weights_target = np.full(len(target), 1.0 / len(target))
    return float(ot.emd2(weights_source, weights_target, cost))


def mean_point_distances(points: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
    """``(n, n_classes)``: each point's EMD as a singleton to each reference cloud."""
    return np.column_stack(
        [ot.dist(points, reference, metric="euclidean").mean(axis=1) for reference in references]
    )


def assign_clusters(costs: np.ndarray, method: str = "hungarian") -> np.ndarray:
    """One class per cluster from a ``(n_clusters, n_classes)`` EMD cost matrix.

    ``"nearest"``: every cluster takes its minimum-EMD class (clusters may share a class).
    ``"hungarian"``: scipy's ``linear_sum_assignment``. With no more clusters than classes it is
    one-to-one, as in the thesis: distinct clusters of one slide are taken to be distinct
    classes. With more clusters than classes, each class column is replicated
    ``ceil(n_clusters / n_classes)`` times, so every cluster still gets a class and no class
    takes more than that many clusters (the one-to-one idea, relaxed only as far as needed).
    """
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 2:
        raise ValueError(f"cost matrix must be 2-D, got shape {costs.shape}")
    n_clusters, n_classes = costs.shape
    if n_clusters == 0:
        return np.zeros(0, dtype=int)
    if n_classes == 0:
        raise ValueError("no classes to assign clusters to")
    if method == "nearest":
        return np.argmin(costs, axis=1).astype(int)
    if method != "hungarian":
        raise ValueError(f"assignment must be one of {ASSIGNMENT_METHODS}, got {method!r}")
    copies = math.ceil(n_clusters / n_classes)
    rows, columns = linear_sum_assignment(np.tile(costs, (1, copies)))
    assigned = np.empty(n_clusters, dtype=int)
    assigned[rows] = columns % n_classes
    return assigned

"""The pseudo-labelling loop, written once for both modes.

A *trainer* turns training items and labels into an instance model; the loop never looks inside
the items, so the same selection code drives ``head`` mode (items are backbone feature vectors)
and ``full`` mode (items are image paths and the whole network is fine-tuned):

1. Split the source set into balanced train / validation parts (200 / 60 in the seed) and train
   on the source part; the trainer records validation accuracy per epoch.
2. Each iteration, predict every not-yet-added image of every tumoral training patient, add the
   ``n`` most confident predicted-positive ones (P(1) >= 0.5, highest first) with label 1, and as
   many images of reactive training patients with label 0, choosing the most confidently
   negative ones (lowest P(1)): reactive patients have no tumoral cells, so any of their images
   is a correct negative, and the confident ones are the least likely to be mislabelled
   segmentation debris or atypical-looking reactive cells. Then retrain.
3. Final phase: drop the source images and train a fresh model on the pseudo-labelled cohort
   images only.

An item is identified by its candidate index (the model maps it to a (bag, instance) pair) and
is never added twice. When fewer images are available than the schedule asks for (small
cohorts, or few predicted positives), the loop takes what there is and logs the shortfall.
Only the labels it is given (training patients' bag labels) are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class InstanceModel(Protocol):
    """What a trainer returns: P(label 1) per item, and validation accuracy per epoch."""

    val_accuracy: list[float]

    def predict_positive(self, items: np.ndarray) -> np.ndarray: ...


# train(items, labels, val_items | None, val_labels | None, previous model | None, seed) -> model
Trainer = Callable[[np.ndarray, np.ndarray, Any, Any, Any, int], InstanceModel]


@dataclass
class PseudoLabelResult:
    """The final instance model and what each iteration did.

    ``log`` has one dict per iteration: ``iteration``, ``requested`` (images per class the
    schedule asked for), ``positives`` / ``negatives`` (candidate indices added),
    ``positive_confidence`` (their P(1)) / ``negative_confidence`` (their 1 - P(1)),
    ``available_positive`` (predicted-positive tumoral images not yet added),
    ``available_negative`` (reactive images not yet added), ``short`` (fewer added than asked)
    and ``val_accuracy`` (the source validation accuracy per epoch of the retrained model).
    """

    final_model: InstanceModel
    log: list[dict]
    added: np.ndarray  # candidate indices in the order they were added
    added_labels: np.ndarray
    source_train: np.ndarray  # indices into the source set
    source_val: np.ndarray
    initial_val_accuracy: list[float]
    final_includes_source: bool = False
    notes: list[str] = field(default_factory=list)


def balanced_source_split(labels: np.ndarray, val_size: int, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices with ``val_size // 2`` validation images of each class.

    Each class keeps at least one training image, so a tiny source set shrinks the validation
    part instead of failing.
    """
    labels = np.asarray(labels)
    if val_size < 0:
        raise ValueError(f"source_val_size must be >= 0, got {val_size}")
    train, val = [], []
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(val_size // 2, len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _most_confident(scores: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` indices with the highest scores; ties broken by index, so the order is stable."""
    order = np.lexsort((indices, -scores))
    return order[:n]


def run_pseudo_labelling(
    train: Trainer,
    source_items: np.ndarray,
    source_labels: np.ndarray,
    candidates: np.ndarray,
    candidate_bag_labels: np.ndarray,
    schedule: Sequence[int],
    *,
    source_val_size: int = 60,
    seed: int = 0,
    warm_start: bool = True,
    on_iteration: Callable[[dict], None] | None = None,
) -> PseudoLabelResult:
    """Run the loop (module docstring). ``candidates`` are the training patients' images (rows of
    a feature matrix or paths); ``candidate_bag_labels`` their patient's label (1 tumoral)."""
    source_labels = np.asarray(source_labels, dtype=int)
    bag_labels = np.asarray(candidate_bag_labels, dtype=int)
    if len(candidates) != len(bag_labels):
        raise ValueError(f"{len(candidates)} candidates but {len(bag_labels)} candidate labels")
    if len(source_items) != len(source_labels):
        raise ValueError(f"{len(source_items)} source items but {len(source_labels)} labels")
    rng = np.random.default_rng(seed)
    # One seed per training run, drawn up front so a run's seed does not depend on data sizes.
    train_seeds = iter(rng.integers(0, 2**31 - 1, size=len(schedule) + 2).tolist())
    source_train, source_val = balanced_source_split(source_labels, source_val_size, rng)
    val_items = source_items[source_val] if len(source_val) else None
    val_labels = source_labels[source_val] if len(source_val) else None
    base_items, base_labels = source_items[source_train], source_labels[source_train]

    model = train(base_items, base_labels, val_items, val_labels, None, next(train_seeds))
    initial_val_accuracy = list(model.val_accuracy)
    added = np.zeros(len(candidates), dtype=bool)
    added_order: list[int] = []
    added_labels: list[int] = []
    log: list[dict] = []
    tumoral = np.flatnonzero(bag_labels == 1)
    reactive = np.flatnonzero(bag_labels == 0)
    for iteration, requested in enumerate(schedule):
        remaining_t = tumoral[~added[tumoral]]
        remaining_r = reactive[~added[reactive]]
        p_tumoral = model.predict_positive(candidates[remaining_t]) if len(remaining_t) else np.zeros(0)
        positive = p_tumoral >= 0.5
        pool_t, pool_p = remaining_t[positive], p_tumoral[positive]
        chosen_t = _most_confident(pool_p, pool_t, int(requested))
        n_chosen = len(chosen_t)
        p_reactive = (model.predict_positive(candidates[remaining_r]) if len(remaining_r) and n_chosen
                      else np.zeros(0))
        chosen_r = _most_confident(1.0 - p_reactive, remaining_r[: len(p_reactive)], n_chosen)
        positives, negatives = pool_t[chosen_t], remaining_r[chosen_r]
        if len(negatives) < len(positives):
            # Keep the classes balanced: drop the least confident positives.
            positives = positives[: len(negatives)]
            chosen_t = chosen_t[: len(negatives)]
        added[positives] = True
        added[negatives] = True
        added_order.extend(positives.tolist() + negatives.tolist())
        added_labels.extend([1] * len(positives) + [0] * len(negatives))
        entry = {
            "iteration": iteration,
            "requested": int(requested),
            "positives": positives.tolist(),
            "positive_confidence": pool_p[chosen_t].tolist(),
            "negatives": negatives.tolist(),
            "negative_confidence": (1.0 - p_reactive[chosen_r]).tolist(),
            "available_positive": int(positive.sum()),
            "available_negative": int(len(remaining_r)),
            "short": bool(len(positives) < requested),
        }
        seed_now = next(train_seeds)
        if len(positives):
            order = np.asarray(added_order)
            items = np.concatenate([base_items, candidates[order]])
            labels = np.concatenate([base_labels, np.asarray(added_labels)])
            model = train(items, labels, val_items, val_labels, model if warm_start else None,
                          seed_now)
            entry["val_accuracy"] = list(model.val_accuracy)
        else:
            # Nothing new to learn from: the model (and its next prediction) stays the same.
            entry["val_accuracy"] = []
        log.append(entry)
        if on_iteration is not None:
            on_iteration(entry)

    order = np.asarray(added_order, dtype=int)
    labels = np.asarray(added_labels, dtype=int)
    notes = []
    final_includes_source = len(np.unique(labels)) < 2
    if final_includes_source:
        # A final model needs both classes; with no pseudo-labels at all (no image was ever
        # predicted positive) only the source set can provide them.
        notes.append("no pseudo-labelled pair was added; the final model is trained on the "
                     "source set")
        items, labels_final = base_items, base_labels
    else:
        items, labels_final = candidates[order], labels
    final_model = train(items, labels_final, None, None, None, next(train_seeds))
    return PseudoLabelResult(final_model, log, order, labels, source_train, source_val,
                             initial_val_accuracy, final_includes_source, notes)

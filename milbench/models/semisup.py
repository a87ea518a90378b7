"""Semi-supervised instance CNN: pseudo-labelled cell classifier → cell counts → XGBoost.

An instance classifier is trained on an instance-labelled source set (ALL-IDB2 layout), then
grown by iterative pseudo-labelling of the training patients' images
(:mod:`milbench.semisup.loop`); a final model trained on the pseudo-labelled cohort images alone
counts each patient's cells predicted 0 and 1, and ``[count 0, count 1, lymphocyte count, age]``
goes to XGBoost (or LightGBM) for the patient prediction. Only the labels passed to ``fit`` (the
training fold's) are read.

Two modes share the selection logic:

- ``head`` (default, CPU): bags are backbone feature vectors from the feature store, the
  backbone is frozen and only a linear head is retrained. ``source_features`` is the ``.npz``
  written by :func:`milbench.semisup.source.prepare_source_features` with the same extractor
  config (stain-matched to the source set) as the cohort features.
- ``full`` (GPU): bags are sequences of image paths; the whole network named by ``backbone`` is
  fine-tuned each iteration on images stain-matched to ``source_root``'s per-channel mean/std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from milbench.models.base import BagClassifier, check_bags, check_clinical, store_params
from milbench.models.boosting import BOOSTERS, boosted_trees, positive_weight
from milbench.models.registry import Tag
from milbench.semisup.counts import count_matrix, predicted_counts
from milbench.semisup.loop import run_pseudo_labelling
from milbench.semisup.schedule import make_schedule

MODES = ("head", "full")


def check_path_bags(bags) -> list[np.ndarray]:
    """Bags of image paths (``full`` mode): non-empty sequences of strings or path-likes."""
    checked = []
    for index, bag in enumerate(bags):
        if isinstance(bag, str | os.PathLike) or not isinstance(bag, Sequence | np.ndarray):
            raise TypeError(f"bag {index}: full mode takes bags as sequences of image paths")
        if not all(isinstance(p, str | os.PathLike) for p in bag):
            raise TypeError(f"bag {index}: full mode takes bags of image paths, not feature vectors")
        paths = np.array([os.fspath(p) for p in bag], dtype=str)
        if len(paths) == 0:
            raise ValueError(f"bag {index} has no instances")
        checked.append(paths)
    if not checked:
        raise ValueError("no bags given")
    return checked


class SemiSupervisedCNN(BagClassifier):
    """Pseudo-labelling instance classifier with a count-matrix patient classifier.

    Schedule: ``early_per_iteration`` images of each class per iteration for the first
    ``early_iterations`` iterations, then ``late_per_iteration``, ``n_iterations`` in all (the
    seed: 2, 5 iterations, then 5; 23 iterations; 100 + 100 images). ``epochs`` is per
    (re)training; ``warm_start`` continues from the previous iteration's weights as the seed's
    fine-tuning did (the final model always starts fresh).
    """

    mil_tags = frozenset({Tag.INSTANCES, Tag.CLINICAL, Tag.SOURCE_SET, Tag.INSTANCE_SCORES,
                          Tag.BAG_FEATURES})


    def __init__(
        self,
        mode: str = "head",
        source_features: str | None = None,
        source_root: str | None = None,
        backbone: str = "vgg19",
        weights: str | None = None,
        input_size: int = 224,
        stain_space: str = "rgb",
        n_iterations: int = 23,
        early_iterations: int = 5,
        early_per_iteration: int = 2,
        late_per_iteration: int = 5,
        source_val_size: int = 60,
        epochs: int = 20,
        learning_rate: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        batch_size: int = 32,
        warm_start: bool = True,
        meta: str = "xgboost",
        meta_n_estimators: int = 100,
        meta_max_depth: int = 3,
        meta_learning_rate: float = 0.1,
        balance_classes: bool = True,
        device: str = "cpu",
        random_state=None,
    ):
        store_params(self, locals())

    # ------------------------------------------------------------------ helpers

    def _validate_params(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.meta not in BOOSTERS:
            raise ValueError(f"meta must be one of {BOOSTERS}, got {self.meta!r}")
        if self.mode == "head" and self.source_features is None:
            raise ValueError("head mode needs source_features: the .npz written by "
                             "milbench.semisup.prepare_source_features")
        if self.mode == "full" and self.source_root is None:
            raise ValueError("full mode needs source_root: an ALL-IDB2-layout folder")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _check_instances(self, bags) -> list[np.ndarray]:
        return check_bags(bags) if self.mode == "head" else check_path_bags(bags)

    def _head_setup(self, bags: list[np.ndarray]):
        from milbench.semisup.source import read_source_features
        from milbench.semisup.trainers import HeadTrainer

        source_x, source_y = read_source_features(self.source_features)
        if source_x.shape[1] != bags[0].shape[1]:
            raise ValueError(f"source features {self.source_features} have {source_x.shape[1]} "
                             f"dimensions, the bags {bags[0].shape[1]}: extract both with the "
                             "same extractor config")
        # Standardise with statistics of the source and the training images together (no labels
        # involved): SGD on raw 4096-d backbone activations is badly conditioned.
        pooled = np.concatenate([source_x, *bags])
        mean = pooled.mean(0)
        scale = pooled.std(0)
        scale[scale < 1e-8] = 1.0
        trainer = HeadTrainer(mean, scale, epochs=int(self.epochs),
                              learning_rate=self.learning_rate, momentum=self.momentum,
                              weight_decay=self.weight_decay, batch_size=int(self.batch_size))
        return trainer, source_x, source_y

    def _instance_tags(self) -> frozenset[Tag]:
        # Full mode fine-tunes on the source set's images, not on its features.
        return frozenset({Tag.SOURCE_IMAGES}) if self.mode == "full" else frozenset()

    def _full_setup(self):
        from milbench.semisup.source import load_source, source_image_dir
        from milbench.semisup.trainers import FullTrainer
        from preprocessing.preprocess import Preprocessor
        from preprocessing.stain import reference_for

        source = load_source(self.source_root)
        stain = reference_for(str(source_image_dir(self.source_root)), space=self.stain_space)
        preprocessor = Preprocessor(int(self.input_size), None, 0, stain, "imagenet")
        trainer = FullTrainer(self.backbone, self.weights, preprocessor, epochs=int(self.epochs),
                              learning_rate=self.learning_rate, momentum=self.momentum,
                              weight_decay=self.weight_decay, batch_size=int(self.batch_size),
                              device=self.device)
        return trainer, np.array([str(p) for p in source.paths]), source.labels

    def _make_meta(self, labels: np.ndarray):
        return boosted_trees(
            self.meta, n_estimators=self.meta_n_estimators, learning_rate=self.meta_learning_rate,
            max_depth=self.meta_max_depth,
            scale_pos_weight=positive_weight(labels) if self.balance_classes else 1.0,
            random_state=self._seed())

    # ------------------------------------------------------------------ contract

    def _check_fit_bags(self, bags):
        return self._check_instances(bags)  # feature vectors (head) or image paths (full)

    def _fit(self, bags, labels, clinical) -> None:
        clinical_array = check_clinical(clinical, len(labels))
        schedule = make_schedule(self.n_iterations, self.early_iterations,
                                 self.early_per_iteration, self.late_per_iteration)
        if self.mode == "head":
            trainer, source_items, source_labels = self._head_setup(bags)
        else:
            trainer, source_items, source_labels = self._full_setup()
        bag_index = np.concatenate([np.full(len(b), i) for i, b in enumerate(bags)])
        instance_index = np.concatenate([np.arange(len(b)) for b in bags])
        candidates = np.concatenate(bags)
        result = run_pseudo_labelling(
            trainer, source_items, source_labels, candidates, labels[bag_index], schedule,
            source_val_size=int(self.source_val_size), seed=self._seed(),
            warm_start=bool(self.warm_start))
        final = result.final_model
        self.instance_model_ = final.plain() if hasattr(final, "plain") else final
        self.schedule_ = schedule
        self.source_val_accuracy_ = [result.initial_val_accuracy] + [
            entry["val_accuracy"] for entry in result.log]
        self.pseudo_label_log_ = [self._with_pairs(entry, bag_index, instance_index)
                                  for entry in result.log]
        self.pseudo_labelled_ = pd.DataFrame({
            "bag": bag_index[result.added], "instance": instance_index[result.added],
            "label": result.added_labels})
        self.final_includes_source_ = result.final_includes_source
        self.notes_ = result.notes
        probabilities = self._instance_probabilities(bags, cache=getattr(trainer, "cache", None))
        design = count_matrix(predicted_counts(probabilities), clinical_array)
        self.meta_ = self._make_meta(labels).fit(design, labels)

    @staticmethod
    def _with_pairs(entry: dict, bag_index: np.ndarray, instance_index: np.ndarray) -> dict:
        """The loop's candidate indices as (bag, instance) pairs of the bags given to ``fit``."""
        out = {k: v for k, v in entry.items() if k not in {"positives", "negatives"}}
        for key in ("positives", "negatives"):
            chosen = np.asarray(entry[key], dtype=int)
            out[key] = [(int(b), int(i)) for b, i in zip(bag_index[chosen], instance_index[chosen],
                                                         strict=True)]
        return out

    def _instance_probabilities(self, bags: list[np.ndarray], cache=None) -> list[np.ndarray]:
        if not bags:
            return []
        sizes = np.cumsum([len(b) for b in bags])[:-1]
        items = np.concatenate(bags)
        if self.mode == "full" and cache is not None:
            scores = self.instance_model_.predict_positive(items, cache)
        else:
            scores = self.instance_model_.predict_positive(items)
        return np.split(scores, sizes)

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """Per-instance probability of being a tumoral cell under the final instance model."""
        check_is_fitted(self)
        return self._instance_probabilities(self._check_instances(bags))

    def bag_features(self, bags) -> pd.DataFrame:
        """``count_0``, ``count_1`` and ``positive_rate`` per bag (stacker inputs)."""
        check_is_fitted(self)
        counts = predicted_counts(self.instance_scores(bags))
        return pd.DataFrame({"count_0": counts[:, 0], "count_1": counts[:, 1],
                             "positive_rate": counts[:, 1] / counts.sum(1)})

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        check_is_fitted(self)
        bags = self._check_instances(bags)
        clinical_array = check_clinical(clinical, len(bags))
        design = count_matrix(predicted_counts(self._instance_probabilities(bags)), clinical_array)
        return self.meta_.predict_proba(design)

    def decision_function(self, bags, clinical=None) -> np.ndarray:
        return self.predict_proba(bags, clinical)[:, 1]

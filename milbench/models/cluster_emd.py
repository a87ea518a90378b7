"""Cluster/EMD bag model: the slide classifier of ``milbench.slides`` as a lymphocytosis bag model.

A patient is a slide. Fitted on the training bags:

0. With ``pca_components``, a scaler + PCA fitted on the training instances first (wide
   autoencoder or backbone vectors make stages 1-2 slow: on 130 challenge-size bags of 1024-d
   vectors the instance logistic regression alone takes about 18 s).
1. Instance classifier (the "CNN head" on precomputed feature vectors): a logistic regression
   or small MLP on the instances, each instance carrying its patient's label.
2. A VAE on the instance vectors; references = latent vectors of the training instances of
   reactive (0) and of tumoral (1) patients (a seeded sample of at most ``max_reference``).
3. Per bag: DBSCAN in latent space with a grid or Bayesian search of ``eps``/``min_samples``,
   cluster-to-reference EMD, one class per cluster, noise keeps the instance classifier's
   label, disagreement cutoff (see ``milbench.slides.clustering``).
4. Bag features (``bag_features``): fraction of instances in clusters assigned tumoral, final
   tumoral fraction, the whole bag's EMD to each reference, noise fraction, cluster count,
   mean instance probability. A standardised, class-balanced logistic regression on the
   method's own features (the two fractions and the two EMDs) gives the bag probability.

Optimism: a training bag's own instances sit in the references and trained the head and VAE,
so its in-sample features look better than a new patient's. With ``oof_folds >= 2`` the
logistic regression is therefore fitted on out-of-fold bag features (stages 1-3 refitted
without that fold); it falls back to in-sample features when a class has fewer than
``MIN_BAGS_PER_CLASS_PER_FOLD`` bags per fold: stages fitted on a handful of bags give
out-of-fold features too noisy to learn the bag mapping from (tiny data). Stages 1-3 are
finally refitted on all bags for prediction.

Analysing a bag (step 3) is the costly part (about 0.2 s per challenge-size bag, every
training bag once per fit); ``n_jobs`` spreads it over processes. Results do not depend on it.

Instances are sorted canonically (lexicographically) inside each bag before clustering, so
DBSCAN's order-dependence for border points cannot make results depend on instance order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from milbench.models.base import (
    BagClassifier,
    out_of_fold,
    store_params,
    take_bags,
)
from milbench.models.registry import Tag
from milbench.slides.clustering import SlideClusterer
from milbench.slides.emd import ASSIGNMENT_METHODS, emd
from milbench.slides.vae import VAEModel, fit_vae
from preprocessing.transforms import BagTransform

BAG_FEATURES = (
    "tumoral_cluster_fraction",
    "tumoral_fraction",
    "emd_reactive",
    "emd_tumoral",
    "noise_fraction",
    "n_clusters",
    "mean_instance_probability",
)
# The bag probability uses the method's own outputs; the rest are offered to the stacker.
MODEL_FEATURES = ("tumoral_cluster_fraction", "tumoral_fraction", "emd_reactive", "emd_tumoral")
HEADS = ("logreg", "mlp")
SEARCHES = ("grid", "bayes", "tpe")  # bayes: Optuna's GP sampler; tpe: its TPE sampler


MIN_BAGS_PER_CLASS_PER_FOLD = 4

@dataclass
class _InstanceStage:
    transform: BagTransform | None
    head: Pipeline
    vae: VAEModel
    clusterer: SlideClusterer


@dataclass
class _BagAnalysis:
    features: dict[str, float]
    instance_labels: np.ndarray  # final class per instance, in the bag's original order


class ClusterEMDClassifier(BagClassifier):
    """DBSCAN + EMD slide classifier over instance feature vectors (see module docstring).

    ``random_state=None`` behaves as seed 0: results are always reproducible.
    """

    mil_tags = frozenset({Tag.INSTANCES, Tag.INSTANCE_SCORES, Tag.BAG_FEATURES})


    def __init__(
        self,
        head: str = "logreg",
        head_C: float = 1.0,
        latent_dim: int = 16,
        hidden_dims: tuple[int, ...] = (64,),
        dropout: float = 0.2,
        vae_epochs: int = 60,
        search: str = "grid",
        bayes_random: int = 10,
        bayes_guided: int = 10,
        assignment: str = "nearest",
        disagreement_cutoff: int | None = 25,
        max_reference: int = 300,
        oof_folds: int = 3,
        pca_components: int | None = None,
        C: float = 1.0,
        n_jobs: int | None = None,
        random_state: int | None = None,
    ):
        store_params(self, locals())

    def _seed(self) -> int:
        return 0 if self.random_state is None else int(self.random_state)

    def _validate_params(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.assignment not in ASSIGNMENT_METHODS:
            raise ValueError(
                f"assignment must be one of {ASSIGNMENT_METHODS}, got {self.assignment!r}"
            )
        if int(self.latent_dim) < 1 or int(self.max_reference) < 1:
            raise ValueError("latent_dim and max_reference must be positive")
        if self.pca_components is not None and int(self.pca_components) < 1:
            raise ValueError(f"pca_components must be None or >= 1, got {self.pca_components}")

    def _fit(self, bags, labels, clinical) -> None:
        """Fit instance stages and the bag-level logistic regression; ``clinical`` is ignored."""
        seed = self._seed()
        folds = int(self.oof_folds)
        if folds >= 2 and np.bincount(labels).min() >= MIN_BAGS_PER_CLASS_PER_FOLD * folds:
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)

            def held_out_features(fold, train, held_out):
                stage = self._fit_stage(take_bags(bags, train), labels[train], seed + 1 + fold)
                return self._features_frame(stage, [bags[i] for i in held_out])

            features = out_of_fold(splitter.split(np.zeros(len(labels)), labels), held_out_features)
            self.oof_used_ = True
        else:
            features = None
            self.oof_used_ = False
        self.stage_ = self._fit_stage(bags, labels, seed)
        if features is None:
            features = self._features_frame(self.stage_, bags)
        self.estimator_ = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=self.C, class_weight="balanced", random_state=seed),
        ).fit(features.loc[:, list(MODEL_FEATURES)].to_numpy(dtype=float), labels)

    def _fit_stage(self, bags: list[np.ndarray], labels: np.ndarray, seed: int) -> _InstanceStage:
        transform = None
        if self.pca_components is not None:
            transform = BagTransform(n_components=int(self.pca_components), random_state=0)
            bags = transform.fit_transform(bags)
        instances = np.vstack(bags)
        instance_labels = np.repeat(labels, [len(b) for b in bags])
        if self.head == "logreg":
            classifier = LogisticRegression(
                C=self.head_C, class_weight="balanced", max_iter=1000, random_state=seed
            )
        else:
            classifier = MLPClassifier(
                hidden_layer_sizes=(32,), alpha=1.0 / self.head_C, max_iter=300, random_state=seed
            )
        head = make_pipeline(StandardScaler(), classifier).fit(instances, instance_labels)
        vae = fit_vae(
            instances,
            latent_dim=int(self.latent_dim),
            hidden_dims=tuple(self.hidden_dims),
            dropout=self.dropout,
            epochs=int(self.vae_epochs),
            seed=seed,
        )
        latent = vae.encode(instances)
        rng = np.random.default_rng(seed)
        references = []
        for cls in (0, 1):
            rows = np.flatnonzero(instance_labels == cls)
            if len(rows) > self.max_reference:  # EMD cost grows with the reference size
                rows = np.sort(rng.choice(rows, size=int(self.max_reference), replace=False))
            references.append(latent[rows])
        clusterer = SlideClusterer(
            references,
            assignment=self.assignment,
            disagreement_cutoff=self.disagreement_cutoff,
            bayes_random=int(self.bayes_random),
            bayes_guided=int(self.bayes_guided),
            random_state=seed,
        )
        return _InstanceStage(transform=transform, head=head, vae=vae, clusterer=clusterer)

    def _analyse(self, stage: _InstanceStage, bag: np.ndarray) -> _BagAnalysis:
        order = np.lexsort(bag.T[::-1])  # canonical instance order: see module docstring
        ordered = bag[order]
        if stage.transform is not None:
            ordered = stage.transform.transform([ordered])[0]
        latent = stage.vae.encode(ordered)
        probability = stage.head.predict_proba(ordered)[:, 1]
        classifier_labels = (probability >= 0.5).astype(int)
        result = stage.clusterer.classify(latent, classifier_labels, search=self.search)
        clustered = result.clusters >= 0
        tumoral_clusters = [c for c, cls in result.cluster_classes.items() if cls == 1]
        references = stage.clusterer.references
        features = {
            "tumoral_cluster_fraction": float(np.isin(result.clusters, tumoral_clusters).mean()),
            "tumoral_fraction": float(result.labels.mean()),
            "emd_reactive": emd(latent, references[0]),
            "emd_tumoral": emd(latent, references[1]),
            "noise_fraction": float((~clustered).mean()),
            "n_clusters": float(len(result.cluster_classes)),
            "mean_instance_probability": float(probability.mean()),
        }
        instance_labels = np.empty(len(bag), dtype=float)
        instance_labels[order] = result.labels
        return _BagAnalysis(features=features, instance_labels=instance_labels)

    def _analyse_all(self, stage: _InstanceStage, bags: list[np.ndarray]) -> list[_BagAnalysis]:
        if len(bags) < 2 or effective_n_jobs(self.n_jobs) == 1:
            return [self._analyse(stage, bag) for bag in bags]
        return Parallel(n_jobs=self.n_jobs)(delayed(self._analyse)(stage, bag) for bag in bags)

    def _features_frame(self, stage: _InstanceStage, bags: list[np.ndarray]) -> pd.DataFrame:
        rows = [analysis.features for analysis in self._analyse_all(stage, bags)]
        return pd.DataFrame(rows, columns=list(BAG_FEATURES), dtype=float)

    def bag_features(self, bags) -> pd.DataFrame:
        """One row per bag, columns ``BAG_FEATURES`` (for the stacker)."""
        bags = self._check_predict_bags(bags)
        return self._features_frame(self.stage_, bags)

    def decision_function(self, bags, clinical=None) -> np.ndarray:
        features = self.bag_features(bags).loc[:, list(MODEL_FEATURES)].to_numpy(dtype=float)
        return self.estimator_.decision_function(features)

    def predict_proba(self, bags, clinical=None) -> np.ndarray:
        features = self.bag_features(bags).loc[:, list(MODEL_FEATURES)].to_numpy(dtype=float)
        return self.estimator_.predict_proba(features)

    def instance_scores(self, bags, clinical=None) -> list[np.ndarray]:
        """Per instance: 1.0 if it ends in a tumoral cluster (or, as noise or after the
        disagreement fallback, the instance classifier calls it tumoral), else 0.0."""
        bags = self._check_predict_bags(bags)
        return [analysis.instance_labels for analysis in self._analyse_all(self.stage_, bags)]

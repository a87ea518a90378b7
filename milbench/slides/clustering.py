"""Per-slide DBSCAN in latent space, its parameter search, and EMD-based cluster labelling.

For one slide (``n`` latent vectors plus the instance classifier's labels):

1. DBSCAN with ``eps`` and ``min_samples``. ``eps`` is searched as a quantile level of the
   slide's own pairwise distances, so one search range fits every latent scale and slide size.
2. Each cluster's EMD to every class reference cloud; one class per whole cluster
   (``assign_clusters``); noise points keep the classifier's label. With ``min_votes`` set,
   clusters may only take classes the classifier predicts on at least that many images of
   the slide (off by default: it made no measurable difference on the digit slides).
3. Objective (minimised by the search): the size-weighted total EMD of the slide's groups to
   their assigned references, ``(sum_k |C_k| EMD(C_k, R_a(k)) + sum_c |N_c| EMD(N_c, R_c)) / n``,
   where ``N_c`` are the noise points the classifier calls ``c``. Noise must cost something,
   or "everything is noise" would score zero; charging it as clouds grouped by the
   classifier's label makes "no clusters" score exactly the classifier's own labelling, so a
   configuration wins only by explaining the slide better than the classifier does. (Charging
   noise points one by one, as singletons, was tried first: a singleton's EMD includes the
   whole spread of the reference, so that variant pushed the search towards large, mixed
   clusters and lost about 4 points of accuracy on distorted digit slides.)
4. Disagreement cutoff: if the proposal differs from the classifier on more than
   ``disagreement_cutoff`` images, the slide keeps the classifier's labels.

Searches: a grid of 20 configurations; Bayesian optimisation on Optuna, with its Gaussian-process
sampler (``bayes``) or its TPE sampler (``tpe``), 10 random then 10 guided evaluations; and
"optimal with hindsight", which picks the grid configuration with the fewest errors against the
true labels (analysis only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import pdist
from sklearn.cluster import DBSCAN

from milbench.core.search import sampler as optuna_sampler
from milbench.slides.emd import assign_clusters, emd, mean_point_distances

SEARCH_MODES = ("grid", "bayes", "tpe", "optimal")
DEFAULT_EPS_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.45)
DEFAULT_MIN_SAMPLES = (2, 3, 5, 8)


@dataclass
class Evaluation:
    """One DBSCAN configuration on one slide."""

    eps_quantile: float
    min_samples: int
    eps: float
    clusters: np.ndarray  # DBSCAN labels, -1 = noise
    proposed: np.ndarray  # class per image before the disagreement cutoff
    objective: float


@dataclass
class SlideResult:
    """Outcome of classifying one slide."""

    labels: np.ndarray  # final class per image
    proposed: np.ndarray  # class per image from the clusters, before the cutoff
    clusters: np.ndarray  # DBSCAN labels of the chosen configuration (-1 = noise)
    cluster_classes: dict[int, int]  # DBSCAN cluster id -> assigned class
    eps: float
    eps_quantile: float
    min_samples: int
    objective: float
    fell_back: bool  # True when the cutoff restored the classifier's labels
    n_evaluations: int
    history: list[Evaluation] = field(default_factory=list, repr=False)


def _candidate_classes(labels: np.ndarray, n_classes: int, min_votes: int | None) -> np.ndarray:
    """Classes a cluster may take: all, or those the classifier predicts on at least
    ``min_votes`` images of the slide (every predicted class if none reaches it)."""
    if min_votes is None or len(labels) == 0:
        return np.arange(n_classes)
    votes = np.bincount(labels, minlength=n_classes)
    chosen = np.flatnonzero(votes >= min_votes)
    return chosen if len(chosen) else np.flatnonzero(votes > 0)


class _Slide:
    """Per-slide caches shared by every configuration the search tries."""

    def __init__(
        self,
        latent: np.ndarray,
        classifier_labels: np.ndarray,
        references,
        assignment: str,
        min_votes: int | None,
    ):
        self.latent = latent
        self.classifier_labels = classifier_labels
        self.references = references
        self.assignment = assignment
        self.candidates = _candidate_classes(classifier_labels, len(references), min_votes)
        distances = pdist(latent) if len(latent) > 1 else np.zeros(0)
        positive = distances[distances > 0]
        self.distances = positive if len(positive) else np.array([1e-6])
        self.point_costs = mean_point_distances(latent, references)
        self._cluster_costs: dict[tuple[int, ...], np.ndarray] = {}

    def eps_at(self, quantile: float) -> float:
        return float(np.quantile(self.distances, quantile))

    def cluster_costs(self, members: np.ndarray) -> np.ndarray:
        # Many configurations produce the same clusters; EMD is the expensive step, so cache it.
        key = tuple(members.tolist())
        if key not in self._cluster_costs:
            if len(members) == 1:
                self._cluster_costs[key] = self.point_costs[members[0]]
            else:
                cloud = self.latent[members]
                self._cluster_costs[key] = np.array([emd(cloud, ref) for ref in self.references])
        return self._cluster_costs[key]

    def evaluate(self, eps_quantile: float, min_samples: int) -> Evaluation:
        eps = self.eps_at(eps_quantile)
        clusters = DBSCAN(eps=eps, min_samples=int(min_samples)).fit_predict(self.latent)
        proposed = self.classifier_labels.copy()
        cluster_ids = [c for c in np.unique(clusters) if c >= 0]
        members = [np.flatnonzero(clusters == c) for c in cluster_ids]
        total = 0.0
        # Noise points are charged as clouds grouped by their classifier label, on the same
        # footing as clusters (see the module docstring).
        for cls in np.unique(self.classifier_labels[clusters < 0]):
            index = np.flatnonzero((clusters < 0) & (self.classifier_labels == cls))
            total += len(index) * self.cluster_costs(index)[cls]
        if cluster_ids:
            costs = np.vstack([self.cluster_costs(m) for m in members])[:, self.candidates]
            assigned = assign_clusters(costs, self.assignment)
            for row, (index, column) in enumerate(zip(members, assigned, strict=True)):
                proposed[index] = self.candidates[column]
                total += len(index) * costs[row, column]
        return Evaluation(
            eps_quantile=float(eps_quantile),
            min_samples=int(min_samples),
            eps=eps,
            clusters=clusters,
            proposed=proposed,
            objective=total / len(self.latent),
        )


class SlideClusterer:
    """Classify all images of one slide together (DBSCAN + EMD assignment + cutoff).

    ``references``: one ``(r_c, d)`` latent cloud per class (index = class label), e.g. the
    latent vectors of the training instances of that class.
    """

    def __init__(
        self,
        references: Sequence[np.ndarray],
        *,
        assignment: str = "hungarian",
        disagreement_cutoff: int | None = 25,
        min_votes: int | None = None,
        eps_quantiles: Sequence[float] = DEFAULT_EPS_QUANTILES,
        min_samples_grid: Sequence[int] = DEFAULT_MIN_SAMPLES,
        bayes_random: int = 10,
        bayes_guided: int = 10,
        eps_quantile_range: tuple[float, float] = (0.02, 0.5),
        min_samples_range: tuple[int, int] = (2, 10),
        random_state: int = 0,
    ):
        self.references = [np.asarray(r, dtype=np.float64) for r in references]
        if not self.references or any(r.ndim != 2 or len(r) == 0 for r in self.references):
            raise ValueError("references must be a non-empty list of non-empty 2-D clouds")
        self.assignment = assignment
        self.disagreement_cutoff = disagreement_cutoff
        self.min_votes = min_votes
        self.eps_quantiles = tuple(eps_quantiles)
        self.min_samples_grid = tuple(min_samples_grid)
        self.bayes_random = bayes_random
        self.bayes_guided = bayes_guided
        self.eps_quantile_range = eps_quantile_range
        self.min_samples_range = min_samples_range
        self.random_state = random_state

    @property
    def grid(self) -> list[tuple[float, int]]:
        return [(q, m) for q in self.eps_quantiles for m in self.min_samples_grid]

    def _prepare(self, latent, classifier_labels) -> _Slide:
        latent = np.asarray(latent, dtype=np.float64)
        labels = np.asarray(classifier_labels).astype(int)
        if latent.ndim != 2 or latent.shape[0] != labels.shape[0]:
            raise ValueError(f"latent {latent.shape} and labels {labels.shape} do not match")
        if latent.shape[1] != self.references[0].shape[1]:
            raise ValueError(
                f"latent width {latent.shape[1]} != reference width {self.references[0].shape[1]}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.references)):
            raise ValueError(f"classifier labels must lie in 0..{len(self.references) - 1}")
        return _Slide(latent, labels, self.references, self.assignment, self.min_votes)

    def _finish(self, slide: _Slide, best: Evaluation, history: list[Evaluation]) -> SlideResult:
        disagreements = int((best.proposed != slide.classifier_labels).sum())
        fell_back = (
            self.disagreement_cutoff is not None and disagreements > self.disagreement_cutoff
        )
        labels = slide.classifier_labels.copy() if fell_back else best.proposed.copy()
        cluster_classes = {
            int(c): int(best.proposed[np.flatnonzero(best.clusters == c)[0]])
            for c in np.unique(best.clusters)
            if c >= 0
        }
        return SlideResult(
            labels=labels,
            proposed=best.proposed,
            clusters=best.clusters,
            cluster_classes=cluster_classes,
            eps=best.eps,
            eps_quantile=best.eps_quantile,
            min_samples=best.min_samples,
            objective=best.objective,
            fell_back=fell_back,
            n_evaluations=len(history),
            history=history,
        )

    def classify(self, latent, classifier_labels, search: str = "grid", truth=None) -> SlideResult:
        """Classify one slide; ``search`` is ``"grid"``, ``"bayes"`` (Gaussian process),
        ``"tpe"`` or ``"optimal"`` (needs ``truth``)."""
        slide = self._prepare(latent, classifier_labels)
        if search == "grid":
            history = [slide.evaluate(q, m) for q, m in self.grid]
            best = min(history, key=lambda e: e.objective)  # first minimum: deterministic ties
        elif search in ("bayes", "tpe"):
            history = self._bayes(slide, search)
            best = min(history, key=lambda e: e.objective)
        elif search == "optimal":
            if truth is None:
                raise ValueError("search='optimal' needs the true labels (analysis only)")
            truth = np.asarray(truth).astype(int)
            history = [slide.evaluate(q, m) for q, m in self.grid]
            best = min(history, key=lambda e: self._errors(slide, e, truth))
        else:
            raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
        return self._finish(slide, best, history)

    def _errors(self, slide: _Slide, evaluation: Evaluation, truth: np.ndarray) -> int:
        result = self._finish(slide, evaluation, [])
        return int((result.labels != truth).sum())

    def _bayes(self, slide: _Slide, sampler: str) -> list[Evaluation]:
        # Imported here: Optuna is only needed when a guided search is asked for.
        import optuna

        low_q, high_q = self.eps_quantile_range
        low_m, high_m = self.min_samples_range
        history: list[Evaluation] = []

        def objective(trial) -> float:
            evaluation = slide.evaluate(trial.suggest_float("eps_quantile", low_q, high_q),
                                        trial.suggest_int("min_samples", low_m, high_m))
            history.append(evaluation)
            return evaluation.objective

        chosen = optuna_sampler("gp" if sampler == "bayes" else "tpe", int(self.random_state),
                                self.bayes_random)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not one line per evaluation
        study = optuna.create_study(direction="minimize", sampler=chosen)
        study.optimize(objective, n_trials=self.bayes_random + self.bayes_guided)
        return history

"""Slide-level classification: classify all images of one slide (one patient) together.

After a Lund thesis: an instance classifier (CNN) gives per-image predictions and feature
vectors, a variational autoencoder maps the features to a latent space, DBSCAN groups each
slide's latent vectors (``eps`` and ``min_samples`` chosen per slide by a grid or Bayesian
optimisation), and each whole cluster takes the class whose reference distribution is
nearest in Earth Mover's Distance. The digits benchmark lives in ``milbench.bench.slides``;
the bag-model form for the lymphocytosis pipeline is ``milbench.models.cluster_emd``.
"""

from milbench.slides.clustering import SlideClusterer, SlideResult
from milbench.slides.emd import assign_clusters, emd
from milbench.slides.vae import VAEModel, fit_vae

__all__ = ["SlideClusterer", "SlideResult", "VAEModel", "assign_clusters", "emd", "fit_vae"]

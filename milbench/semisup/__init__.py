"""Semi-supervised instance classifier: a CNN (or a head on frozen backbone features) trained on
an instance-labelled source set (ALL-IDB2 layout) and grown by iterative pseudo-labelling of the
cohort's training images; patients are then classified from counts of predicted cells.

- :mod:`milbench.semisup.source`: the ALL-IDB2-layout loader and source feature extraction.
- :mod:`milbench.semisup.schedule`: how many images each iteration adds.
- :mod:`milbench.semisup.loop`: the pseudo-labelling loop, shared by the ``head`` and ``full`` modes.
- :mod:`milbench.semisup.counts`: the per-patient count matrix.
"""

from milbench.semisup.counts import count_matrix, predicted_counts
from milbench.semisup.loop import PseudoLabelResult, run_pseudo_labelling
from milbench.semisup.schedule import make_schedule
from milbench.semisup.source import SourceSet, load_source, prepare_source_features

__all__ = [
    "PseudoLabelResult",
    "SourceSet",
    "count_matrix",
    "load_source",
    "make_schedule",
    "predicted_counts",
    "prepare_source_features",
    "run_pseudo_labelling",
]

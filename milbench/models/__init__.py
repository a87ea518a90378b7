"""Bag classifiers behind one contract, created by name through the registry."""

from milbench.models.registry import create_model, list_models, model_tags, register_model

# Importing a model module registers it.
from milbench.models import clinical  # noqa: E402,F401  isort: skip
from milbench.models import cluster_emd  # noqa: E402,F401  isort: skip
from milbench.models import dmil  # noqa: E402,F401  isort: skip
from milbench.models import misvm  # noqa: E402,F401  isort: skip
from milbench.models import semisup  # noqa: E402,F401  isort: skip
from milbench.models import selection  # noqa: E402,F401  isort: skip
from milbench.ensemble import stacker, voting  # noqa: E402,F401  isort: skip

__all__ = ["create_model", "list_models", "model_tags", "register_model"]

"""Bag classifiers behind one contract, created by name through the registry.

Importing this package loads no model: the registry imports a model's module when the model is
created (see ``milbench.models.registry``).
"""

from milbench.models.registry import (
    Tag,
    create_model,
    list_models,
    model_class,
    model_tags,
    register_model,
    unregister_model,
)

__all__ = ["Tag", "create_model", "list_models", "model_class", "model_tags", "register_model",
           "unregister_model"]

"""The model of docs/adding-a-model.md, read from the page itself, so the recipe's code is the
code the tests run (in an importable module, ``milbench_recipe``, so its models pickle)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "docs" / "adding-a-model.md"
NAME = "maxpool_logreg"
MODULE = "milbench_recipe"


def recipe_code() -> str:
    text = RECIPE.read_text(encoding="utf-8")
    match = re.search(r"<!-- recipe-model:.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"{RECIPE}: no recipe-model code block"
    return match.group(1)


def recipe_model_class() -> type:
    """``MaxPoolLogistic`` as the page writes it, in module ``milbench_recipe``."""
    module = sys.modules.get(MODULE)
    if module is None or not hasattr(module, "MaxPoolLogistic"):
        module = types.ModuleType(MODULE)
        module.__file__ = str(RECIPE)
        sys.modules[MODULE] = module
        exec(compile(recipe_code(), str(RECIPE), "exec"), module.__dict__)
    return module.MaxPoolLogistic


def register_recipe_model() -> str:
    """Step 3 of the page, the plug-in way; returns the registered name."""
    from milbench.models import register_model

    register_model(NAME)(recipe_model_class())
    return NAME

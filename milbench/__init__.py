"""milbench: multiple-instance learning toolkit for medical-image competitions.

The notebook API (``milbench.api``) is re-exported here: ``milbench.run``, ``milbench.load_run``,
``milbench.load_model``, ``milbench.predict``, ``milbench.RunResult``; it is imported on first
use, so ``import milbench`` stays light."""

__version__ = "0.1.0"

_API = ("run", "load_run", "load_model", "predict", "RunResult")


def __getattr__(name: str):
    if name in _API:
        from milbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'milbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

"""milbench: multiple-instance learning toolkit for medical-image competitions."""

__version__ = "0.1.0"

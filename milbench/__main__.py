"""Allow ``python -m milbench`` as an alias of the ``milbench`` console script."""

from milbench.cli import app

app()

"""The ``milbench`` command line: parse, check, call one function of the room that does the
work, print what it returns. Each sub-app's commands live in their own module; errors a user
can fix are handled once (``common.user_errors``)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from milbench.cli import inputs, training
from milbench.cli.bench import bench_app

app = typer.Typer(help="Multiple-instance learning toolkit for the lymphocytosis challenge.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(inputs.data_app, name="data")
app.add_typer(inputs.cache_app, name="cache")
app.add_typer(inputs.submission_app, name="submission")
app.add_typer(bench_app, name="bench")
for command in (training.run, training.ablate, training.tune, training.predict, inputs.synth,
                inputs.segment, inputs.features, inputs.pretrain):
    app.command()(command)
app.command("models")(inputs.models_list)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])

"""The ``grass-llm`` command line: one Typer app, its commands in one module per concern."""

from grass_llm.cli import run  # noqa: F401, I001  (registers the commands, in --help order)
from grass_llm.cli import influence, store  # noqa: F401
from grass_llm.cli._app import app, console

__all__ = ["app", "console"]

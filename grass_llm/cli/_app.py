"""The ``grass-llm`` app: the Typer object, the console and the helpers every command uses."""

from __future__ import annotations

import atexit

import typer
from rich.console import Console

import grass_llm

app = typer.Typer(
    name="grass-llm",
    help="Scalable data attribution for LLMs with GraSS / FactGraSS gradient compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _fail(err: Exception) -> None:
    """A user-facing error: one line, exit code 2."""
    console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from err


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def _version(value: bool) -> None:
    if value:
        console.print(f"grass-llm {grass_llm.__version__}")
        raise typer.Exit()


_ended_cleanly = [False]  # did the last command of this process return normally?


def _command_returned(*_args, **_kwargs) -> None:
    _ended_cleanly[0] = True


def end_of_process() -> None:
    """At exit, after a last command that returned normally: destroy the process group, if a
    command made one. Left to the interpreter's teardown, the group's threads can be destroyed
    while joinable (``terminate called without an active exception``, exit -6 under torchrun;
    seen with DeepSpeed on gloo), so a finished run would report a failure. Once per process,
    not per command: a process may run several commands on one group. Not after a failure: the
    other ranks may still be inside a collective."""
    if _ended_cleanly[0]:
        from grass_llm.parallel.dist import shutdown

        shutdown()


atexit.register(end_of_process)


@app.callback(result_callback=_command_returned)
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Scalable data attribution for LLMs with GraSS / FactGraSS gradient compression."""
    _ended_cleanly[0] = False  # until this command returns



"""The one console script, `lcls-hitfinder`, with a subcommand per stage.

Each stage registers its own subcommands (simulate/commands.py, learn/commands.py,
service/commands.py); heavy imports (torch, psana) happen inside the commands, so `--help` is quick.
Bad input raises UserError anywhere below and ends here as one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from lcls_hitfinder.errors import UserError

app = typer.Typer(
    name="lcls-hitfinder",
    help="Real-time single-hit classification for X-ray single-particle imaging at LCLS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # a docstring's lines wrap to the terminal, not at their line breaks
)


def _said_version(asked: bool) -> None:
    if asked:
        from lcls_hitfinder import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_said_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Real-time single-hit classification for X-ray single-particle imaging at LCLS."""


def _register() -> None:
    from lcls_hitfinder.learn import commands as learn_commands
    from lcls_hitfinder.service import commands as service_commands
    from lcls_hitfinder.service import psana_commands
    from lcls_hitfinder.simulate import commands as simulate_commands

    for module in (simulate_commands, learn_commands, service_commands, psana_commands):
        module.register(app)


_register()


@app.command()
def version() -> None:
    """Print the package version."""
    from lcls_hitfinder import __version__

    print(__version__)


def main() -> None:
    try:
        app()  # standalone mode: usage errors are click's one-liners with exit code 2
    except UserError as err:
        print(f"lcls-hitfinder: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        print(f"lcls-hitfinder: error: {key}: {first['msg']}", file=sys.stderr)
        sys.exit(2)

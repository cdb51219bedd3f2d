"""CLI subcommands of this stage, registered on the main app by lcls_hitfinder.cli."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to `app`."""

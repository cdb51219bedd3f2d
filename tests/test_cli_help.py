"""Every command's --help reads whole in an 80-column terminal, the width of many a beamline console."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from lcls_hitfinder.cli import app


def _commands(group: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    """(words, command) of every command under a group (typer's own click, whose classes are private)."""
    found: list[tuple[list[str], Any]] = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += _commands(command, [*path, name])
        else:
            found.append(([*path, name], command))
    return found


COMMANDS = _commands(typer.main.get_group(app), [])


def test_every_command_is_listed() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"serve", "listen", "demo", "bank build", "bank pick", "train", "simulate"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_names_every_option_in_full_at_80_columns(path: list[str], command: Any) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output  # rich cuts what does not fit its column
    for param in command.params:
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                assert name in result.output, f"{' '.join(path)}: {name} not shown whole"

"""Checks on the paths a command reads and writes, made before any work: a one-line error at once, never a
traceback after minutes of simulating, training or evaluating."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lcls_hitfinder.errors import UserError


def existing(path: Path, what: str) -> Path:
    """A file or directory to read."""
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    return path


def apart(first: Path, second: Path, why: str) -> None:
    """Refuse two arguments that name one file (by any path); `why` says what that would do."""
    if first.expanduser().resolve() == second.expanduser().resolve():
        raise UserError(why)


def output_file(path: Path, what: str, reads: Mapping[str, Path | None] | None = None) -> Path:
    """A file to write: not a directory, in a directory that exists or can be made, and none of the files the
    command reads (`reads`: option -> path), which writing would destroy before or while they are read."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    for option, read in (reads or {}).items():
        if read is not None:
            apart(path, read, f"the {what} to write, {path}, is the {option} file the command reads")
    _make_dir(path.parent, what)
    return path


def output_dir(path: Path, what: str) -> Path:
    """A directory to write into, made if it is not there: not an existing file, and one a file can be
    written in (tried: permissions alone do not say so, e.g. for root on a read-only mount)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory")
    _make_dir(path, what)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"cannot write {what} in {path}: {err.strerror or err}") from None
    return path


def _make_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write {what} in {path}: {err.strerror or err}") from None


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` (its suffix, this process's own) that replaces `path` when the block ends
    and is removed when it fails: a reader (a service reloading its bank) never sees a half-written file, and
    a refused or stopped write leaves the previous file as it was."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

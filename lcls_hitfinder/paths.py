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


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def made_here(path: Path) -> str | None:
    """Which of this tool's costly outputs an existing file is (hours of simulation, training, picking by eye, or
    a beamtime's record): a dataset, a reference file, a bank, a decision log, a model or an XTC2 run; None for
    anything else. An HDF5 file it cannot read is refused: it may be a record another process still writes."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "model"
    if suffix == ".xtc2":
        return "XTC2 file"
    with open(path, "rb") as f:
        if f.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
            return None
    import h5py

    from lcls_hitfinder.dataset import FORMAT

    try:  # SWMR: a decision log the service writes, or one a killed service left, opens only so
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            attrs = dict(f.attrs)
    except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for a superblock it cannot decode
        raise UserError(f"{path} is an HDF5 file this tool cannot read ({err}): give another path") from None
    if attrs.get("format") == FORMAT:
        return "reference file" if "picked_from" in attrs else "dataset"
    if {"model_hash", "method"} <= set(attrs):
        return "bank"
    if {"schema_version", "complete"} <= set(attrs):
        return "decision log"
    return None


def output_file(
    path: Path, what: str, reads: Mapping[str, Path | None] | None = None, suffix: str | None = None
) -> Path:
    """A file to write: not a directory, in a directory that exists or can be made, none of the files the
    command reads (`reads`: option -> path), which writing would destroy before or while they are read, and
    not an output of another kind (a mistyped --out would replace a bank or a model with no word). With
    `suffix` (a plot's .png), its name must end in it: the file is written in that format whatever it is called."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    for option, read in (reads or {}).items():
        if read is not None:
            apart(path, read, f"the {what} to write, {path}, is the {option} file the command reads")
    if suffix is not None and path.suffix.lower() != suffix:
        raise UserError(f"the {what} {path} must end in {suffix}")
    try:
        kind = made_here(path) if path.is_file() else None
    except OSError as err:  # another user's file in a shared folder
        raise UserError(f"cannot write the {what} {path}: {err.strerror}") from None
    if kind is not None and kind != what:
        article = "an" if kind[0] in "AEIOUX" else "a"  # an XTC2 file
        raise UserError(
            f"the {what} to write, {path}, would replace {article} {kind}: give another path, or remove it first"
        )
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

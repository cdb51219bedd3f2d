"""The per-run record of every decision: an HDF5 file with one column per logged decision field.

The service's log writer process (log_writer.py) keeps it: it appends the decisions as the service hands
them over (every 0.1 s), flushes them every second (also while no events come) and closes the file at the end of the run
with the run's totals as attributes. Subscribers never affect it: whatever the PUB socket drops is still here.

The file is written in HDF5's single-writer / multiple-reader (SWMR) mode, so a user's script can read
it while the run goes on (`read_decision_log`, or `h5py.File(path, 'r', swmr=True)` and `refresh()`)
and sees every flushed decision, consistent, never a half-written file. HDF5 allows no attribute
writes in SWMR mode: at the end of the run the file is closed and reopened once to record the totals
(past HDF5's file lock if a reader still has it open: the writer is its only writer).

Layout: /<field> (N,) for each field of messages.LOG_COLUMNS (nil stored as -1 or ""), attrs:
schema_version, experiment, run, source, model, provider, bank, instance (the service process's, as in its
messages), complete (set at close), the run's totals and why it ended (`ended`, as the run message has it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lcls_hitfinder.service.messages import LOG_COLUMNS, SCHEMA_VERSION

_STR = h5py.string_dtype("utf-8")


def _dtype(spec_dtype: str) -> Any:
    return _STR if spec_dtype == "str" else np.dtype(spec_dtype)


# Room kept beside a flush: HDF5 allocates chunks of 4,096 rows a column at a time (32 KiB each for 8-byte
# columns) and writes its metadata at the close.
_HEADROOM = 8 << 20
_ROW_BYTES = 1024  # a row's share of the file, on the safe side (a few hundred bytes with HDF5's overhead)

_NAME_CHARS = 48  # of the experiment's name in a log's file name: 192 bytes at most, and the run and time after


def log_path(log_dir: Path, experiment: str, run: int) -> Path:
    """A new file name for a run's log, absolute (subscribers elsewhere read it from the run messages); never one
    that exists (a run served twice keeps both)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    name = re.sub(r"[^\w.-]", "_", experiment).lstrip(".") or "_"  # one file in log_dir, whatever the name holds
    name = name[:_NAME_CHARS]  # a file name has at most 255 bytes, and \w takes letters of up to 4
    base = f"{name}-r{run:04d}-{stamp}"  # a dot in the name is not a suffix to replace
    log_dir = log_dir.resolve()
    path, n = log_dir / f"{base}.h5", 1
    while path.exists():
        path, n = log_dir / f"{base}-{n}.h5", n + 1
    return path


def claim_log(log_dir: Path, experiment: str, run: int) -> Path:
    """A new, empty file for a run's log, made exclusively: two services that begin the same run in the same
    second (two detectors of one experiment on one node) get two files, never one that both write."""
    log_dir.mkdir(parents=True, exist_ok=True)
    while True:
        path = log_path(log_dir, experiment, run)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:  # made by another process since the name was picked: the next name
            continue
        return path


class DecisionLog:
    """Append columns of decisions (name -> (B,) array, in LOG_COLUMNS dtypes), written at each `flush`."""

    def __init__(self, path: Path, attrs: Mapping[str, Any]) -> None:
        """A new log in `path`, a file claimed for it (`claim_log`): whatever it holds is overwritten."""
        self.path = path
        # HDF5 failed to write it (an I/O error the room check could not foresee): h5py would free its handles
        # into a segmentation fault (h5py issue 914), so it is kept (`_kept`), never touched again, and the
        # writer process leaves without freeing it
        self.failed = False
        self._kept: list[h5py.File] = []
        try:
            self._f = h5py.File(path, "w", libver="latest")  # SWMR needs the latest file format
        except BaseException:
            path.unlink(missing_ok=True)  # not a log: no room for HDF5's first bytes
            raise
        try:
            self._f.attrs["schema_version"] = SCHEMA_VERSION
            self._f.attrs["complete"] = False
            _write_attrs(self._f, attrs)
            for spec in LOG_COLUMNS:
                self._f.create_dataset(spec.name, (0,), _dtype(spec.log_dtype), maxshape=(None,), chunks=(4096,))
            self._f.swmr_mode = True  # from here on readers may open it; no new objects or attributes
        except BaseException:
            self.abandon()  # a close that fails too (a full disk) must not keep the file
            path.unlink(missing_ok=True)  # not a log without columns that no reader can read
            raise
        made = os.stat(path)
        self._identity = (made.st_dev, made.st_ino)
        self._pending: list[Mapping[str, np.ndarray]] = []
        self.n = 0

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        """Held until the next `flush`."""
        self._pending.append(columns)

    def flush(self) -> None:
        """Write what is pending and flush the file to disk."""
        self._check_room()
        try:
            if self._pending:
                n = sum(len(c["seq"]) for c in self._pending)
                lo, hi = self.n, self.n + n
                for spec in LOG_COLUMNS:
                    ds = self._f[spec.name]
                    ds.resize(hi, axis=0)
                    ds[lo:hi] = np.concatenate([np.asarray(c[spec.name]) for c in self._pending])
                    ds.flush()  # what an SWMR reader's refresh() sees
                self.n = hi
                self._pending.clear()
            self._f.flush()
        except BaseException:
            self._give_up(self._f)
            raise

    def _give_up(self, f: h5py.File) -> None:
        """HDF5 failed on `f`: kept from being freed (see `failed`), and this log is done."""
        self.failed = True
        self._kept.append(f)

    def _check_room(self) -> None:
        """Stop before HDF5 meets a full disk or the file size limit: after a failed write h5py frees its handles
        into a segmentation fault (h5py issue 914), which would take the service with it. Closed while that
        still works, and said: what was flushed stays readable. Also notices the file removed or replaced (a
        folder cleaned up during the run), which would otherwise go unnoticed until the run's end."""
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._identity:
            self.abandon()
            raise OSError(f"{self.path} was removed or replaced while the run was being logged")
        need = sum(len(c["seq"]) for c in self._pending) * _ROW_BYTES + _HEADROOM
        fs = os.statvfs(self.path.parent)
        free = fs.f_bavail * fs.f_frsize
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if free < need or (limit != resource.RLIM_INFINITY and st.st_size + need > limit):
            self.abandon()
            room = f"{_size(free)} free" if free < need else f"the file size limit ({_size(limit)})"
            raise OSError(
                f"no room to go on: {room} where the next flush needs up to {_size(need)}; closed at {self.n} rows"
            )

    def close(self, totals: Mapping[str, Any] | None = None) -> None:
        """Write the rest, record the totals, mark the file complete and close it."""
        if self.failed or not self._f.id.valid:
            return
        self.flush()
        try:
            self._f.close()
            try:
                f = h5py.File(self.path, "r+")  # out of SWMR mode: attributes may be written again
            except OSError:  # a user's script still reads it (SWMR), and HDF5's lock says no: the only writer is us
                f = h5py.File(self.path, "r+", locking=False)
        except BaseException:
            self._give_up(self._f)
            raise
        try:
            _write_attrs(f, totals or {})
            f.attrs["complete"] = True
            f.close()
        except BaseException:
            self._give_up(f)
            raise

    def abandon(self) -> None:
        """Close the file after a failure, as far as that goes: what was flushed stays readable. A file HDF5
        failed to write is left open (see `failed`)."""
        if not self.failed:
            with contextlib.suppress(Exception):
                self._f.close()


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        f.attrs[key] = value if isinstance(value, str | int | float) else json.dumps(value)


def read_decision_log(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All columns (strings decoded) and the attributes of a decision log, also of one still being written
    (`complete` is then False and the columns hold every decision flushed so far)."""
    with h5py.File(path, "r", swmr=True) as f:
        n = min(len(f[spec.name]) for spec in LOG_COLUMNS)  # columns grow one after the other during a flush
        columns = {
            spec.name: f[spec.name].asstr()[:n] if spec.log_dtype == "str" else f[spec.name][:n] for spec in LOG_COLUMNS
        }
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return columns, attrs

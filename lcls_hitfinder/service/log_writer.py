"""The decision logs are written by a child process of the service, never by the service itself.

HDF5 runs there: whatever goes wrong in it (a write that fails on a network file system, after which h5py
frees the file's handles into a segmentation fault, h5py issue 914; a crash of the library) costs that run's
log and never the service, its decisions or its exit code. The service sends each batch's columns over a
socket pair; the writer flushes them every second on its own clock and says back only what went wrong. The
service starts the writer when it starts, and again at a run's beginning after it died.

The writer is `python -m lcls_hitfinder.service.log_writer FD FLUSH_S` (so `ps` names it), not a
multiprocessing child: one would import the service's main module again (torch, for a script that serves),
and multiprocessing's exit handler would stop it at the service's exit, where it must outlive the drain.
It ignores SIGINT and SIGTERM (a terminal's Ctrl-C and a `pkill` reach it too) and leaves when the service
says so, or when the service is gone (its socket closed): what it was sent is then flushed, the log left
incomplete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from lcls_hitfinder.service.decision_log import DecisionLog, claim_log

log = logging.getLogger(__name__)

_ANSWER_S = 60.0  # longest wait for a log to be made or closed: a hung file system costs the log, not the run
_STOP_S = 10.0  # for the writer to leave once asked to (its last flush included)


class _Died(OSError):
    """The writer process is gone."""


class LogWriter:
    """The process that writes a service's decision logs, one run's at a time."""

    def __init__(self, flush_s: float = 1.0) -> None:
        self._flush_s = flush_s
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Started with the service, so that the first run's log is made at once (the writer's imports take a
        few tenths of a second)."""
        if self._process is not None and self._process.poll() is None:
            return
        self.stop()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            fd = theirs.fileno()
            command = [sys.executable, "-m", __name__, str(fd), repr(self._flush_s)]
            self._process = subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL)
            self._conn = Connection(os.dup(ours.fileno()))

    def open(self, log_dir: Path, experiment: str, run: int, attrs: Mapping[str, Any]) -> ChildLog:
        """A new log for a run, readable once this returns (the run's begin message names it): its file is
        claimed here and the writer makes the log in it. OSError says why there is none."""
        path = claim_log(log_dir, experiment, run)
        message = ("open", path, dict(attrs))
        try:
            self.start()  # again, where the last one died and was seen to
            self.ask(message, "opened")
        except _Died:  # since the last run ended, unseen till now
            self.start()
            self.ask(message, "opened")
        return ChildLog(self, path)

    def stop(self) -> None:
        """The writer leaves, after closing nothing: runs are closed by `ChildLog.close` first."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is None or conn is None:
            return
        with contextlib.suppress(OSError):
            conn.send(("stop",))
        try:
            process.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        conn.close()

    def send(self, message: tuple[Any, ...]) -> None:
        """After saying what went wrong since the last message, if anything did."""
        self.check()
        self._send(message)

    def check(self) -> None:
        """Raise OSError for a failure the writer said, or for its death."""
        conn = self._live()
        try:
            while conn.poll(0):
                self._read(conn)
        except (EOFError, ConnectionError):
            raise self._died() from None

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._live().send(message)
        except OSError:  # a broken pipe or a reset connection: the writer is gone
            raise self._died() from None

    def ask(self, message: tuple[Any, ...], expected: str) -> tuple[Any, ...]:
        """Send `message` and wait for the answer `expected`; OSError says what went wrong instead."""
        self.send(message)
        conn = self._live()
        deadline = time.monotonic() + _ANSWER_S
        try:
            while conn.poll(max(0.0, deadline - time.monotonic())):
                answer = self._read(conn)
                if answer[0] == expected:
                    return answer
        except (EOFError, ConnectionError):
            raise self._died() from None
        if self._process is not None:
            self._process.kill()  # hung (a file system that does not answer): it goes, the run goes on
        raise OSError(f"the decision log's writer did not answer in {_ANSWER_S:g} s; stopped")

    @staticmethod
    def _read(conn: Connection) -> tuple[Any, ...]:
        message: tuple[Any, ...] = conn.recv()
        if message[0] == "failed":
            raise OSError(message[1])
        return message

    def _live(self) -> Connection:
        if self._conn is None:
            raise _Died("the decision log's writer is stopped")
        return self._conn

    def _died(self) -> _Died:
        if self._process is None:
            return _Died("the decision log's writer is stopped")
        try:
            code: int | None = self._process.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"with exit code {code}"
        return _Died(f"the decision log's writer process died, {how}")


class ChildLog:
    """A run's log as the service holds it: the writer process has the file."""

    def __init__(self, writer: LogWriter, path: Path) -> None:
        self._writer = writer
        self.path = path

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        self._writer.send(("append", dict(columns)))

    def check(self) -> None:
        """The writer flushes on its own clock; here what it said of it is heard (OSError)."""
        self._writer.check()

    def close(self, totals: Mapping[str, Any]) -> None:
        """Written to the end, totals recorded and marked complete, or OSError."""
        self._writer.ask(("close", dict(totals)), "closed")

    def abandon(self) -> None:
        """The service goes on without this log (what was flushed stays readable)."""
        with contextlib.suppress(OSError):
            self._writer.send(("abandon",))


def _write_logs(conn: Connection, flush_s: float) -> None:
    """The writer process: one log at a time, as the service asks. A failure is said back and costs the log;
    after a failed HDF5 write the process leaves at once (freeing that file would crash it)."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the service closes the log in order, then says stop
        signal.signal(signum, signal.SIG_IGN)
    decision_log: DecisionLog | None = None
    last_flush = time.monotonic()
    while True:
        wait = None if decision_log is None else max(0.0, last_flush + flush_s - time.monotonic())
        message = _next(conn, wait)
        kind = message[0]
        try:
            if kind == "open":
                decision_log = DecisionLog(*message[1:])
                last_flush = time.monotonic()
                conn.send(("opened",))
            elif decision_log is not None and kind == "append":
                decision_log.append(message[1])
            elif decision_log is not None and kind == "flush":
                decision_log.flush()
                last_flush = time.monotonic()
            elif decision_log is not None and kind == "close":
                decision_log.close(message[1])
                decision_log = None
                conn.send(("closed",))
            elif decision_log is not None and kind == "abandon":
                decision_log.abandon()
                decision_log = None
            elif kind == "stop":
                if decision_log is not None:
                    decision_log.flush()
                    decision_log.abandon()
                break
        except Exception as err:
            hdf5_failed = decision_log is not None and decision_log.failed
            if decision_log is not None:
                decision_log.abandon()
            decision_log = None
            with contextlib.suppress(OSError):
                conn.send(("failed", " ".join(str(err).split()) or type(err).__name__))  # one line (HDF5's have two)
            if hdf5_failed:
                os._exit(0)
            if kind == "stop":
                break
    conn.close()


def _next(conn: Connection, wait: float | None) -> tuple[Any, ...]:
    """The service's next message, or a flush once `wait` has passed without one."""
    try:
        message: tuple[Any, ...] = conn.recv() if conn.poll(wait) else ("flush",)
    except EOFError:  # the service is gone without a word: what it sent is kept, the log stays incomplete
        return ("stop",)
    return message


if __name__ == "__main__":
    _write_logs(Connection(int(sys.argv[1])), float(sys.argv[2]))

"""The decision logs are written by a child process of the service, never by the service itself.

HDF5 and the log folder are touched there only: whatever goes wrong in them (a write that fails on a network
file system, after which h5py frees the file's handles into a segmentation fault, h5py issue 914; a crash of
the library; a file system that stops answering) costs that run's log and never the service, its decisions
or its exit code. The service hands each batch's columns to a sender thread, which passes them to the
writer over a socket pair, so a writer that stops reading never holds up a decision; the writer flushes
every second on its own clock and says back only what went wrong. A writer that takes nothing, or does not
answer, for `PATIENCE_S` is killed and the run goes on without its log. The service starts the writer when
it starts, and again at a run's beginning after it died.

The writer is `python -P -m lcls_hitfinder.service.log_writer FD FLUSH_S` (so `ps` names it), in a session
of its own, not a multiprocessing child: one would import the service's main module again (torch, for a
script that serves), and multiprocessing's exit handler would stop it at the service's exit, where it must
outlive the drain. A terminal's signals never reach it; it ignores SIGINT, SIGTERM and SIGHUP sent to it
(systemd's default KillMode signals every process of the unit), and leaves when the service says so, or when
the service is gone (its socket closed): what it was sent is then flushed, the log left incomplete.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from lcls_hitfinder.service.decision_log import DecisionLog, claim_log

PATIENCE_S = 10.0  # the longest the writer may take to take a message, answer, or leave once asked to


class LogLost(OSError):
    """The writer said a log failed; `kept`: its file is still there, with the rows flushed before."""

    def __init__(self, message: str, kept: bool) -> None:
        super().__init__(message)
        self.kept = kept


class _Died(OSError):
    """The writer process is gone."""


class LogWriter:
    """The process that writes a service's decision logs, one run's at a time. Used from one thread."""

    def __init__(self, flush_s: float = 1.0) -> None:
        self._flush_s = flush_s
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiting = 0  # messages handed to the sender and not yet taken by the writer's socket
        self._moved = time.monotonic()  # when the socket last took one, or the sender had none waiting

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
            command = [sys.executable, "-P", "-m", __name__, str(fd), repr(self._flush_s)]  # -P: not the cwd's
            self._process = subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL, start_new_session=True)
            self._conn = Connection(os.dup(ours.fileno()))
        self._outbox, self._waiting = queue.SimpleQueue(), 0
        self._sender = threading.Thread(target=self._send_all, args=(self._conn, self._outbox), daemon=True)
        self._sender.start()

    def open(self, log_dir: Path, experiment: str, run: int, attrs: Mapping[str, Any]) -> ChildLog:
        """A new log for a run, in a file of its own, readable once this returns (the run's begin message
        names it). OSError says why there is none."""
        message = ("open", log_dir, experiment, run, dict(attrs))
        try:
            self.start()  # again, where the last one died and was seen to
            answer = self.ask(message, "opened")
        except _Died:  # since the last run ended, unseen till now
            self.start()
            answer = self.ask(message, "opened")
        return ChildLog(self, Path(answer[1]))

    def stop(self) -> None:
        """The writer leaves, after closing nothing: runs are closed by `ChildLog.close` first."""
        process, conn, sender = self._process, self._conn, self._sender
        self._process = self._conn = self._sender = None
        if process is None or conn is None or sender is None:
            return
        self._outbox.put(pickle.dumps(("stop",)))
        self._outbox.put(None)
        sender.join(PATIENCE_S)
        try:
            process.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # in the kernel's hands (a hung mount): left
                process.wait(PATIENCE_S)
        sender.join(PATIENCE_S)  # its send ends with the writer
        conn.close()

    def send(self, message: tuple[Any, ...]) -> None:
        """Handed to the sender, after saying what went wrong since the last message, if anything did. Never
        waits for the writer."""
        self.check()
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)  # here: what cannot be pickled is this caller's
        with self._lock:
            if not self._waiting:
                self._moved = time.monotonic()
            self._waiting += 1
        self._outbox.put(data)

    def check(self) -> None:
        """Raise OSError for a failure the writer said, for its death, or for a writer that took nothing for
        PATIENCE_S (it is killed)."""
        conn = self._live()
        with self._lock:
            stalled = self._waiting and time.monotonic() - self._moved > PATIENCE_S
        if stalled:
            raise self._kill(f"the decision log's writer took nothing for {PATIENCE_S:g} s")
        try:
            while conn.poll(0):
                self._read(conn)
        except (EOFError, ConnectionError):
            raise self._died() from None

    def ask(self, message: tuple[Any, ...], expected: str) -> tuple[Any, ...]:
        """Send `message` and wait for the answer `expected`; OSError says what went wrong instead."""
        self.send(message)
        conn = self._live()
        deadline = time.monotonic() + PATIENCE_S
        try:
            while conn.poll(max(0.0, deadline - time.monotonic())):
                answer = self._read(conn)
                if answer[0] == expected:
                    return answer
        except (EOFError, ConnectionError):
            raise self._died() from None
        raise self._kill(f"the decision log's writer did not answer in {PATIENCE_S:g} s")

    def _send_all(self, conn: Connection, outbox: queue.SimpleQueue[bytes | None]) -> None:
        """The sender thread: blocks in the socket, never the service."""
        while (data := outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except OSError:  # the writer is gone: said by the service's next check
                return
            with self._lock:
                self._waiting -= 1
                self._moved = time.monotonic()

    @staticmethod
    def _read(conn: Connection) -> tuple[Any, ...]:
        message: tuple[Any, ...] = conn.recv()
        if message[0] == "failed":
            raise LogLost(message[1], message[2])
        return message

    def _live(self) -> Connection:
        if self._conn is None:
            raise _Died("the decision log's writer is stopped")
        return self._conn

    def _kill(self, why: str) -> OSError:
        """A writer that does not answer (a file system that does not): it goes, the run goes on."""
        if self._process is not None:
            self._process.kill()
        return OSError(f"{why} (a file system that does not answer?); stopped")

    def _died(self) -> _Died:
        if self._process is None:
            return _Died("the decision log's writer is stopped")
        try:
            code: int | None = self._process.wait(PATIENCE_S)
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
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the service closes the log, then says stop
        signal.signal(signum, signal.SIG_IGN)
    decision_log: DecisionLog | None = None
    last_flush = time.monotonic()
    while True:
        wait = None if decision_log is None else max(0.0, last_flush + flush_s - time.monotonic())
        message = _next(conn, wait)
        kind = message[0]
        try:
            if kind == "open":
                decision_log = DecisionLog(claim_log(*message[1:4]), message[4])
                last_flush = time.monotonic()
                conn.send(("opened", str(decision_log.path)))
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
            kept = decision_log is not None and decision_log.path.exists()
            if decision_log is not None:
                decision_log.abandon()
            decision_log = None
            with contextlib.suppress(OSError):  # one line (HDF5's have two)
                conn.send(("failed", " ".join(str(err).split()) or type(err).__name__, kept))
            if hdf5_failed:
                os._exit(0)
            if kind == "stop":
                break
    conn.close()


def _next(conn: Connection, wait: float | None) -> tuple[Any, ...]:
    """The service's next message, or a flush once `wait` has passed without one."""
    try:
        message: tuple[Any, ...] = conn.recv() if conn.poll(wait) else ("flush",)
    except (EOFError, OSError):  # the service is gone (a reset, where it left a message unread): what it sent
        return ("stop",)  # is kept, the log stays incomplete
    return message


if __name__ == "__main__":
    _write_logs(Connection(int(sys.argv[1])), float(sys.argv[2]))

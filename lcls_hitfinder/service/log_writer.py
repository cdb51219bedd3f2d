"""The decision logs are written by a child process of the service, never by the service itself.

HDF5 and the log folder are touched there only: whatever goes wrong in them (a write that fails on a network
file system, after which h5py frees the file's handles into a segmentation fault, h5py issue 914; a crash of
the library; a file system that stops answering) costs that run's log and never the service, its decisions
or its exit code. The service hands the decisions' columns, every `SEND_S`, to a sender thread, which
passes them to the writer over a socket pair, so a writer that stops reading never holds up a decision; the
writer flushes every second on its own clock and says so ("flushed"), and what went wrong. A writer that
holds a log and has not flushed it for `PATIENCE_S` (and a flush period), or that does not answer within
`PATIENCE_S` when a run's log is made or closed, is killed and the run goes on without its log. The
service starts the writer when it starts, and again at a run's beginning after it died or was killed.

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
import site
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

import lcls_hitfinder
from lcls_hitfinder.service.decision_log import DecisionLog, claim_log

SEND_S = 0.1  # the service hands the decisions over this often (what a SIGKILL of the service can cost the log)
PATIENCE_S = 10.0  # the longest the writer may go without a word while it holds a log, take to answer, or to leave


class LogLost(OSError):
    """The writer said a log failed; `kept`: its file is still there, with the rows flushed before."""

    def __init__(self, message: str, kept: bool) -> None:
        super().__init__(message)
        self.kept = kept


class _Died(OSError):
    """The writer process is gone."""


class _Channel:
    """One writer process and what the service holds of it: the socket's end, and the sender thread that does
    the sending on it, so that a writer that stops reading never holds up the service."""

    def __init__(self, flush_s: float) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            fd = theirs.fileno()
            command = [sys.executable, "-P", "-m", __name__, str(fd), repr(flush_s)]  # -P: never the cwd's package
            env = dict(os.environ)
            root = str(Path(lcls_hitfinder.__file__).parents[1])
            if root not in site.getsitepackages():  # a source tree not installed, found by the cwd: also there,
                # and only then (site-packages ahead of the standard library would shadow it with its backports)
                env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            self.process = subprocess.Popen(
                command, pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
            self.conn = Connection(os.dup(ours.fileno()))
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.retired = False
        try:
            threading.Thread(target=self._send_all, name="log-sender", daemon=True).start()
        except BaseException:  # no thread to be had: no writer either
            self.retire()
            raise

    @property
    def live(self) -> bool:
        return not self.retired and self.process.poll() is None

    def _send_all(self) -> None:
        """Blocks in the socket, never the service. The socket is closed once neither thread holds the channel
        (by the garbage collector): closed under the other thread, its number could be another file's."""
        with contextlib.suppress(OSError):  # the writer is gone: the service's next look says so
            while (data := self.outbox.get()) is not None:
                self.conn.send_bytes(data)

    def retire(self) -> None:
        """Done with, in any state: the sender leaves after the message in hand, the process is killed (and
        reaped by subprocess later, where the kernel holds it now)."""
        self.retired = True
        self.outbox.put(None)
        self.process.kill()

    def leave(self, deadline: float) -> None:
        """Told to stop, given until `deadline` (the last flush of a log abandoned included), then retired."""
        self.retired = True
        self.outbox.put(pickle.dumps(("stop",)))
        self.outbox.put(None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(max(0.0, deadline - time.monotonic()))
        self.process.kill()  # nothing, once it has left


class LogWriter:
    """The process that writes a service's decision logs, one run's at a time. Used from one thread."""

    def __init__(self, flush_s: float = 1.0) -> None:
        self._flush_s = flush_s
        self._channel: _Channel | None = None
        self._log_id = 0  # the log the service holds: the writer's words of another are stale
        self._holds_log = False
        self._heard = time.monotonic()  # when the writer last said anything

    @property
    def pid(self) -> int | None:
        return None if self._channel is None else self._channel.process.pid

    def start(self) -> None:
        """Started with the service, so that the first run's log is made at once (the writer's imports take a
        few tenths of a second). Where it cannot be started (no process or thread to be had), nothing is
        left of the try."""
        if self._channel is not None and self._channel.live:
            return
        self.stop()
        self._channel = _Channel(self._flush_s)

    def open(self, log_dir: Path, experiment: str, run: int, attrs: Mapping[str, Any]) -> ChildLog:
        """A new log for a run, in a file of its own, readable once this returns (the run's begin message
        names it). OSError says why there is none."""
        self._log_id += 1
        message = ("open", self._log_id, log_dir, experiment, run, dict(attrs))
        try:
            self.start()  # again, where the last one died or was retired and was seen to
            answer = self.ask(message, "opened")
        except _Died:  # since the last run ended, unseen till now
            self.start()
            answer = self.ask(message, "opened")
        self._holds_log = True
        return ChildLog(self, Path(answer[2]))

    def stop(self) -> None:
        """The writer leaves, after closing nothing (runs are closed by `ChildLog.close` first), within
        PATIENCE_S."""
        channel, self._channel = self._channel, None
        self._holds_log = False
        if channel is not None and not channel.retired:
            channel.leave(time.monotonic() + PATIENCE_S)

    def send(self, message: tuple[Any, ...]) -> None:
        """Handed to the sender, after saying what went wrong since the last message, if anything did. Never
        waits for the writer."""
        self.check()
        assert self._channel is not None  # check() says where there is none
        self._channel.outbox.put(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))  # what cannot be pickled is ours

    def check(self) -> None:
        """Raise OSError for a failure the writer said, for its death, or for a writer that holds a log and
        said nothing (no flush) for PATIENCE_S (it is retired)."""
        conn = self._conn()
        try:
            while conn.poll(0):
                self._read(conn)
        except (EOFError, OSError) as err:
            raise err if isinstance(err, LogLost) else self._died() from None
        silent = time.monotonic() - self._heard
        if self._holds_log and silent > PATIENCE_S + self._flush_s:
            raise self._retire(f"the decision log's writer has not flushed for {silent:.0f} s")

    def ask(self, message: tuple[Any, ...], expected: str) -> tuple[Any, ...]:
        """Send `message` and wait for the answer `expected` about the log the service holds; OSError says
        what went wrong instead."""
        self.send(message)
        conn = self._conn()
        deadline = time.monotonic() + PATIENCE_S
        try:
            while conn.poll(max(0.0, deadline - time.monotonic())):
                answer = self._read(conn)
                if answer[:2] == (expected, self._log_id):
                    return answer
        except (EOFError, OSError) as err:
            raise err if isinstance(err, LogLost) else self._died() from None
        raise self._retire(f"the decision log's writer did not answer in {PATIENCE_S:g} s")

    def release(self) -> None:
        """The service holds no log any more (closed, or given up)."""
        self._holds_log = False

    def _read(self, conn: Connection) -> tuple[Any, ...]:
        message: tuple[Any, ...] = conn.recv()
        self._heard = time.monotonic()
        if message[0] == "failed" and message[1] == self._log_id:  # of an earlier log: stale
            raise LogLost(message[2], message[3])
        return message

    def _conn(self) -> Connection:
        if self._channel is None or self._channel.retired:
            raise _Died("the decision log's writer is stopped")
        return self._channel.conn

    def _retire(self, why: str) -> OSError:
        """A writer that does not answer (a file system that does not): it goes, the run goes on, and the next
        run's log gets a new one."""
        if self._channel is not None:
            self._channel.retire()
        self._holds_log = False
        return OSError(f"{why} (a file system that does not answer?); stopped")

    def _died(self) -> _Died:
        channel = self._channel
        if channel is None:
            return _Died("the decision log's writer is stopped")
        channel.retire()  # its socket closed: whatever it does now, it is done with
        self._holds_log = False
        try:
            code = channel.process.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            return _Died("the decision log's writer closed its socket")
        if code >= 0:
            return _Died(f"the decision log's writer process died with exit code {code}")
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal: valid, but without a name
            name = f"signal {-code}"
        return _Died(f"the decision log's writer process died, killed by {name}")


class ChildLog:
    """A run's log as the service holds it: the writer process has the file. Batches are handed over
    `SEND_S` apart, concatenated: one pickled message per batch of a few frames cost both processes tens of
    microseconds a frame (BENCHMARKS.md)."""

    def __init__(self, writer: LogWriter, path: Path) -> None:
        self._writer = writer
        self.path = path
        self._pending: list[Mapping[str, np.ndarray]] = []
        self._sent = time.monotonic()

    def append(self, columns: Mapping[str, np.ndarray]) -> None:
        self._pending.append(columns)
        self.check()

    def check(self) -> None:
        """Hand over what is pending once due, and hear what the writer said (OSError), which flushes on its
        own clock."""
        if self._pending and time.monotonic() - self._sent >= SEND_S:
            self._send_pending()
        else:
            self._writer.check()

    def close(self, totals: Mapping[str, Any]) -> None:
        """Written to the end, totals recorded and marked complete, or OSError."""
        try:
            self._send_pending()
            self._writer.ask(("close", dict(totals)), "closed")
        finally:
            self._writer.release()

    def abandon(self) -> None:
        """The service goes on without this log (what was flushed stays readable). Never raises: it comes
        after a failure, whatever that was."""
        self._pending.clear()
        self._writer.release()
        with contextlib.suppress(Exception):
            self._writer.send(("abandon",))

    def _send_pending(self) -> None:
        if self._pending:
            batches, self._pending = self._pending, []
            self._writer.send(("append", {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}))
        self._sent = time.monotonic()


def _write_logs(conn: Connection, flush_s: float) -> None:
    """The writer process: one log at a time, as the service asks, each flush said ("flushed"). A failure is
    said back and costs the log; after a failed HDF5 write the process leaves at once (freeing that file would
    crash it)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the service closes the log, then says stop
        signal.signal(signum, signal.SIG_IGN)
    decision_log: DecisionLog | None = None
    log_id = 0
    last_flush = time.monotonic()
    while True:
        wait = None if decision_log is None else max(0.0, last_flush + flush_s - time.monotonic())
        message = _next(conn, wait)
        kind = message[0]
        try:
            if kind == "open":
                if decision_log is not None:  # the service gave it up without a word reaching here
                    decision_log.abandon()
                    decision_log = None
                log_id, log_dir, experiment, run, attrs = message[1:]
                decision_log = DecisionLog(claim_log(log_dir, experiment, run), attrs)
                last_flush = time.monotonic()
                conn.send(("opened", log_id, str(decision_log.path)))
            elif decision_log is not None and kind == "append":
                decision_log.append(message[1])
            elif decision_log is not None and kind == "flush":
                decision_log.flush()
                last_flush = time.monotonic()
                conn.send(("flushed", log_id))
            elif decision_log is not None and kind == "close":
                decision_log.close(message[1])
                decision_log = None
                conn.send(("closed", log_id))
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
                conn.send(("failed", log_id, " ".join(str(err).split()) or type(err).__name__, kept))
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

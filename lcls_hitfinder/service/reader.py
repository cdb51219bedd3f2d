"""A source's read loop in a supervised child process, feeding the service through shared memory.

Why a child: psana's shared-memory client freezes its whole process with the GIL held when the
server goes away (and `DataSource(shmem=...)` does the same while no server is up), so no thread of
the service could even notice. The child runs a picklable `ReadLoop`; each frame is copied into one
fixed slot of a shared-memory ring (`multiprocessing.shared_memory`) and only its identity travels on
a pipe. A thread in the child bumps a heartbeat counter; the parent's `frames()` watches it, and when
it stops (stall) the parent kills the child, cleans up after it and starts a new one with exponential
backoff, counting restarts. Meanwhile `frames()` keeps yielding `None` idle ticks at least every
0.5 s so the service goes on heartbeating.

Ring protocol: the child writes slot k % n and sends (k % n, shape, dtype, event, truth, read
time); the parent copies the slot out and acknowledges it on a second pipe. The child never has more
than n slots unacknowledged. A frame bigger than the slots makes the child wait for every
acknowledgement, create a bigger ring and announce it, so slots are sized by the data, not guessed.
Pipes rather than named semaphores, so a killed child leaves nothing behind but its ring, and the
parent owns every ring: it unlinks them when the child ends or is killed, so /dev/shm is left clean.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EventId, Frame, RunEnd

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from lcls_hitfinder.service.settings import ReaderSettings

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.5  # longest time frames() goes without yielding, so the service keeps heartbeating
_HEARTBEAT_PERIOD_S = 0.05
_STARTUP_GRACE_S = 30.0  # spawn + imports before the child's first heartbeat (a loaded 2-core machine)
_TERM_GRACE_S = 2.0  # a child asked to stop gets this long to finalize MPI before SIGKILL
_PR_SET_PDEATHSIG = 1  # prctl option: a signal for the child when its parent dies
_CTX = mp.get_context("spawn")  # never fork the service (torch, ZeroMQ and HTTP threads live there)


class ReadLoop(Protocol):
    """The child side of a source: opens the data and hands every event to `sink.put`.

    `resume_after` is the last event the parent received before a restart (None at first start); a
    replayable source (a file) skips up to and including it, a live one ignores it. Bad input (no
    such detector...) is raised as UserError and reaches the service as a one-line error.
    """

    def __call__(self, sink: FrameSink, resume_after: EventId | None) -> None: ...


class FrameSink:
    """Child side of the ring: `put` blocks while every slot is still in use by the parent."""

    def __init__(self, conn: Connection, acks: Connection, prefix: str, n_slots: int) -> None:
        self._conn = conn
        self._acks = acks
        self._in_flight = 0  # slots sent and not yet acknowledged by the parent
        self._prefix = prefix
        self._n_slots = n_slots
        self._ring: SharedMemory | None = None
        self._slot_bytes = 0
        self._generation = 0
        self._count = 0
        self._parent = os.getppid()

    def ready(self, description: str) -> None:
        """The data is open and the detector found: the parent's `open()` may return."""
        self._conn.send(("ready", description))

    def end_run(self, experiment: str, run: int) -> None:
        """The run's last event has been handed over (it is behind every frame already sent)."""
        self._conn.send(("run_end", experiment, run))

    def put(self, event: EventId, data: np.ndarray | None, truth: int | None, read_ns: int) -> None:
        """Hand one event over; `data` None (the detector is missing from this event) becomes an empty frame."""
        if data is None or data.size == 0:
            self._conn.send(("frame", -1, (0,), "<u2", event, truth, read_ns))
            return
        if data.nbytes > self._slot_bytes:
            self._new_ring(data.nbytes)
        self._wait_in_flight(self._n_slots - 1)
        assert self._ring is not None
        slot = self._count % self._n_slots
        self._count += 1
        view = np.ndarray(data.shape, data.dtype, buffer=self._ring.buf, offset=slot * self._slot_bytes)
        np.copyto(view, data, casting="no")
        del view  # no export of the buffer may outlive this call, or the ring could not be closed
        self._conn.send(("frame", slot, data.shape, data.dtype.str, event, truth, read_ns))
        self._in_flight += 1

    def _wait_in_flight(self, most: int) -> None:
        """Block until at most `most` slots are still unacknowledged."""
        while self._in_flight > most:
            if self._acks.poll(1.0):
                self._in_flight -= len(self._acks.recv_bytes())
            elif os.getppid() != self._parent:  # the service died: nobody will ever free a slot
                os._exit(3)

    def _new_ring(self, nbytes: int) -> None:
        if self._ring is not None:  # wait until the parent has copied out every slot of the old ring
            self._wait_in_flight(0)
            self._ring.close()
        self._generation += 1
        self._slot_bytes = -(-nbytes // 4096) * 4096
        name = f"{self._prefix}_{self._generation}"
        self._ring = SharedMemory(name=name, create=True, size=self._slot_bytes * self._n_slots)
        self._count = 0
        self._conn.send(("ring", name, self._slot_bytes))

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()  # the parent unlinks it


def _finalize_mpi() -> None:
    """psana always initialises MPI; finalizing before os._exit keeps /dev/shm/mpich_shm_* from leaking."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def _child_main(
    loop: ReadLoop,
    conn: Connection,
    acks: Connection,
    heartbeat: Synchronized[int],
    prefix: str,
    n_slots: int,
    resume_after: EventId | None,
) -> None:
    def beat() -> None:  # stops when the process is frozen with the GIL held: that is the point
        while True:
            heartbeat.value += 1
            time.sleep(_HEARTBEAT_PERIOD_S)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    # psana makes a multiprocessing.Value (with a lock) per run; under the 'fork' default its semaphore is
    # unlinked at once, so a child killed by the watchdog leaves none behind in /dev/shm
    mp.set_start_method("fork", force=True)
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the service, even when frozen in psana
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the service, which stops us in order
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    sink = FrameSink(conn, acks, prefix, n_slots)
    code = 0
    try:
        loop(sink, resume_after)
        conn.send(("end",))
    except UserError as err:
        conn.send(("error", str(err)))
        code = 2
    except SystemExit:
        pass
    except BaseException:
        with contextlib.suppress(OSError):  # the parent may be gone already
            conn.send(("crash", traceback.format_exc(limit=8)))
        code = 1
    sink.close()
    _finalize_mpi()
    os._exit(code)  # psana's reader threads may sit in blocking calls: do not join them


def remove_leftovers(pid: int, prefix: str) -> None:
    """Delete what a killed child leaves in /dev/shm: its ring segments and MPICH's per-pid files."""
    for path in glob.glob(f"/dev/shm/{prefix}_*") + glob.glob(f"/dev/shm/mpich_shm_{pid:x}_*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.path.basename(path).startswith(prefix):
                shm = SharedMemory(name=os.path.basename(path))  # unlink() also tells the resource tracker
                shm.close()
                shm.unlink()
            else:
                os.unlink(path)


@dataclass
class _Child:
    process: mp.process.BaseProcess
    conn: Connection
    acks: Connection
    heartbeat: Synchronized[int]
    prefix: str
    last_beat: int = 0
    last_beat_at: float = 0.0
    ring: SharedMemory | None = None
    slot_bytes: int = 0
    pending: list[tuple[Any, ...]] = field(default_factory=list)
    ended: bool = False  # the read loop returned: a file is done
    crash: str = ""  # last line of the child's traceback


class SupervisedReader:
    """Parent side: starts the child, turns ring slots into Frames, and restarts a stalled child.

    A `live` reader (shared memory) is restarted whenever it stalls or ends; a replayable one (a file)
    is restarted after a stall or a kill, resuming after the last event received, ends the iteration
    when the file is done and raises when psana fails on it. Restarts back off exponentially
    (`backoff_s` doubling up to `max_backoff_s`) until a restarted child delivers a frame again.
    """

    def __init__(self, loop: ReadLoop, settings: ReaderSettings, name: str, live: bool) -> None:
        self._loop = loop
        self._settings = settings
        self._name = name
        self._live = live
        self._child: _Child | None = None
        self._incarnation = 0
        self._failures = 0  # restarts since the last delivered frame, for the backoff
        self._restart_at: float | None = None
        self._last_event: EventId | None = None
        self._closed = False
        self.restarts = 0

    def start(self, wait_ready_s: float = 0.0) -> None:
        """Start the child; with `wait_ready_s`, wait that long for the data to open, so errors raise here."""
        self._spawn()
        child = self._child
        assert child is not None
        deadline = time.monotonic() + wait_ready_s
        while time.monotonic() < deadline:
            msg = self._next_message(child, 0.1)
            if msg is None:
                continue
            if msg[0] == "ready":
                log.info("%s: %s", self._name, msg[1])
                return
            if msg[0] == "error":
                self._handle_control(child, msg)
            child.pending.append(msg)
            if msg[0] == "eof":
                return

    def _spawn(self) -> None:
        self._incarnation += 1
        prefix = f"lhf_{os.getpid()}_{self._incarnation}"
        receiver, sender = _CTX.Pipe(duplex=False)
        ack_receiver, acks = _CTX.Pipe(duplex=False)
        heartbeat = _CTX.Value("Q", 0, lock=False)
        process = _CTX.Process(
            target=_child_main,
            args=(self._loop, sender, ack_receiver, heartbeat, prefix, self._settings.ring_slots, self._last_event),
            name=f"reader-{self._name}",
            daemon=True,
        )
        process.start()
        sender.close()  # the child holds the only write end: its death reads as EOF here
        ack_receiver.close()
        self._child = _Child(process, receiver, acks, heartbeat, prefix, last_beat_at=time.monotonic())
        self._restart_at = None

    def _next_message(self, child: _Child, timeout: float) -> tuple[Any, ...] | None:
        if child.pending:
            return child.pending.pop(0)
        if not child.conn.poll(timeout):
            return None
        try:
            msg: tuple[Any, ...] = child.conn.recv()
        except EOFError:  # the child is gone and everything it sent has been read
            return ("eof",)
        return msg

    def _stop_child(self, child: _Child, graceful: bool) -> None:
        proc = child.process
        if proc.is_alive() and graceful:
            proc.terminate()
            proc.join(_TERM_GRACE_S)
        if proc.is_alive():
            proc.kill()
        proc.join()
        child.conn.close()
        child.acks.close()
        if child.ring is not None:
            child.ring.close()
        if proc.pid is not None:
            remove_leftovers(proc.pid, child.prefix)
        self._child = None

    def _schedule_restart(self, why: str) -> None:
        if self._child is not None:
            self._stop_child(self._child, graceful=False)
        self._failures += 1
        self.restarts += 1
        s = self._settings
        delay = min(s.backoff_s * 2 ** (self._failures - 1), s.max_backoff_s)
        log.warning("%s: reader %s; restart %d in %.1f s", self._name, why, self.restarts, delay)
        self._restart_at = time.monotonic() + delay

    def _stalled(self, child: _Child) -> bool:
        now = time.monotonic()
        beat = child.heartbeat.value
        if beat != child.last_beat:
            child.last_beat, child.last_beat_at = beat, now
            return False
        limit = _STARTUP_GRACE_S if beat == 0 else self._settings.stall_s
        return now - child.last_beat_at > limit

    def _handle_control(self, child: _Child, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ring":
            if child.ring is not None:
                child.ring.close()
                child.ring.unlink()
            child.ring = SharedMemory(name=msg[1])
            child.slot_bytes = msg[2]
        elif kind == "ready":
            log.info("%s: %s", self._name, msg[1])
        elif kind == "end":
            child.ended = True
        elif kind == "error":
            self._stop_child(child, graceful=True)
            raise UserError(msg[1])
        elif kind == "crash":
            log.error("%s: reader failed:\n%s", self._name, msg[1])
            child.crash = msg[1].strip().splitlines()[-1]

    def _frame(self, child: _Child, msg: tuple[Any, ...]) -> Frame:
        _, slot, shape, dtype, event, truth, read_ns = msg
        if slot < 0:
            data = np.empty(shape, dtype)
        else:
            assert child.ring is not None
            data = np.ndarray(shape, dtype, buffer=child.ring.buf, offset=slot * child.slot_bytes).copy()
            with contextlib.suppress(OSError):  # a child that died meanwhile needs no acknowledgement
                child.acks.send_bytes(b"\x01")
        self._failures = 0
        self._last_event = event
        return Frame(event=event, data=data, read_ns=read_ns, truth_n_particles=truth)

    def _child_gone(self, child: _Child) -> bool:
        """Handle the end of a child; True when the iteration is over (a file read to its end)."""
        code = child.process.exitcode if not child.process.is_alive() else None
        self._stop_child(child, graceful=False)
        if not self._live and child.ended:
            return True
        if not self._live and child.crash:
            raise UserError(f"{self._name}: psana failed: {child.crash}")
        self._schedule_restart("reached the end of its data" if child.ended else f"exited (code {code})")
        return False

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        """Frames and run ends as they come, `None` at least every 0.5 s when none do; ends when a file is done."""
        stall = f"stalled (no heartbeat for {self._settings.stall_s:g} s)"
        while not self._closed:
            child = self._child
            if child is None:
                now = time.monotonic()
                if self._restart_at is not None and now >= self._restart_at:
                    self._spawn()
                    continue
                time.sleep(min(IDLE_TICK_S, (self._restart_at or now + IDLE_TICK_S) - now))
                yield None
                continue
            msg = self._next_message(child, IDLE_TICK_S)
            if msg is None:
                if self._stalled(child):
                    self._schedule_restart(stall)
                yield None
                continue
            if msg[0] == "frame":
                yield self._frame(child, msg)
            elif msg[0] == "run_end":
                yield RunEnd(experiment=msg[1], run=msg[2])
            elif msg[0] == "eof":
                if self._child_gone(child):
                    return
                continue
            else:
                self._handle_control(child, msg)
            if self._stalled(child):
                self._schedule_restart(stall)

    def close(self) -> None:
        """Stop the child (it finalizes MPI when it can) and remove everything it left in /dev/shm."""
        self._closed = True
        if self._child is not None:
            self._stop_child(self._child, graceful=True)


class SupervisedSource:
    """A `protocols.Source` whose read loop runs in a supervised child (the psana sources build on it)."""

    def __init__(
        self,
        uri: str,
        loop: ReadLoop,
        settings: ReaderSettings,
        live: bool,
        open_timeout_s: float,
        mask: np.ndarray | None = None,
    ) -> None:
        self.uri = uri
        self.frame_shape: tuple[int, ...] | None = None
        self.mask = mask
        self.restarts = 0
        self._open_timeout_s = 0.0 if live else open_timeout_s
        self._reader = SupervisedReader(loop, settings, uri, live)

    def open(self) -> None:
        """Start the reader; a replayable source waits until psana has opened the data (or failed to)."""
        self._reader.start(self._open_timeout_s)

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        for frame in self._reader.frames():
            self.restarts = self._reader.restarts
            if isinstance(frame, Frame) and self.frame_shape is None and frame.data.size:
                self.frame_shape = tuple(frame.data.shape)
            yield frame

    def close(self) -> None:
        self._reader.close()

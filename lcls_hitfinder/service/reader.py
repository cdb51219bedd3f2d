"""A source's read loop in a supervised child process, feeding the service through shared memory.

Why a child: psana's shared-memory client freezes its whole process with the GIL held when the
server goes away (and `DataSource(shmem=...)` does the same while no server is up), so no thread of
the service could even notice. The child runs a picklable `ReadLoop`; each frame is copied into one
fixed slot of a shared-memory ring (/dev/shm) and only its identity travels on a socket. A thread in
the child bumps its counter in a shared heartbeat segment; a watchdog thread of the parent watches it,
and when it stops (stall) kills the child, whose end `frames()` then meets (also in the middle of a
message the child never finished sending, where `frames()` itself is blocked): it cleans up after the
child and starts a new one with exponential backoff, counting restarts. Meanwhile `frames()` keeps
yielding `None` idle ticks at least every 0.5 s so the service goes on heartbeating.

Ring protocol: the child writes a free slot and sends (slot, shape, dtype, event, truth, read time);
the parent hands the slot back on the same socket (an acknowledgement: the ring's generation and the
slot) once the frame's pixels are no longer needed. Frames are lent: the Frame's data is a view of the
slot until the pipeline has read its pixels (`Frame.release`), which saves a copy of every frame. At
most three quarters of the ring is out on loan, so the child always has slots to write ahead into;
beyond that the reader waits for a slot to come back (a blocking service: the ring is then its buffer)
or, when it must not wait (overflow = drop) or none comes back in time, copies. A frame bigger than the
slots makes the child create a bigger ring (a new generation) and announce it, so slots are
sized by the data, not guessed; frames still lent from the old ring keep its memory mapped.
A socket pair rather than named semaphores, so a killed child leaves nothing behind but its ring, and
the parent owns every segment: it unlinks them when the child ends or is killed, so /dev/shm is left clean.

MPI (psana's parallel `exp=` mode): the child is `mpirun -n N` of service/mpi_rank.py. Every rank
connects back on a Unix socket and is one channel of its own (its ring, its heartbeat slot) into the
same `frames()`; the ranks are supervised as one child: a stalled rank restarts them all, a run ends
when every rank has finished it, and a restarted run skips the events already `Delivered`, which
big-data ranks hand over out of order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import logging
import mmap
import multiprocessing as mp
import os
import pickle
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EventId, Frame, RunEnd, RunKey

if TYPE_CHECKING:
    from lcls_hitfinder.service.binning import FrameBinner, ReaderBinning
    from lcls_hitfinder.service.settings import ReaderSettings, ServeSettings

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.5  # longest time frames() goes without yielding, so the service keeps heartbeating
_HEARTBEAT_PERIOD_S = 0.05
MAX_FRAME_SHAPES = 4  # binnings kept at once (here and in the service), a frame shape each: runs of other
# detector settings, not every broken frame
_STARTUP_GRACE_S = 30.0  # spawn + imports before the child's first heartbeat (a loaded 2-core machine)
_TERM_GRACE_S = 2.0  # a child asked to stop gets this long to finalize MPI before SIGKILL
_EXIT_GRACE_S = 10.0  # a child that hung up on its own gets this long to exit (MPI ranks finalize together)
_COUNTERS = np.dtype((np.uint64, 3))  # a channel's heartbeat, its Progress and whether it is done, in the
# heartbeat segment
_PR_SET_PDEATHSIG = 1  # prctl option: a signal for the child when its parent dies
_CTX = mp.get_context("spawn")  # never fork the service (torch, ZeroMQ and HTTP threads live there)


class Delivered:
    """The events that reached the service: per run (experiment, run number), every event below a contiguous
    count from 0, plus those beyond it (MPI ranks deliver their batches out of order). A restarted reader of a
    replayable source skips them, so a restart neither repeats nor loses an event; a live one numbers on after
    them."""

    def __init__(self) -> None:
        self._below: dict[RunKey, int] = {}
        self._beyond: dict[RunKey, set[int]] = {}

    def add(self, run: RunKey, event: int) -> None:
        below = self._below.get(run, 0)
        if event < below:
            return
        beyond = self._beyond.setdefault(run, set())
        beyond.add(event)
        while below in beyond:
            beyond.remove(below)
            below += 1
        self._below[run] = below

    def __contains__(self, key: tuple[RunKey, int]) -> bool:
        run, event = key
        return event < self._below.get(run, 0) or event in self._beyond.get(run, ())

    def __len__(self) -> int:
        return sum(self._below.values()) + sum(len(b) for b in self._beyond.values())

    def next_index(self, run: RunKey) -> int:
        """The index after the last event of `run` delivered: where a live reader restarted mid-run goes on
        counting, so that (experiment, run, event) stays unique. A run of another experiment with the same
        number starts from 0."""
        beyond = self._beyond.get(run)
        return max(self._below.get(run, 0), max(beyond) + 1 if beyond else 0)


class ReadLoop(Protocol):
    """The child side of a source: opens the data and hands every event to `sink.put`.

    `delivered` holds the events the parent received before a restart (empty at first start); a
    replayable source (a file) skips them, a live one ignores it. Bad input (no such detector...) is
    raised as UserError and reaches the service as a one-line error.
    """

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None: ...


def _map_segment(name: str, size: int = 0) -> mmap.mmap:
    """Map /dev/shm/`name`, creating it when `size` is given, behind multiprocessing's resource tracker: an MPI
    rank's own tracker would unlink the service's segments when the rank exits. The parent owns and
    unlinks every segment."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size else 0)
    path = f"/dev/shm/{name}"
    fd = os.open(path, flags, 0o600)
    try:
        if size:
            # Its pages now, or ENOSPC now: a sparse segment that outgrows /dev/shm (a container's shm_size)
            # kills the process that touches the page beyond it with SIGBUS, frames later.
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size or os.fstat(fd).st_size)
    except BaseException:
        if size:
            with contextlib.suppress(OSError):  # the error that brought us here is the one to see
                os.unlink(path)
        raise
    finally:
        os.close(fd)


class Progress:
    """A channel's progress counter, beside its heartbeat in the heartbeat segment: moved by every message to or
    from the service, by every event the read loop reads without handing it over (`FrameSink.progress`) and,
    while the channel waits for the service, by the heartbeat too; still only while the channel waits inside
    psana. So the parent tells an MPI job whose ranks wait on each other for ever (they still beat) from one
    that reads, or one the service holds back."""

    def __init__(self, counter: np.ndarray | None = None) -> None:
        self._counter = np.zeros(1, np.uint64) if counter is None else counter
        self.waiting = False

    def tick(self) -> None:
        self._counter[0] += 1

    @contextlib.contextmanager
    def on_service(self) -> Iterator[None]:
        """Around a message, or a wait for one: the service, not psana, has the channel."""
        self.waiting = True
        self.tick()
        try:
            yield
        finally:
            self.waiting = False
            self.tick()


def _ack(generation: int, slot: int) -> bytes:
    """An acknowledgement: `slot` of ring `generation` is free again."""
    return np.uint32((generation & 0xFFFF) << 16 | slot).tobytes()


class FrameSink:
    """Child side of the ring: `put` blocks while every slot is still in use by the parent.

    Once the data is open (`ready`) the reader waits for the service's go, which carries the binning to use
    (or None): so a file's first frames are not read before the service has said how it wants them.
    With a `ReaderBinning` the reader shares the binning with the service, or with `always` takes all of it:
    while more than a quarter of the ring's slots hold frames the service has not finished (it is behind),
    frames are binned here, with the service's own code (service/binning.py), and only their bins cross, by
    message: no slot, no copy of the frame; otherwise they cross whole and the service's threads bin them.
    So both sides stay busy: on two cores binning every frame here made the reader the bottleneck
    (BENCHMARKS.md, "Binning shared with the reader"). Frames it cannot bin (not numeric, or of a shape beyond
    the first few it met) always cross whole, for the service to judge.
    """

    def __init__(
        self,
        conn: Connection,
        prefix: str,
        n_slots: int,
        binning: ReaderBinning | None = None,
        go: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self._conn = conn  # messages out; acknowledgements (4 bytes each) and the go (pickled binning or None) in
        self._incoming = select.poll()
        self._incoming.register(conn.fileno(), select.POLLIN)
        self._free: deque[int] = deque()  # slots of the current ring the parent has handed back
        self._prefix = prefix
        self._n_slots = n_slots  # asked for; a ring has fewer where /dev/shm has no room for them (_ring_slots)
        self._ring_slots = 0
        self._ring: mmap.mmap | None = None
        self._slot_bytes = 0
        self._generation = 0
        self._binning: ReaderBinning | None = None
        self._binners: dict[tuple[int, ...], FrameBinner] = {}  # by shape: a new run may bring another
        self._go = go  # a reader restarted while the service reads has its go (and binning) from the start
        self._progress = Progress() if progress is None else progress
        if binning is not None:
            self._bin_with(binning)

    def ready(self, description: str) -> None:
        """The data is open and the detector found: the parent's `open()` may return. Then wait for its go."""
        self._send(("ready", description))
        while not self._go:
            self._receive()

    def end_run(self, experiment: str, run: int) -> None:
        """The run's last event has been handed over (it is behind every frame already sent); the next run
        may bring other shapes."""
        self._send(("run_end", experiment, run))
        self._binners.clear()

    def put(self, event: EventId, data: np.ndarray | None, truth: int | None, read_ns: int) -> None:
        """Hand one event over; `data` None (the detector is missing from this event) becomes an empty frame."""
        while self._incoming.poll(0):
            self._receive()
        if data is None or data.size == 0:
            self._send(("frame", -1, (0,), "<u2", event, truth, read_ns))
            return
        binner = self._binner_for(data) if self._shares_binning() else None
        if binner is not None:
            self._send(("binned", event, truth, read_ns, binner.bin(data)))
            return
        if data.nbytes > self._slot_bytes:
            self._new_ring(data.nbytes)
        assert self._ring is not None
        slot = self._free_slot()
        view = np.ndarray(data.shape, data.dtype, buffer=self._ring, offset=slot * self._slot_bytes)
        np.copyto(view, data, casting="no")
        del view  # no export of the buffer may outlive this call, or the ring could not be closed
        self._send(("frame", slot, data.shape, data.dtype.str, event, truth, read_ns))

    def progress(self) -> None:
        """The read loop is working without handing anything over (an event skipped, delivered before a restart;
        the smalldata being indexed): progress for the supervisor all the same."""
        self._progress.tick()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._progress.on_service():  # blocks while the service's end of the pipe is full
            self._conn.send(message)

    def _shares_binning(self) -> bool:
        """Whether to bin this frame here: always, or while the service holds more than a quarter of the ring."""
        if self._binning is None or self._binning.always:
            return self._binning is not None
        return self._ring is not None and self._ring_slots - len(self._free) > self._ring_slots // 4

    def _binner_for(self, data: np.ndarray) -> FrameBinner | None:
        """The binner for this frame's shape, built when first met (a few shapes a run at most: frames of yet
        other shapes go whole, and the service decides them), None for frames it cannot bin."""
        if self._binning is None or data.dtype.kind not in "uif" or data.ndim not in (2, 3):
            return None
        shape = tuple(data.shape)
        binner = self._binners.get(shape)
        if binner is None and len(self._binners) < MAX_FRAME_SHAPES:
            binner = self._binners[shape] = self._binning.binner(shape)
        return binner

    def _bin_with(self, binning: ReaderBinning) -> None:
        import torch  # loaded with the binning's code (child_main's may_bin), so this costs nothing more

        torch.set_num_threads(1)  # one reader, one core: torch's own threads would wait for each other
        self._binning = binning

    def _receive(self) -> None:
        """One message from the parent: a slot handed back, or the go with the binning to use (or None)."""
        try:
            with self._progress.on_service():
                message = self._conn.recv_bytes()
        except (EOFError, OSError):  # the service is gone: nobody will ever free a slot
            os._exit(3)
        if len(message) != 4:
            self._go = True
            _, binning = pickle.loads(message)
            if binning is not None:
                self._bin_with(binning)
            return
        ack = int(np.frombuffer(message, np.uint32)[0])
        if ack >> 16 == self._generation & 0xFFFF:  # a slot of an old ring is nothing to us
            self._free.append(ack & 0xFFFF)

    def _free_slot(self) -> int:
        """A slot of the current ring that the parent is done with, the one it handed back last: that one is still
        in the CPU's cache (the service has just read it), where the oldest free slot of a 64-slot ring is not
        (1.3x the frames a second of handing them out in turn, BENCHMARKS.md). Blocks while the parent holds
        them all."""
        while not self._free:
            self._receive()
        return self._free.pop()

    def _new_ring(self, nbytes: int) -> None:
        if self._ring is not None:  # the parent keeps the old ring mapped while it still holds frames of it
            self._ring.close()
        self._generation += 1
        self._slot_bytes = -(-nbytes // 4096) * 4096
        name = f"{self._prefix}_{self._generation}"
        slots = self._n_slots
        while True:  # as many slots as /dev/shm has room for, halving down to two
            try:
                self._ring = _map_segment(name, self._slot_bytes * slots)
                break
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.ENOMEM):  # ENOMEM: a container's memory limit on tmpfs
                    raise
                if slots == 2:
                    room = shutil.disk_usage("/dev/shm").free
                    raise UserError(
                        f"/dev/shm has no room for the reader's ring: 2 frames of {self._slot_bytes >> 20} MiB, "
                        f"{room >> 20} MiB free (a container's shm_size; serve.reader.ring_slots)"
                    ) from None
                slots = max(2, slots // 2)
        self._ring_slots = slots
        self._free = deque(range(slots))
        self._send(("ring", name, self._slot_bytes, slots))

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()  # the parent unlinks it


def _finalize_mpi() -> None:
    """psana always initialises MPI; finalizing before os._exit keeps /dev/shm/mpich_shm_* from leaking."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


try:  # looked up once here: _die_with_parent also runs between fork and exec, where dlopen is not safe
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, even while frozen in psana with the GIL held."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def child_main(
    loop: ReadLoop,
    conn: Connection,
    heartbeat: str,
    index: int,
    prefix: str,
    n_slots: int,
    delivered: Delivered,
    binning: ReaderBinning | None = None,
    go: bool = False,
    may_bin: bool = False,
) -> None:
    """Run `loop` in this process (the reader child, or one MPI rank), beating slot `index` of `heartbeat`.
    `may_bin`: the service may ask for binning, so its code (and torch) is loaded now, before the data is open:
    loaded on the go, live data would flow past while it loads (seconds)."""
    counters = np.ndarray((3,), np.uint64, buffer=_map_segment(heartbeat), offset=_COUNTERS.itemsize * index)
    progress = Progress(counters[1:])

    def beat() -> None:  # stops when the process is frozen with the GIL held: that is the point
        while True:
            counters[0] += 1
            if progress.waiting:
                progress.tick()
            time.sleep(_HEARTBEAT_PERIOD_S)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    # psana makes a multiprocessing.Value (with a lock) per run; under the 'fork' default its semaphore is
    # unlinked at once, so a child killed by the watchdog leaves none behind in /dev/shm
    mp.set_start_method("fork", force=True)
    _die_with_parent()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the service, which stops us in order
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    if may_bin:
        import lcls_hitfinder.service.binning  # noqa: F401

    sink = FrameSink(conn, prefix, n_slots, binning, go, progress)
    code = 0
    outcome: tuple[str, ...] | None = None  # what the service hears of the end: nothing after a SIGTERM
    try:
        loop(sink, delivered)
        outcome = ("end",)
    except UserError as err:
        code, outcome = 2, ("error", str(err))
    except SystemExit:
        pass
    except BaseException:
        code, outcome = 1, ("crash", traceback.format_exc(limit=8))
    counters[2] = 1  # done: its heartbeat stops now, which is no stall, though the service may read this later
    if outcome is not None:
        with contextlib.suppress(OSError), progress.on_service():  # the parent may be gone already, or busy
            conn.send(outcome)
    sink.close()
    _finalize_mpi()
    os._exit(code)  # psana's reader threads may sit in blocking calls: do not join them


def remove_leftovers(prefix: str, pid: int | None = None) -> None:
    """Delete what a killed child leaves in /dev/shm: its segments (rings, heartbeats, the ranks' socket) and,
    given the child's `pid`, MPICH's per-pid files."""
    mpich = glob.glob(f"/dev/shm/mpich_shm_{pid:x}_*") if pid is not None else []
    for path in glob.glob(f"/dev/shm/{prefix}_*") + mpich:
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.path.basename(path).startswith(prefix) and not path.endswith("_ranks"):
                shm = SharedMemory(name=os.path.basename(path))  # unlink() also tells the resource tracker
                shm.close()
                shm.unlink()
            else:
                os.unlink(path)


ORPHAN_AGE_S = 60.0
"""A reader's segments younger than this are never removed as orphans: one that is starting may not hold its lock
yet."""


def remove_orphans() -> int:
    """Delete the /dev/shm segments of readers that are gone; returns how many.

    The resource tracker removes a killed service's segments, but a SIGKILL to its whole cgroup (systemd's final
    kill) takes the tracker too, and a service restarted in a loop would then fill /dev/shm ring by ring. A live
    reader holds a lock on its heartbeat segment (`_hold`); a pid cannot tell, as /dev/shm may be shared with
    services in other PID namespaces (containers with the host's IPC)."""
    removed = 0
    for heartbeat in glob.glob("/dev/shm/lhf_*_hb"):
        try:
            if time.time() - os.stat(heartbeat).st_mtime < ORPHAN_AGE_S:
                continue
            fd = os.open(heartbeat, os.O_RDONLY)
        except OSError:  # gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its reader is alive
        finally:
            os.close(fd)
        prefix = os.path.basename(heartbeat)[: -len("_hb")]
        before = len(glob.glob(f"/dev/shm/{prefix}_*"))
        remove_leftovers(prefix)
        removed += before - len(glob.glob(f"/dev/shm/{prefix}_*"))
    return removed


def _hold(segment: str) -> int:
    """A shared lock on /dev/shm/`segment`, held while the returned descriptor is open: says "alive" to
    `remove_orphans` of any process that shares /dev/shm."""
    fd = os.open(f"/dev/shm/{segment}", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


class MpiRun:
    """`mpirun -n N` of service/mpi_rank.py, handled like a multiprocessing child: each rank sits in a process
    group of its own (hydra's doing), so signals go to mpirun and to every rank that has said hello."""

    def __init__(self, ranks: int, address: str) -> None:
        mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
        if mpirun is None:
            raise UserError("psana's MPI mode needs mpirun: pip install mpich (the psana extra installs it)")
        env = {**os.environ, "PS_EB_NODES": "1", "PS_SRV_NODES": "0"}
        env.pop("PS_PARALLEL", None)
        command = [mpirun, "-n", str(ranks), sys.executable, "-m", "lcls_hitfinder.service.mpi_rank", address]
        # preexec_fn only calls the prctl found at import: mpirun dies with the service, its proxies take the ranks
        self._proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.pid = self._proc.pid
        self.ranks: list[int] = []  # pids of the ranks that connected

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll()

    def _signal(self, signum: int) -> None:
        """To mpirun until it is reaped and to the ranks still running: a pid gone may be another process's."""
        self._proc.send_signal(signum)  # Popen's: nothing once the process has been waited for
        for pid in self.ranks:
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        deadline = time.monotonic() + (timeout if timeout is not None else 10.0)
        for pid in self.ranks:  # the ranks are mpirun's grandchildren: wait until they are gone too
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)


def _track(path: str) -> None:
    """Have multiprocessing's resource tracker (a process of its own) unlink `path`, a file in /dev/shm, should
    the service die without doing it (SIGKILL): MPICH's segments and the ranks' socket are not the tracker's
    own, but it removes any /dev/shm name it is given."""
    resource_tracker.register("/" + os.path.basename(path), "shared_memory")


def _remove_tracked(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    resource_tracker.unregister("/" + os.path.basename(path), "shared_memory")


def _mpich_segments(pid: int) -> list[str]:
    """The MPICH shared-memory files that process `pid` has mapped: ranks of one job share a segment named by
    a hash, not a pid (3 MB each), which a killed job leaves in /dev/shm."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sorted({line.split()[-1] for line in f if "/dev/shm/mpich_shm_" in line})
    except OSError:
        return []


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a container's init may never reap one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class _Channel:
    """One producer of frames: the reader child, or one MPI rank.

    Slots are handed back from the pipeline's worker thread (`Frame.release`) while the reader thread
    receives on the same socket: sends, the socket's closing and waiting for a loan to end go under `loans`.
    """

    conn: Connection
    index: int  # its heartbeat slot (the MPI rank); -1 until an MPI rank says hello
    pid: int | None = None
    ring: mmap.mmap | None = None  # the parent's own mapping: frames lent from it are views of it
    ring_shm: SharedMemory | None = None  # the same segment, kept (closed) to unlink it
    slot_bytes: int = 0
    lend_most: int = 0  # slots of the current ring the pipeline may hold
    generation: int = 0  # rings announced so far: acknowledgements name theirs
    lent: set[int] = field(default_factory=set)  # slots of the current ring out on loan
    closed: bool = False  # everything the producer sent has been read
    shut: bool = False  # the socket is closed: nothing more is handed back
    loans: threading.Condition = field(default_factory=threading.Condition)

    def lend(self, slot: int, most: int, wait_s: float) -> bool:
        """Whether `slot` may stay lent to the pipeline: fewer than `most` are out, now or within `wait_s`."""
        with self.loans:
            if not self.loans.wait_for(lambda: len(self.lent) < most, wait_s):
                return False
            self.lent.add(slot)
            return True

    def hand_back(self, generation: int, slot: int, lent: bool = True) -> None:
        """Slot `slot` of ring `generation` is free again (a loan ends or a frame was copied out)."""
        with self.loans:
            if self.shut or generation != self.generation or (lent and slot not in self.lent):
                return  # that child is gone, or its ring replaced: nobody waits for this slot
            self.lent.discard(slot)
            self.loans.notify()
            with contextlib.suppress(OSError):  # a child that died meanwhile needs no acknowledgement
                self.conn.send_bytes(_ack(generation, slot))

    def new_ring(self, name: str, slot_bytes: int, slots: int) -> None:
        """Map the ring the producer announced; the old one is unlinked (frames still lent keep it mapped)."""
        self.drop_ring()
        self.ring_shm = SharedMemory(name=name)  # registers the segment: a killed service leaves no ring behind
        self.ring_shm.close()
        self.ring = _map_segment(name)
        with self.loans:
            self.generation += 1
            self.lent.clear()
            self.loans.notify()
        self.slot_bytes = slot_bytes
        self.lend_most = slots - max(1, slots // 4)  # the producer keeps the rest to read on into

    def drop_ring(self) -> None:
        # not closed: numpy's views hold no buffer export, so closing would unmap frames still lent; the
        # mapping goes when the last of them does (each view references it)
        self.ring = None
        if self.ring_shm is not None:
            with contextlib.suppress(FileNotFoundError):
                self.ring_shm.unlink()
            self.ring_shm = None

    def shut_down(self) -> None:
        with self.loans:
            self.shut = True
            self.conn.close()
        self.drop_ring()


@dataclass
class _Child:
    process: mp.process.BaseProcess | MpiRun
    heartbeat: SharedMemory
    counters: np.ndarray  # per channel its heartbeat, Progress and done (`_COUNTERS`), in `heartbeat`
    prefix: str
    expected: int  # channels it will have: 1, or the MPI ranks
    started_at: float
    lock: int  # descriptor holding the heartbeat's lock (`_hold`)
    listener: socket.socket | None = None  # MPI: where the ranks connect
    socket_path: str | None = None  # in /dev/shm, tracked
    channels: list[_Channel] = field(default_factory=list)
    pending: list[tuple[_Channel | None, tuple[Any, ...]]] = field(default_factory=list)
    last_beats: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    last_change: np.ndarray = field(default_factory=lambda: np.zeros(0))
    finished: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # slots no longer watched
    first_finished: tuple[int, float] | None = None  # the channel that finished first, and when
    last_progress: tuple[bytes, int] = (b"", 0)  # the channels' Progress counters and how many processes run
    progress_at: float = 0.0  # when that last changed
    ended: int = 0  # channels whose read loop returned (a file is done when all have)
    run_ends: Counter[RunKey] = field(default_factory=Counter)
    crash: str = ""  # last line of a channel's traceback
    mpich: set[str] = field(default_factory=set)  # MPICH's shared-memory files of the ranks
    stalled: str = ""  # why the watchdog killed it
    stopped: bool = False  # _stop_child has run (or runs): once only

    def note_mpich(self, paths: list[str]) -> None:
        """MPICH segments of the ranks, tracked so that they go even when the service is killed."""
        for path in set(paths) - self.mpich:
            _track(path)
            self.mpich.add(path)

    def __post_init__(self) -> None:
        self.last_beats = self.counters[:, 0].copy()
        self.last_change = np.full(self.expected, self.started_at)
        self.finished = np.zeros(self.expected, bool)


class SupervisedReader:
    """Parent side: starts the child, turns ring slots into Frames, and restarts a stalled child.

    A `live` reader (shared memory) is restarted whenever it stalls or ends; a replayable one (a file)
    is restarted after a stall or a kill, skipping the events already received, ends the iteration
    when the file is done and raises when psana fails on it. Restarts back off exponentially
    (`backoff_s` doubling up to `max_backoff_s`) until a restarted child delivers a frame again.
    `mpi_ranks` >= 3 runs the loop in that many MPI ranks (psana's parallel mode) instead of one child.
    `block`: with most of the ring lent, wait for the consumer to release a frame (up to an idle tick)
    rather than copy the next one; a blocking service then buffers its frames in the ring.
    `may_bin`: the service may ask the readers to bin (`bin_at_reader`), so they load that code at start.
    The readers read nothing before `frames()` is first iterated (their go, which carries the binning).
    """

    def __init__(
        self,
        loop: ReadLoop,
        settings: ReaderSettings,
        name: str,
        live: bool,
        mpi_ranks: int = 0,
        block: bool = False,
        may_bin: bool = False,
    ) -> None:
        self._loop = loop
        self._may_bin = may_bin  # the service may ask the readers to bin: they load the code at start
        self._settings = settings
        self._name = name
        self._live = live
        self._mpi_ranks = mpi_ranks
        self._child: _Child | None = None
        self._incarnation = 0
        self._token = secrets.token_hex(3)  # in segment names: pids repeat across containers sharing /dev/shm
        self._failures = 0  # restarts since the last delivered frame, for the backoff
        self._restart_at: float | None = None
        self._delivered = Delivered()
        self._closed = False
        self._stopping = threading.Lock()  # close() may come from another thread while frames() stops a child
        self._lend_most = settings.ring_slots - max(1, settings.ring_slots // 4)  # slots the pipeline may hold
        self._lend_wait_s = IDLE_TICK_S if block else 0.0
        self._binning: ReaderBinning | None = None
        self._going = False  # frames() has begun: the readers have had their go
        self.restarts = 0

    def bin_at_reader(self, binning: ReaderBinning) -> None:
        """Have the readers bin frames (FrameSink) from their go on: call before iterating `frames()`."""
        self._binning = binning

    def _go(self, child: _Child) -> None:
        """Let the readers that have said hello read on, with the binning; those that come later get it in their
        setup (MPI ranks), and so do restarted ones."""
        message = pickle.dumps(("go", self._binning))  # never 4 bytes long, as an acknowledgement is
        for channel in child.channels:
            with channel.loans:
                if channel.index >= 0 and not channel.shut:  # a rank before its hello waits for its setup
                    with contextlib.suppress(OSError):  # one that died meanwhile is restarted with its go
                        channel.conn.send_bytes(message)

    def start(self, wait_ready_s: float = 0.0, cancel: threading.Event | None = None) -> None:
        """Start the child; with `wait_ready_s`, wait that long for the data to open, so errors raise here.
        Once `cancel` is set the child is not started, or no longer waited for (`close()` stops it)."""
        removed = remove_orphans()
        if removed:
            log.warning("removed %d /dev/shm segments left by services that are gone", removed)
        if cancel is not None and cancel.is_set():
            return
        self._spawn()
        child = self._child
        assert child is not None
        deadline = time.monotonic() + wait_ready_s
        while time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
            got = self._next_message(child, 0.1)
            if got is None:
                continue
            channel, msg = got
            if msg[0] == "ready":
                self._handle_control(child, channel, msg)
                return
            if msg[0] in ("error", "hello", "crash"):  # a rank waits for its answer; a crash's eof follows
                self._handle_control(child, channel, msg)
                continue
            if msg[0] == "eof" and child.crash and not self._live:
                self._child_gone(child)  # raises: a file that fails to open fails so every time, no restarts
            child.pending.append(got)  # eof, end: read in order by `frames` (taken again here, it spun)
            return

    def _spawn(self) -> None:
        self._incarnation += 1
        prefix = f"lhf_{os.getpid()}_{self._token}_{self._incarnation}"
        expected = self._mpi_ranks or 1
        with contextlib.ExitStack() as undo:  # what was made for a process that fails to start goes again
            heartbeat = SharedMemory(name=f"{prefix}_hb", create=True, size=_COUNTERS.itemsize * expected)  # zeros
            undo.callback(heartbeat.unlink)
            undo.callback(heartbeat.close)
            lock = _hold(f"{prefix}_hb")
            undo.callback(os.close, lock)
            process, listener, address, conn = self._start_process(prefix, heartbeat.name)
            undo.pop_all()
        counters = np.ndarray((expected, 3), np.uint64, buffer=heartbeat.buf)
        self._child = _Child(process, heartbeat, counters, prefix, expected, time.monotonic(), lock, listener, address)
        if conn is not None:
            self._child.channels.append(_Channel(conn, 0, process.pid))
        self._restart_at = None
        if self._going:  # a restart: watched from its start (a first child from the go, after opening)
            self._start_watchdog(self._child)

    def _start_process(
        self, prefix: str, heartbeat: str
    ) -> tuple[mp.process.BaseProcess | MpiRun, socket.socket | None, str | None, Connection | None]:
        """The reader process, with the MPI ranks' listener and its path, or the one reader's end of its pipe;
        what it opened is closed again if it fails to start."""
        if self._mpi_ranks:
            address = f"/dev/shm/{prefix}_ranks"  # beside the rings: gone with them, also if the service is killed
            with contextlib.ExitStack() as undo:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                undo.callback(listener.close)
                listener.bind(address)
                _track(address)
                undo.callback(_remove_tracked, address)
                listener.listen(self._mpi_ranks)
                listener.setblocking(False)
                run = MpiRun(self._mpi_ranks, address)
                undo.pop_all()
            return run, listener, address, None
        here, there = _CTX.Pipe(duplex=True)
        process = _CTX.Process(
            target=child_main,
            args=(
                self._loop,
                there,
                heartbeat,
                0,
                f"{prefix}_0",
                self._settings.ring_slots,
                self._delivered,
                self._binning,
                self._going,
                self._may_bin,
            ),
            name=f"reader-{self._name}",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            here.close()
            raise
        finally:
            there.close()  # the child holds the only other end: its death reads as EOF here
        return process, None, None, here

    def _start_watchdog(self, child: _Child) -> None:
        threading.Thread(target=self._watch, args=(child,), name=f"watchdog-{self._name}", daemon=True).start()

    def _next_message(self, child: _Child, timeout: float) -> tuple[_Channel | None, tuple[Any, ...]] | None:
        """The next message of any channel; ("eof",) once the child is gone and all it sent has been read."""
        if child.pending:
            return child.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            open_conns = [ch.conn for ch in child.channels if not ch.closed]
            waiting = open_conns + ([child.listener] if child.listener is not None else [])
            if not open_conns and (len(child.channels) == child.expected or not child.process.is_alive()):
                child.process.join(_EXIT_GRACE_S)
                return None, ("eof",)
            ready = wait(waiting, max(deadline - time.monotonic(), 0.0))
            if not ready:
                if not open_conns and not child.process.is_alive():
                    return None, ("eof",)  # mpirun ended before every rank connected
                return None
            for obj in ready:
                if obj is child.listener:
                    self._accept(child)
                    continue
                channel = next(ch for ch in child.channels if ch.conn is obj)
                try:
                    msg: tuple[Any, ...] = channel.conn.recv()
                except (EOFError, OSError):  # that producer is gone and everything it sent has been read
                    channel.closed = True
                    self._finish(child, channel)
                    continue
                child.channels.remove(channel)  # served last: the next wait serves the other ranks first
                child.channels.append(channel)
                return channel, msg

    def _accept(self, child: _Child) -> None:
        assert child.listener is not None
        with contextlib.suppress(BlockingIOError):
            sock, _ = child.listener.accept()
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():  # /dev/shm is everyone's: only our own ranks may talk (pickles) to us
                log.warning("%s: refused a connection from uid %d on the ranks' socket", self._name, uid)
                sock.close()
                return
            sock.setblocking(True)
            child.channels.append(_Channel(Connection(sock.detach()), -1))
        if len(child.channels) == child.expected:
            child.listener.close()
            child.listener = None

    def _finish(self, child: _Child, channel: _Channel) -> None:
        """A channel that ended is no longer watched for stalls."""
        if channel.index >= 0:
            self._mark_finished(child, channel.index)

    @staticmethod
    def _mark_finished(child: _Child, index: int) -> None:
        if not child.finished[index]:
            child.finished[index] = True
            if child.first_finished is None:
                child.first_finished = (index, time.monotonic())

    def _stop_child(self, child: _Child, graceful: bool) -> None:
        """Stop a child and clean up after it, once: a second caller (close() from another thread while
        frames() stops the same child) waits until the first is done."""
        with self._stopping:
            if not child.stopped:
                child.stopped = True
                self._clean_up(child, graceful)
            if self._child is child:
                self._child = None

    def _clean_up(self, child: _Child, graceful: bool) -> None:
        proc = child.process
        pids = {pid for pid in (proc.pid, *(ch.pid for ch in child.channels)) if pid is not None}
        child.note_mpich([path for pid in pids for path in _mpich_segments(pid)])  # before the processes go
        if proc.is_alive() and graceful:
            proc.terminate()
            proc.join(_TERM_GRACE_S)
        if proc.is_alive():
            proc.kill()
        proc.join()
        if isinstance(proc, MpiRun):
            proc.kill()  # ranks that outlived mpirun
            proc.join()
        for channel in child.channels:
            channel.shut_down()
        if child.listener is not None:
            child.listener.close()
        if child.socket_path is not None:
            _remove_tracked(child.socket_path)
        del child.counters
        child.heartbeat.close()
        os.close(child.lock)
        for pid in pids:
            remove_leftovers(child.prefix, pid)
        for path in child.mpich:  # MPICH removes its segment at a clean exit, but not always, nor when killed
            _remove_tracked(path)

    def _schedule_restart(self, why: str) -> None:
        """Stop the child and start a new one after a backoff. Data that can be read again (a file, a run)
        whose reader keeps failing without delivering anything fails instead: it will not get better, and
        a service that waits for it for ever looks alive while it decides nothing."""
        child = self._child  # read once: close() may clear it from another thread
        if child is not None:
            self._stop_child(child, graceful=False)
        if self._closed:  # the child went because the source was closed: nothing to restart
            return
        if not self._live and self._failures + 1 >= self._settings.give_up_after:
            raise UserError(
                f"{self._name}: the reader {why}, {self._failures + 1} times in a row without delivering a frame"
            )
        self._failures += 1
        self.restarts += 1
        s = self._settings
        delay = min(s.backoff_s * 2 ** (self._failures - 1), s.max_backoff_s)
        log.warning("%s: reader %s; restart %d in %.1f s", self._name, why, self.restarts, delay)
        self._restart_at = time.monotonic() + delay

    def _stalled(self, child: _Child) -> bool:
        """Whether a channel that is still reading has not beaten for `stall_s` (30 s before its first beat)."""
        now = time.monotonic()
        beats = child.counters[:, 0].copy()
        child.last_change[beats != child.last_beats] = now
        child.last_beats = beats
        limit = np.where(beats == 0, _STARTUP_GRACE_S, self._settings.stall_s)
        return bool(((now - child.last_change > limit) & ~child.finished).any())

    def _stuck(self, child: _Child) -> str:
        """Why the job is stuck, or "". Once one rank (or the one reader) has finished, the job must make Progress
        within `stuck_s`: read or hand over an event, wait for the service, or lose a process. MPI ranks that
        only wait on each other, still beating, would otherwise hold a run for ever (seen once in CI: smd0 read
        no event and no EndRun of a complete file, and the other ranks never ended), and so would a finished
        rank that never exits (MPI_Finalize waiting for a peer)."""
        if child.first_finished is None:
            return ""
        pids = child.process.ranks if isinstance(child.process, MpiRun) else [child.process.pid]
        running = [pid for pid in list(pids) if pid is not None and _running(pid)]
        if not running:
            return ""  # the job is over: frames() reads its end
        now = time.monotonic()
        progress = (child.counters[:, 1].tobytes(), len(running))
        if progress != child.last_progress:
            child.last_progress, child.progress_at = progress, now
        rank, since = child.first_finished
        limit = self._settings.stuck_s
        if now - max(child.progress_at, since) <= limit:
            return ""
        return f"stuck (no progress for {limit:g} s since rank {rank} finished; {len(running)} process(es) still up)"

    def _watch(self, child: _Child) -> None:
        """Kill the child once it stalls, from beside the thread reading it: that one may be blocked in the
        middle of a message a frozen child never finishes, where no check of its own would ever run."""
        while True:
            time.sleep(_HEARTBEAT_PERIOD_S)
            with self._stopping:  # the heartbeat segment goes with the child's clean-up
                if child.stopped:
                    return
                for index in np.flatnonzero(child.counters[:, 2]):  # done, its last messages maybe not read yet
                    self._mark_finished(child, int(index))
                if self._stalled(child):
                    never = self._live and not len(self._delivered)  # a tag nobody serves looks like a freeze
                    child.stalled = f"stalled (no heartbeat for {self._settings.stall_s:g} s)" + (
                        " before any event: is the live source served here?" if never else ""
                    )
                else:
                    child.stalled = self._stuck(child)
                if child.stalled:
                    child.process.kill()  # its sockets close: frames() reads their end and restarts it
                    return

    def _handle_control(self, child: _Child, channel: _Channel | None, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        assert channel is not None
        if kind == "hello":  # an MPI rank: its slot, its pid, and what to run
            _, rank, pid = msg
            channel.index, channel.pid = rank, pid
            assert isinstance(child.process, MpiRun)
            child.process.ranks.append(pid)
            setup = (self._loop, child.heartbeat.name, f"{child.prefix}_{rank}", self._settings.ring_slots)
            channel.conn.send((*setup, self._delivered, self._binning, self._going, self._may_bin))
        elif kind == "ring":
            _, name, slot_bytes, slots = msg
            channel.new_ring(name, slot_bytes, slots)
            if slots < self._settings.ring_slots:
                log.warning(
                    "%s: /dev/shm has room for %d of the %d ring slots of %d MiB: the reader's ring is smaller, so"
                    " frames wait in fewer (free /dev/shm, or give the container a larger shm_size)",
                    self._name,
                    slots,
                    self._settings.ring_slots,
                    slot_bytes >> 20,
                )
        elif kind == "ready":  # MPI is up in that process: note its segments while it still maps them
            log.info("%s: %s", self._name, msg[1])
            if channel.pid is not None:
                child.note_mpich(_mpich_segments(channel.pid))
        elif kind == "end":
            child.ended += 1
            self._finish(child, channel)
        elif kind == "error":
            self._stop_child(child, graceful=True)
            raise UserError(msg[1])
        elif kind == "crash":
            log.error("%s: reader failed:\n%s", self._name, msg[1])
            child.crash = msg[1].strip().splitlines()[-1]

    def _frame(self, channel: _Channel, msg: tuple[Any, ...]) -> Frame:
        """The frame in `slot`: lent (a view of the slot until released) or, with most of the ring out, a copy."""
        _, slot, shape, dtype, event, truth, read_ns = msg
        release = None
        if slot < 0:
            data = np.empty(shape, dtype)
        else:
            assert channel.ring is not None
            data = np.ndarray(shape, dtype, buffer=channel.ring, offset=slot * channel.slot_bytes)
            if channel.lend(slot, min(self._lend_most, channel.lend_most), self._lend_wait_s):
                release = functools.partial(channel.hand_back, channel.generation, slot)
            else:
                data = data.copy()
                channel.hand_back(channel.generation, slot, lent=False)
        self._arrived(event)
        return Frame(event=event, data=data, read_ns=read_ns, truth_n_particles=truth, on_release=release)

    def _binned_frame(self, msg: tuple[Any, ...]) -> Frame:
        """A frame its reader binned: its bins, and no pixels."""
        _, event, truth, read_ns, binned = msg
        self._arrived(event)
        empty = np.empty(0, binned.dtype)
        return Frame(event=event, data=empty, read_ns=read_ns, truth_n_particles=truth, binned=binned)

    def _arrived(self, event: EventId) -> None:
        self._failures = 0
        self._delivered.add(event.run_key, event.event)

    def _child_gone(self, child: _Child) -> bool:
        """Handle the end of a child; True when the iteration is over (a file read to its end)."""
        code = child.process.exitcode if not child.process.is_alive() else None
        ended = child.ended == child.expected
        self._stop_child(child, graceful=False)
        if not self._live and ended:
            return True
        if not self._live and child.crash:
            raise UserError(f"{self._name}: psana failed: {child.crash}")
        self._schedule_restart(child.stalled or ("reached the end of its data" if ended else f"exited (code {code})"))
        return False

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        """Frames and run ends as they come, `None` at least every 0.5 s when none do; ends when a file is done."""
        if not self._going:
            self._going = True
            if self._child is not None:
                self._go(self._child)
                self._start_watchdog(self._child)
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
            got = self._next_message(child, IDLE_TICK_S)
            if got is None:
                yield None
                continue
            channel, msg = got
            if msg[0] == "frame":
                assert channel is not None
                yield self._frame(channel, msg)
            elif msg[0] == "binned":
                yield self._binned_frame(msg)
            elif msg[0] == "run_end":  # every rank has its part of the run behind it
                child.run_ends[msg[1], msg[2]] += 1
                if child.run_ends[msg[1], msg[2]] == child.expected:
                    yield RunEnd(experiment=msg[1], run=msg[2])
            elif msg[0] == "eof":
                if self._child_gone(child):
                    return
                continue
            else:
                self._handle_control(child, channel, msg)

    def close(self) -> None:
        """Stop the child (it finalizes MPI when it can) and remove everything it left in /dev/shm."""
        self._closed = True
        child = self._child
        if child is not None:
            self._stop_child(child, graceful=True)


class SupervisedSource:
    """A `protocols.Source` whose read loop runs in a supervised child (the psana sources build on it).

    Its frames are lent from the reader's ring: the consumer calls `Frame.release()` when done with each.
    """

    def __init__(
        self,
        uri: str,
        loop: ReadLoop,
        settings: ServeSettings,
        live: bool,
        open_timeout_s: float,
        mask: np.ndarray | None = None,
        mpi_ranks: int = 0,
    ) -> None:
        self.uri = uri
        self.frame_shape: tuple[int, ...] | None = None  # psana's runs may differ: each run's first frame says
        self.mask = mask
        self.restarts = 0
        self.reader_processes = mpi_ranks or 1  # beside the service, on the same cores
        self.stamps_events = True  # psana's timestamps
        self._open_timeout_s = 0.0 if live else open_timeout_s
        from lcls_hitfinder.service.binning import readers_bin  # torch: in the service, never in a reader

        block = settings.overflow == "block"
        may_bin = readers_bin(settings)
        self._reader = SupervisedReader(loop, settings.reader, uri, live, mpi_ranks, block, may_bin)

    def open(self, cancel: threading.Event | None = None) -> None:
        """Start the reader; a replayable source waits until psana has opened the data (or failed to)."""
        self._reader.start(self._open_timeout_s, cancel)

    def bin_at_reader(self, binning: ReaderBinning) -> None:
        self._reader.bin_at_reader(binning)

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        for frame in self._reader.frames():
            self.restarts = self._reader.restarts
            yield frame

    def close(self) -> None:
        self._reader.close()

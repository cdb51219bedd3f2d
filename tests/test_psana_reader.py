"""The supervised reader: frames through the shared-memory ring, a watchdog on a child frozen with the GIL held.

The read loops here are real child processes; the frozen one calls libc `sleep` through ctypes.PyDLL,
which keeps the GIL exactly as psana's shmem client does when its server goes away.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pipe
from pathlib import Path

import numpy as np
import pytest

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.preprocess import PhotonCalibration, PreprocessSettings
from lcls_hitfinder.protocols import EventId, Frame, RunEnd
from lcls_hitfinder.service.binning import ReaderBinning
from lcls_hitfinder.service.reader import Delivered, FrameSink, ReadLoop, SupervisedReader
from lcls_hitfinder.service.settings import PrefilterSettings, ReaderSettings


def _frame_data(i: int) -> np.ndarray:
    side = 8 if i < 3 else 16  # grows after three frames: the ring must be re-created bigger
    return np.full((side, side), i, dtype=np.uint16)


def test_a_reader_starting_removes_the_segments_of_readers_that_are_gone() -> None:
    """A service killed with its resource tracker leaves its segments in /dev/shm; the next reader removes those
    whose heartbeat nobody holds, and never those of a live reader: one that holds its lock, whatever its pid
    (another container's pids mean nothing here), nor one too young to have taken it."""
    import fcntl
    from multiprocessing.shared_memory import SharedMemory

    def segments(prefix: str) -> list[SharedMemory]:
        made = [SharedMemory(name=f"{prefix}_{part}", create=True, size=64) for part in ("hb", "0_ring")]
        for shm in made:
            shm.close()
        return made

    def age(prefix: str, seconds: float) -> None:
        for path in glob.glob(f"/dev/shm/{prefix}_*"):
            os.utime(path, (time.time() - seconds, time.time() - seconds))

    made = segments("lhf_1_dead00_1") + segments("lhf_1_live00_1") + segments("lhf_1_young0_1")
    age("lhf_1_dead00_1", 120)
    age("lhf_1_live00_1", 120)
    lock = os.open("/dev/shm/lhf_1_live00_1_hb", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_SH)  # as a live reader of another PID namespace holds it
    try:
        reader = SupervisedReader(CountingLoop(3), _settings(), "count", live=False)
        try:
            reader.start(wait_ready_s=30)
            (own,) = glob.glob(f"/dev/shm/lhf_{os.getpid()}_*_hb")
            probe = os.open(own, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):  # the reader holds its own heartbeat's lock
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
            frames, _ = _collect(reader)
        finally:
            reader.close()
        assert len(frames) == 3
        assert glob.glob("/dev/shm/lhf_1_dead00_*") == []
        assert len(glob.glob("/dev/shm/lhf_1_live00_*")) == len(glob.glob("/dev/shm/lhf_1_young0_*")) == 2
        assert _leftovers() == []  # the reader's own, removed at close
    finally:
        os.close(lock)
        for shm in made:
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()


@dataclass(frozen=True)
class CountingLoop:
    n: int
    freeze_after: int | None = None  # freeze (GIL held) after this many frames, on the first start only

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        sink.ready(f"{self.n} test frames")
        for i in range(self.n):
            if (("tst", 1), i) in delivered:
                continue
            if self.freeze_after is not None and not delivered and i == self.freeze_after:
                ctypes.PyDLL(None).sleep(3600)  # libc sleep without releasing the GIL
            sink.put(
                EventId("tst", 1, i, timestamp=1000 + i), _frame_data(i), truth=i % 3, read_ns=time.perf_counter_ns()
            )


@dataclass(frozen=True)
class BadDetectorLoop:
    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        raise UserError("no detector 'nope' in this run")


@dataclass(frozen=True)
class DyingLoop:
    """Delivers at most `per_life` frames, then the process dies without a word (as a segfault would)."""

    n: int
    per_life: int

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        sink.ready(f"{self.n} frames, {self.per_life} a life")
        todo = [i for i in range(self.n) if (("tst", 1), i) not in delivered][: self.per_life + 1]
        for k, i in enumerate(todo):
            if k == self.per_life:
                os._exit(3)
            sink.put(EventId("tst", 1, i, timestamp=1000 + i), _frame_data(i), None, time.perf_counter_ns())


def _settings() -> ReaderSettings:
    return ReaderSettings(stall_s=1.0, stuck_s=1.0, backoff_s=0.2, max_backoff_s=1.0, ring_slots=4)


@contextlib.contextmanager
def _started(loop: ReadLoop, name: str, live: bool = False, **settings: float) -> Iterator[SupervisedReader]:
    """A reader of `loop` with the test settings (`settings` overriding keys), started; closed afterwards."""
    reader = SupervisedReader(loop, _settings().model_copy(update=settings), name, live=live)
    try:
        reader.start(wait_ready_s=30)
        yield reader
    finally:
        reader.close()


def _leftovers() -> list[str]:
    return glob.glob(f"/dev/shm/lhf_{os.getpid()}_*")


def _collect(reader: SupervisedReader, deadline_s: float = 60.0) -> tuple[list[Frame], int]:
    frames: list[Frame] = []
    ticks = 0
    end = time.monotonic() + deadline_s
    for item in reader.frames():
        if item is None:
            ticks += 1
        else:
            frames.append(item)
        assert time.monotonic() < end, "reader did not finish"
    return frames, ticks


def test_frames_cross_the_ring_in_order_and_leave_nothing_behind() -> None:
    """A consumer that keeps every frame, releasing none while reading: 3 of the 4 slots stay lent, later frames are
    copies, and all stay intact, the lent ones too after their ring was replaced by a bigger one and the
    reader closed."""
    reader = SupervisedReader(CountingLoop(10), _settings(), "count", live=False)
    try:
        reader.start(wait_ready_s=30)
        frames, _ = _collect(reader)
    finally:
        reader.close()
    assert [f.event.event for f in frames] == list(range(10))
    assert [f.on_release is not None for f in frames] == [True] * 3 + [False] * 7
    for f in frames:
        np.testing.assert_array_equal(f.data, _frame_data(f.event.event))
        f.release()  # after the reader is gone: nothing to hand back, nothing breaks
        assert f.truth_n_particles == f.event.event % 3
    assert reader.restarts == 0
    assert _leftovers() == []


@dataclass(frozen=True)
class SameSizeLoop:
    """`n` frames of `shape`, frame i all i."""

    n: int
    shape: tuple[int, int] = (8, 8)

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        sink.ready(f"{self.n} test frames")
        for i in range(self.n):
            sink.put(
                EventId("tst", 1, i), np.full(self.shape, i, np.uint16), truth=None, read_ns=time.perf_counter_ns()
            )


def test_released_frames_are_lent_from_the_ring_and_their_slots_reused() -> None:
    """Frames come as views of the ring (no copy) while the consumer hands them back: 20 through 4 slots."""
    reader = SupervisedReader(SameSizeLoop(20), _settings(), "lend", live=False)
    seen = []
    try:
        reader.start(wait_ready_s=30)
        for item in reader.frames():
            if not isinstance(item, Frame):
                continue
            assert item.on_release is not None and not item.data.flags.owndata  # lent, not copied
            np.testing.assert_array_equal(item.data, item.event.event)
            seen.append(item.event.event)
            item.release()
            item.release()  # a second release hands nothing back twice
    finally:
        reader.close()
    assert seen == list(range(20))
    assert _leftovers() == []


def test_a_blocking_reader_waits_for_slots_to_come_back_instead_of_copying() -> None:
    """As in the service: frames pile up in a queue that another thread works off, releasing each. With
    `block`, the reader waits for those releases once 3 of the 4 slots are out: every frame is lent."""
    reader = SupervisedReader(SameSizeLoop(30), _settings(), "block", live=False, block=True)
    handed: queue.Queue[Frame | None] = queue.Queue()
    intact: list[bool] = []

    def work_off() -> None:
        while (frame := handed.get()) is not None:
            time.sleep(0.01)  # slower than the reader: without `block` it would soon copy
            intact.append(bool((frame.data == frame.event.event).all()))
            frame.release()

    worker = threading.Thread(target=work_off)
    worker.start()
    lent = []
    try:
        reader.start(wait_ready_s=30)
        for item in reader.frames():
            if isinstance(item, Frame):
                lent.append(item.on_release is not None)
                handed.put(item)
    finally:
        handed.put(None)
        worker.join()
        reader.close()
    assert lent == [True] * 30
    assert intact == [True] * 30  # no slot was written again while lent
    assert _leftovers() == []


def _mixed_frames() -> list[np.ndarray | None]:
    """Frames a reader may see: uint16 and float images of one shape (a NaN in one), and ones it cannot bin."""
    rng = np.random.default_rng(5)
    nan = rng.normal(2.0, 1.0, (16, 16)).astype(np.float32)
    nan[3, 4] = np.nan
    return [
        rng.poisson(1.5, (16, 16)).astype(np.uint16),
        rng.poisson(1.5, (16, 16)).astype(np.uint16),
        rng.poisson(1.5, (16, 16)).astype(np.uint16),
        nan,
        rng.poisson(1.5, (8, 8)).astype(np.uint16),  # another shape (a run's): binned, for the service to judge
        rng.random((16, 16)) > 0.5,  # not numeric: likewise
        rng.normal(2.0, 1.0, (16, 16)),  # float64
        None,  # the detector missing from the event
        rng.poisson(1.5, (16, 16)).astype(np.uint16),
    ]


@dataclass(frozen=True)
class MixedLoop:
    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        sink.ready("mixed frames")
        for i, data in enumerate(_mixed_frames()):
            sink.put(EventId("tst", 1, i), data, truth=None, read_ns=time.perf_counter_ns())


def _binning() -> ReaderBinning:
    mask = np.random.default_rng(6).random((16, 16)) > 0.2
    calibration = PhotonCalibration(gain=2.0, offset=1.0, threshold=0.3)
    lit = PrefilterSettings(kind="lit_pixels", lit_threshold=0.5)
    return ReaderBinning(PreprocessSettings(thumbnail=4), calibration, lit, mask)


@pytest.mark.parametrize("told", ["before its start", "once the data is open"])
def test_a_reader_behind_the_service_bins_frames_itself_as_the_service_would(told: str) -> None:
    """With the service behind (none of its frames released), the reader bins what it can with the binning the
    service gave it (in its setup, or with its go once the data is open: it reads nothing before) and sends
    the bins, those of another shape too (a run of another detector setting; the service judges the shape);
    frames it cannot bin come whole. The bins, measures and NaN flags are those of the service's own
    `FrameBinner` for the frame's shape."""
    binning = _binning()
    reader = SupervisedReader(MixedLoop(), _settings(), "mixed", live=False)
    try:
        if told == "before its start":
            reader.bin_at_reader(binning)
        reader.start(wait_ready_s=30)
        if told == "once the data is open":
            time.sleep(0.5)  # time for a reader that did not wait for its go to read
            reader.bin_at_reader(binning)
        go_ns = time.perf_counter_ns()  # the go goes with the first iteration of frames(), after this
        frames, _ = _collect(reader)
    finally:
        reader.close()
    assert all(f.read_ns > go_ns for f in frames)  # read after the go (perf_counter: one clock for all processes)
    sent = _mixed_frames()
    assert [f.event.event for f in frames] == list(range(len(sent)))
    # the first two go whole (the service is not behind yet), then all of the 16 x 16 numeric ones are binned
    assert [f.binned is not None for f in frames] == [False, False, True, True, True, False, True, False, True]
    for frame, data in zip(frames, sent, strict=True):
        if frame.binned is None:
            np.testing.assert_array_equal(frame.data, np.empty(0, np.uint16) if data is None else data)
            continue
        assert data is not None and frame.data.size == 0 and frame.shape == data.shape and frame.dtype == data.dtype
        expected = binning.binner(data.shape).bin(data)
        np.testing.assert_array_equal(frame.binned.means, expected.means)
        assert (frame.binned.measure, frame.binned.finite) == (expected.measure, expected.finite)
        assert expected.finite == (frame.event.event != 3) and expected.means.shape == (4, 4)
    assert _leftovers() == []


def test_a_reader_bins_a_few_frame_shapes_and_sends_yet_others_whole() -> None:
    """A binner for each shape met (runs of other detector settings), up to four a run: a stream of ever new
    shapes (broken frames) must not build one for each."""
    here, there = Pipe()
    try:
        sink = FrameSink(there, "lhf_test_shapes", 4, _binning(), go=True)
        shapes = [(16, 16), (8, 8), (2, 8, 8), (32, 16), (12, 12)]
        binners = [sink._binner_for(np.zeros(shape, np.uint16)) for shape in shapes]
        built = [b is not None and b.pre.frame_shape == shape for b, shape in zip(binners, shapes, strict=True)]
        assert built == [True] * 4 + [False]
        assert sink._binner_for(np.ones((16, 16), np.float32)) is binners[0]  # built once for its shape
        sink.end_run("tst", 1)  # the next run may bring other shapes
        assert sink._binner_for(np.zeros((12, 12), np.uint16)) is not None
    finally:
        here.close()
        there.close()


@pytest.mark.parametrize("refused", ["process", "lock"])
def test_a_reader_process_that_cannot_start_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """The system refuses a process (fork: EAGAIN) or a descriptor (EMFILE): the heartbeat segment made for
    it, its lock and the pipe go too, at the first start as at a watchdog's restart (the same path), and the
    error is the system's."""
    import multiprocessing.context

    from lcls_hitfinder.service import reader as reader_module

    def refuse(*args: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    if refused == "process":
        monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)
    else:
        monkeypatch.setattr(reader_module, "_hold", refuse)
    fds = []
    for _ in range(2):  # the first may start multiprocessing's resource tracker (a descriptor of its own)
        reader = SupervisedReader(CountingLoop(3), _settings(), "refused", live=False)
        with pytest.raises(OSError, match="temporarily unavailable"):
            reader.start(wait_ready_s=5)
        reader.close()
        assert _leftovers() == []
        fds.append(len(os.listdir("/proc/self/fd")))
    assert fds[1] == fds[0]


def test_mpirun_gone_is_never_signalled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart stops mpirun, waits for it, then kills the ranks that outlived it: mpirun's pid and the ranks'
    already gone may belong to other processes by then, so none of them is signalled."""
    from lcls_hitfinder.service.reader import MpiRun

    run = MpiRun.__new__(MpiRun)  # its processes, without mpirun: one reaped, one rank that has exited
    run._proc = subprocess.Popen(["true"])
    run._proc.wait()
    rank = subprocess.Popen(["true"])
    rank.wait()
    run.pid, run.ranks = run._proc.pid, [rank.pid]
    signalled: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: signalled.append(pid))
    run.kill()
    assert signalled == []
    live = subprocess.Popen(["sleep", "30"])
    run.ranks.append(live.pid)
    run.kill()
    assert signalled == [live.pid]
    monkeypatch.undo()  # os.kill itself again, to end the sleep
    live.kill()
    live.wait()


def test_watchdog_restarts_a_reader_frozen_with_the_gil_held() -> None:
    with _started(CountingLoop(8, freeze_after=4), "freeze") as reader:
        frames, ticks = _collect(reader)
    assert [f.event.event for f in frames] == list(range(8))  # resumed after the last event received
    assert reader.restarts == 1
    assert ticks >= 2  # idle ticks kept coming while the child was frozen
    assert _leftovers() == []


@dataclass(frozen=True)
class WaitingRanksLoop:
    """psana's MPI roles without psana, in three ranks: rank 0 ends at once, rank 2 reads the `n` events. With
    `after`, on the first start rank 1 waits for rank 0 for ever and rank 2, after `after` events, waits too;
    both still beat (the GIL free, as in an MPI receive). A restarted job reads the rest in rank 2."""

    n: int
    after: int | None = None

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        rank = int(os.environ["PMI_RANK"])
        first = not delivered and self.after is not None
        sink.ready(f"rank {rank} of a job that waits on itself")
        if rank == 1 and first:
            time.sleep(3600)
        if rank == 2:
            todo = [i for i in range(self.n) if (("tst", 1), i) not in delivered]
            for k, i in enumerate(todo):
                if first and k == self.after:
                    time.sleep(3600)
                sink.put(EventId("tst", 1, i, timestamp=1000 + i), _frame_data(i), None, time.perf_counter_ns())
        sink.end_run("tst", 1)


def _read_mpi_job(
    loop: ReadLoop, name: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[SupervisedReader, list[Frame | RunEnd]]:
    """The reader of a three-rank job of `loop`, and all it gave, read in a thread guarded against a hang."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the ranks unpickle the loop from here
    reader = SupervisedReader(loop, _settings(), name, live=False, mpi_ranks=3)
    collected: queue.Queue[tuple[list[Frame], int]] = queue.Queue()
    try:
        reader.start(wait_ready_s=60)
        thread = threading.Thread(target=lambda: collected.put(_collect(reader, 90)), daemon=True)
        thread.start()
        thread.join(120)  # a guard against a hang, not a speed limit
        assert not thread.is_alive(), f"{name}: the job held the run"
    finally:
        reader.close()
    return reader, list(collected.get_nowait()[0])


def test_mpi_ranks_that_wait_on_each_other_after_one_ended_are_restarted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ranks that still beat but hand nothing over once another has ended are stuck (their heartbeats alone
    would hold the run for ever): the job is restarted, and no event is lost or repeated."""
    reader, items = _read_mpi_job(WaitingRanksLoop(6, after=3), "waiting", monkeypatch)
    assert sorted(f.event.event for f in items if isinstance(f, Frame)) == list(range(6))
    assert items[-1] == RunEnd("tst", 1)
    assert reader.restarts == 1
    assert "stuck (no progress for 1 s since rank 0 finished; 2 process(es) still up)" in caplog.text
    assert _leftovers() == []


def test_mpi_ranks_the_service_holds_back_after_one_ended_are_not_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank waiting for ring slots while the service does not read (its pipeline busy) makes progress: no
    restart however long the service takes."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    reader = SupervisedReader(WaitingRanksLoop(12), _settings(), "held", live=False, mpi_ranks=3)
    try:
        reader.start(wait_ready_s=60)
        items: list[Frame | RunEnd] = []
        for item in reader.frames():
            if isinstance(item, Frame) and not items:
                time.sleep(4.0)  # four stall_s: rank 2 fills the ring's 4 slots meanwhile and waits for one
            if item is not None:
                items.append(item)
    finally:
        reader.close()
    assert [f.event.event for f in items if isinstance(f, Frame)] == list(range(12))
    assert reader.restarts == 0
    assert _leftovers() == []


@dataclass(frozen=True)
class NeverExitingRankLoop:
    """Three ranks that all finish their read loop, rank 2 handing over the `n` events; rank 1 then never exits
    (as in an MPI_Finalize that waits for a peer): done, and still beating."""

    n: int

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        rank = int(os.environ["PMI_RANK"])
        sink.ready(f"rank {rank} of a job that does not end")
        for i in range(self.n if rank == 2 else 0):
            sink.put(EventId("tst", 1, i, timestamp=1000 + i), _frame_data(i), None, time.perf_counter_ns())
        if rank == 1:
            sink.close = lambda: time.sleep(3600)  # type: ignore[method-assign]
        sink.end_run("tst", 1)


def test_a_finished_rank_that_never_exits_is_stopped_and_the_run_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank said its end: the job is stopped instead of waited for, and nothing is read again."""
    reader, items = _read_mpi_job(NeverExitingRankLoop(5), "unending", monkeypatch)
    assert [f.event.event for f in items if isinstance(f, Frame)] == list(range(5))
    assert items[-1] == RunEnd("tst", 1)
    assert reader.restarts == 0
    assert _leftovers() == []


@dataclass(frozen=True)
class StoppedMidMessageLoop:
    """Stopped (SIGSTOP: a frozen cgroup) halfway through sending a message, after `after` frames of its first
    life: the service's reading thread waits in that message for bytes that never come."""

    n: int
    after: int

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        sink.ready(f"{self.n} frames, stopped mid-message after {self.after}")
        for i in range(self.n):
            if (("tst", 1), i) in delivered:
                continue
            if not delivered and i == self.after:
                fd = sink._conn.fileno()  # a bigger message (a binned frame's) written in pieces, the first only
                os.write(fd, (100_000).to_bytes(4, "big") + bytes(1000))
                os.kill(os.getpid(), signal.SIGSTOP)
            sink.put(EventId("tst", 1, i, timestamp=1000 + i), _frame_data(i), None, time.perf_counter_ns())


def test_watchdog_restarts_a_reader_stopped_in_the_middle_of_a_message() -> None:
    collected: queue.Queue[tuple[list[Frame], int]] = queue.Queue()
    with _started(StoppedMidMessageLoop(8, after=3), "midway") as reader:
        thread = threading.Thread(target=lambda: collected.put(_collect(reader)), daemon=True)
        thread.start()
        thread.join(120)  # a guard against a hang, not a speed limit: the stall takes 1 s to see
        assert not thread.is_alive(), "the reading thread stayed blocked in the half-sent message"
    frames, _ = collected.get_nowait()
    assert [f.event.event for f in frames] == list(range(8))
    assert reader.restarts == 1
    assert _leftovers() == []


@dataclass(frozen=True)
class NeverServedLoop:
    """A live reader whose source never delivers: psana waiting, GIL held, for a shmem server that is not there."""

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        sink.ready("a shmem tag nobody serves")
        ctypes.PyDLL(None).sleep(3600)


def test_a_live_source_stalled_before_any_event_says_it_may_not_be_served(caplog: pytest.LogCaptureFixture) -> None:
    with _started(NeverServedLoop(), "unserved", live=True) as reader:
        deadline = time.monotonic() + 60
        for _ in reader.frames():
            if reader.restarts or time.monotonic() > deadline:
                break
    assert reader.restarts == 1
    assert (
        "stalled (no heartbeat for" in caplog.text
        and "before any event: is the live source served here?" in caplog.text
    )
    assert _leftovers() == []


def test_a_file_reader_that_keeps_dying_without_frames_is_an_error() -> None:
    message = r"dying: the reader exited \(code 3\), 3 times in a row without"
    with (
        _started(DyingLoop(5, per_life=0), "dying", give_up_after=3) as reader,
        pytest.raises(UserError, match=message),
    ):
        _collect(reader)
    assert reader.restarts == 2
    assert _leftovers() == []


def test_a_reader_that_dies_but_makes_progress_is_restarted_until_the_end() -> None:
    with _started(DyingLoop(5, per_life=1), "progress", give_up_after=2) as reader:
        frames, _ = _collect(reader)
    assert [f.event.event for f in frames] == list(range(5))
    assert reader.restarts == 4  # four lives deliver a frame each and die; the fifth delivers the last and ends
    assert _leftovers() == []


def test_live_data_are_restarted_however_often_the_reader_dies() -> None:
    with _started(DyingLoop(5, per_life=0), "live", live=True, give_up_after=1, backoff_s=0.05) as reader:
        for _ in reader.frames():
            if reader.restarts >= 3:
                break
    assert reader.restarts >= 3
    assert _leftovers() == []


def test_bad_input_in_the_child_is_a_one_line_error_at_start() -> None:
    reader = SupervisedReader(BadDetectorLoop(), _settings(), "bad", live=False)
    with pytest.raises(UserError, match="no detector 'nope'"):
        reader.start(wait_ready_s=30)
    reader.close()
    assert _leftovers() == []


def test_a_frozen_reader_dies_with_the_service(tmp_path: Path) -> None:
    """A service killed outright (SIGKILL) must not leave a psana child frozen with the GIL held."""
    script = tmp_path / "service.py"
    script.write_text(
        f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_psana_reader import CountingLoop, _settings
from lcls_hitfinder.service.reader import SupervisedReader
if __name__ == "__main__":
    reader = SupervisedReader(CountingLoop(5, freeze_after=0), _settings(), "orphan", live=True)
    reader.start(wait_ready_s=30)
    print(reader._child.process.pid, flush=True)
    time.sleep(600)
"""
    )
    service = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        child = int(service.stdout.readline())
        assert Path(f"/proc/{child}").exists()
    finally:
        service.kill()
        service.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    orphaned = Path(f"/proc/{child}").exists()
    if orphaned:
        os.kill(child, signal.SIGKILL)
    assert not orphaned


def _private_dev_shm_possible() -> bool:
    """Whether this machine lets a test mount a small /dev/shm of its own (a mount namespace: root, unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not _private_dev_shm_possible(), reason="needs a private mount namespace (unshare -m) to fill")
@pytest.mark.parametrize(("room", "said"), [("10m", "room for 8 of the 16 ring slots"), ("1500k", "no room")])
def test_a_ring_that_does_not_fit_dev_shm_is_made_smaller_or_refused(tmp_path: Path, room: str, said: str) -> None:
    """A ring of 16 frames of 1 MiB in a /dev/shm of 10 MiB (a container's shm_size; a 4-megapixel detector's
    ring in docker's 1 GiB): it was made sparse, and the reader died of SIGBUS each time it wrote beyond the
    room, restarted and died again. Now the ring has the slots that fit, said, and every frame arrives; with no
    room for two, a one-line error says so."""
    script = tmp_path / "service.py"
    script.write_text(
        f"""
import logging, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_psana_reader import SameSizeLoop, _collect, _settings
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.service.reader import SupervisedReader
if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    settings = _settings().model_copy(update={{"ring_slots": 16}})
    reader = SupervisedReader(SameSizeLoop(40, (512, 1024)), settings, "big", live=False)
    try:
        reader.start(wait_ready_s=30)
        frames, _ = _collect(reader)
        print("frames", [int(f.data[0, 0]) for f in frames] == list(range(40)), flush=True)
    except UserError as err:
        print("refused", err, flush=True)
    finally:
        reader.close()
"""
    )
    mount = f"mount -t tmpfs -o size={room} tmpfs /dev/shm && exec {sys.executable} {script}"
    done = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert said in done.stderr + done.stdout, done.stderr
    if room == "10m":
        assert done.stdout.split() == ["frames", "True"], done.stderr
        assert "restart" not in done.stderr
    else:
        assert done.stdout.startswith("refused /dev/shm has no room for the reader's ring: 2 frames of 1 MiB")

"""psana sources read real XTC2 written with psana's DgramEdit: files, exp= directories, live shmemServer.

Small frames and few events, so the whole file runs in well under a minute of CPU; every process and
/dev/shm segment started here is cleaned up in fixtures, also on failure.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from psana_helpers import RATE, START_NS, frame_of, leftovers, write_run

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import Frame, RunEnd, Source, psana_timestamp
from lcls_hitfinder.service.reader import Delivered, FrameSink, SupervisedReader
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import open_source, parse_uri
from lcls_hitfinder.service.sources.psana2 import Psana2ReadLoop, read_loop
from lcls_hitfinder.service.sources.shmem_server import ShmemServer
from lcls_hitfinder.service.sources.xtc2_writer import Xtc2Writer, exp_layout

pytest.importorskip("psana.psexp", reason="psana2 is not installed (pip install 'lcls-hitfinder[psana]')")

CLI = Path(sys.executable).parent / "lcls-hitfinder"

pytestmark = pytest.mark.psana


def settings(**reader: float) -> ServeSettings:
    """Quick to restart; an MPI job stuck in psana (seen once in CI) is restarted after 10 s, not 60."""
    return ServeSettings(reader={"stall_s": 1.5, "stuck_s": 10.0, "backoff_s": 0.3, "max_backoff_s": 1.0, **reader})


def read_items(source: Source, limit_s: float = 60.0) -> list[Frame | RunEnd]:
    """Every frame and run end of a source that comes to its end (idle ticks left out)."""
    source.open()
    end = time.monotonic() + limit_s
    try:
        items = [f for f in _until(source.frames(), end) if f is not None]
    finally:
        source.close()
    return items


def read_all(source: Source, limit_s: float = 60.0) -> list[Frame]:
    return [f for f in read_items(source, limit_s) if isinstance(f, Frame)]


def _until(it: Iterator[Frame | RunEnd | None], end: float) -> Iterator[Frame | RunEnd | None]:
    for item in it:
        assert time.monotonic() < end, "source did not finish in time"
        yield item


def test_xtc2_file_gives_every_event_with_identity_truth_and_pixels(tmp_path: Path) -> None:
    shape = (24, 40)
    write_run(tmp_path / "r.xtc2", 7, shape, run=3)
    frames = read_all(open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det=cam", settings()))
    assert [f.event.event for f in frames] == list(range(7))
    for i, f in enumerate(frames):
        assert (f.event.experiment, f.event.run) == ("tstx00001", 3)
        assert f.event.timestamp == psana_timestamp(START_NS + (i + 1) * round(1e9 / RATE))
        assert f.event.pulse_id is not None and f.event.pulse_id == frames[0].event.pulse_id + i * 7738
        assert f.truth_n_particles == i % 5
        assert f.data.dtype == np.uint16
        np.testing.assert_array_equal(f.data, frame_of(i, shape))
    assert leftovers() == []


def test_an_event_without_timing_data_has_no_pulse_id_and_the_run_goes_on(tmp_path: Path) -> None:
    """psana's timing detector raises on an event that lacks its data: that event gets pulse_id nil, and the
    run is read to its end (the reader crashed on it, and a file source failed for good)."""
    shape = (8, 8)
    with Xtc2Writer(tmp_path / "r.xtc2", shape, rate_hz=RATE, start_unix_ns=START_NS) as w:
        for i in range(4):
            w.write(frame_of(i, shape), n_particles=1, timing=i != 2)
    frames = read_all(open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det=cam", settings()))
    assert [f.event.event for f in frames] == [0, 1, 2, 3]
    assert [f.event.pulse_id is None for f in frames] == [False, False, True, False]
    assert leftovers() == []


def test_a_reader_closed_from_two_threads_at_once_stops_its_child_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service closes its source while the pipeline's reader thread may be stopping the same child (a
    worker that failed): each must find the child stopped, neither fail nor schedule a restart."""
    import threading

    write_run(tmp_path / "r.xtc2", 20, (16, 16))
    source = open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det=cam", settings())
    source.open()
    frames = source.frames()
    assert isinstance(next(f for f in frames if f is not None), Frame)
    barrier, errors, cleanups = threading.Barrier(4), [], []
    reader = source._reader
    clean_up = reader._clean_up
    monkeypatch.setattr(reader, "_clean_up", lambda *args: (cleanups.append(args), clean_up(*args)))

    def close() -> None:
        barrier.wait()
        try:
            source.close()
        except Exception as err:  # any failure is what the test looks for
            errors.append(err)

    threads = [threading.Thread(target=close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and errors == [] and len(cleanups) == 1
    # what frames() does when it finds its child gone after the close
    reader._schedule_restart("exited (code 0)")
    assert reader.restarts == 0 and reader._restart_at is None  # a closed source restarts nothing
    assert leftovers() == []


def test_a_run_end_follows_the_last_frame_of_a_run(tmp_path: Path) -> None:
    write_run(tmp_path / "r.xtc2", 3, (8, 8), run=5)
    items = read_items(open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det=cam", settings()))
    assert [type(i) for i in items] == [Frame, Frame, Frame, RunEnd]
    assert items[-1] == RunEnd("tstx00001", 5)


def test_panel_stack_calib_with_local_constants_and_assembled_image(tmp_path: Path) -> None:
    shape = (4, 8, 12)
    write_run(tmp_path / "p.xtc2", 3, shape)
    pedestals = np.full(shape, 2.0, np.float32)
    mask = np.ones(shape, np.uint8)
    mask[1, 2, 3] = 0
    np.savez(tmp_path / "c.npz", pedestals=pedestals, pixel_mask=mask)
    uri = f"xtc2:{tmp_path / 'p.xtc2'}?det=cam&data=calib&constants={tmp_path / 'c.npz'}"
    source = open_source(uri, settings())
    assert source.mask is not None and not source.mask[1, 2, 3] and source.mask.sum() == mask.sum()
    frames = read_all(source)
    assert len(frames) == 3 and frames[0].shape == shape
    assert source.frame_shape is None  # a psana source states none: each run's first frame says
    np.testing.assert_allclose(frames[1].data, frame_of(1, shape).astype(np.float32) - 2.0)
    image = read_all(open_source(f"xtc2:{tmp_path / 'p.xtc2'}?image=1", settings()))  # det picked: the only camera
    assert image[0].data.shape == (32, 12)
    np.testing.assert_array_equal(image[2].data, frame_of(2, shape).reshape(32, 12))


def test_psana_pixel_status_masks_its_bad_pixels_with_or_without_a_pixel_mask(tmp_path: Path) -> None:
    """psana's bad-pixel constant (pixel_status, 0 = good) was ignored: only pixel_mask masked. A status per gain
    range (a Jungfrau's, (3, P, H, W)) is bad where any range is; both constants together mask both."""
    shape = (2, 4, 6)
    write_run(tmp_path / "p.xtc2", 1, shape)
    status = np.zeros((3, *shape), np.uint16)
    status[2, 1, 2, 3] = 8  # bad in the third gain range only
    mask = np.ones(shape, np.uint8)
    mask[0, 0, 0] = 0
    for constants, bad in (({"pixel_status": status}, 1), ({"pixel_status": status, "pixel_mask": mask}, 2)):
        np.savez(tmp_path / "c.npz", **constants)
        source = open_source(f"xtc2:{tmp_path / 'p.xtc2'}?det=cam&constants={tmp_path / 'c.npz'}", settings())
        assert source.mask is not None and source.mask.shape == shape and int((~source.mask).sum()) == bad
        assert not source.mask[1, 2, 3] and (bad == 1 or not source.mask[0, 0, 0])
        source.close()
    np.savez(tmp_path / "c.npz", pixel_status=status[0, :1], pixel_mask=mask)
    with pytest.raises(UserError, match=r"pixel_mask \(2, 4, 6\) and pixel_status \(1, 4, 6\) are not of one"):
        open_source(f"xtc2:{tmp_path / 'p.xtc2'}?det=cam&constants={tmp_path / 'c.npz'}", settings())


def test_bad_sources_are_one_line_errors_at_start(tmp_path: Path) -> None:
    write_run(tmp_path / "r.xtc2", 2, (8, 8))
    source = open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det=jungfrau", settings())
    with pytest.raises(UserError, match=r"no detector 'jungfrau' in run 1 \(detectors: cam, hitfinder_truth, timing\)"):
        source.open()
    source.close()
    for other in ("timing", "hitfinder_truth"):  # in the run, but no image
        source = open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det={other}", settings())
        with pytest.raises(UserError, match=f"'{other}' is not an area detector: it has no raw image"):
            source.open()
        source.close()
    source = open_source(f"xtc2:{tmp_path / 'r.xtc2'}?timing=timming", settings())  # det left to find
    with pytest.raises(
        UserError, match=r"no timing detector 'timming' in run 1 \(detectors: cam, hitfinder_truth, timing\)"
    ):
        source.open()
    source.close()
    with pytest.raises(UserError, match="does not exist"):
        open_source(f"xtc2:{tmp_path / 'missing.xtc2'}?det=cam", settings())
    for name, head in (("run.h5", b"\x89HDF\r\n\x1a\n" + bytes(64)), ("empty.xtc2", b"")):
        (tmp_path / name).write_bytes(head)  # psana's reader would crash on these (a segfault, 5 restarts)
        with pytest.raises(UserError, match="is not an XTC2 run"):
            open_source(f"xtc2:{tmp_path / name}?det=cam", settings())
    with pytest.raises(UserError, match="data='adu' must be raw or calib"):
        open_source(f"xtc2:{tmp_path / 'r.xtc2'}?data=adu", settings())
    with pytest.raises(UserError, match="want exp:EXPERIMENT:RUN"):
        open_source("exp:tstx00001?det=cam", settings())
    with pytest.raises(UserError, match="ranks=2: psana's MPI mode needs at least 3"):
        open_source("exp:tstx00001:5?det=cam&ranks=2", settings())
    with pytest.raises(UserError, match="batch= is for psana's MPI mode"):
        open_source("exp:tstx00001:5?det=cam&batch=10", settings())
    with pytest.raises(UserError, match="ranks= belongs to exp: sources"):
        open_source(f"xtc2:{tmp_path / 'r.xtc2'}?det=cam&ranks=4", settings())
    with pytest.raises(UserError, match="ranks='four' is not a valid int"):
        open_source("exp:tstx00001:5?det=cam&ranks=four", settings())
    made = subprocess.run(
        [CLI, "xtc2", tmp_path / "none.h5", "--out", tmp_path / "o.xtc2"], capture_output=True, text=True
    )
    assert made.returncode == 2 and made.stderr.strip().splitlines() == [
        f"lcls-hitfinder: error: dataset {tmp_path / 'none.h5'} does not exist"
    ]
    assert leftovers() == []


def test_psana2_uris_that_psana_or_numpy_would_fail_on_in_a_traceback_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory for a file or a file for a directory, constants that are no .npz, a run number of digits
    that int() does not take, an empty dir= (psana's default data path): each named in one line at start-up.
    ~ is the user's home in xtc2:, dir= and constants=, as in h5:."""
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "c.npy", np.ones(3))
    (tmp_path / "c.txt").write_text("gain 1\n")
    cases = [
        (f"xtc2:{tmp_path / 'd'}?det=cam", f"file {tmp_path / 'd'} is a directory"),
        (f"xtc2:{tmp_path / 'd'}?det=cam&constants={tmp_path / 'd'}", "is a directory"),
        (f"exp:tstx00001:1?dir={tmp_path / 'c.npy'}", f"directory {tmp_path / 'c.npy'} is not a directory"),
        ("exp:tstx00001:1?dir=", "the directory is empty"),
        ("exp:tstx00001:\u00b2?det=cam", "want exp:EXPERIMENT:RUN"),
        ("xtc2:~/nowhere.xtc2?det=cam", f"file {tmp_path / 'nowhere.xtc2'} does not exist"),
    ]
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("c.npy", "c.txt"):
        cases.append((f"exp:tstx00001:1?constants=~/{name}", f"constants file {tmp_path / name} is not an .npz"))
    for uri, said in cases:
        with pytest.raises(UserError, match=re.escape(said)):
            open_source(uri, settings())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psana" else real(name, *a))
    with pytest.raises(UserError, match=r"shmem:hutch\?det=cam: psana is not installed"):
        open_source("shmem:hutch?det=cam", settings())  # not a reader restarted for ever on its ImportError


def test_exp_run_directory_offline(tmp_path: Path) -> None:
    """exp= mode on psana's directory layout (bigdata + smalldata from smdwriter), with no logbook."""
    write_run(tmp_path / "r.xtc2", 5, (16, 16), run=5)
    xtc = exp_layout(tmp_path / "r.xtc2", tmp_path / "xtc", "tstx00001", 5)
    frames = read_all(open_source(f"exp:tstx00001:5?dir={xtc}&det=cam", settings()))
    assert [(f.event.run, f.event.event, f.truth_n_particles) for f in frames] == [(5, i, i % 5) for i in range(5)]
    np.testing.assert_array_equal(frames[4].data, frame_of(4, (16, 16)))
    # a run that is not there, in one line naming those that are (psana's AssertionError named the folder)
    with pytest.raises(UserError, match=rf"no run 9 in {re.escape(str(xtc))} .*; runs there: 5$"):
        open_source(f"exp:tstx00001:9?dir={xtc}&det=cam", settings())
    other = open_source(f"exp:tstx00002:5?dir={xtc}&det=cam", settings())  # psana would read tstx00001's run 5
    with pytest.raises(UserError, match="run 5 in that directory is tstx00001's, not tstx00002's"):
        other.open()
    other.close()
    (Path(xtc) / "smalldata" / "tstx00001-r0005-s000-c000.smd.xtc2").rename(Path(xtc) / "smalldata" / "r5.smd")
    with pytest.raises(UserError, match=r"no run 5 in .*; runs there: none$"):
        open_source(f"exp:tstx00001:5?dir={xtc}&det=cam", settings())


def _identity(frames: list[Frame]) -> list[tuple[int, int, int, int | None, int | None]]:
    return sorted(
        (f.event.run, f.event.event, f.event.timestamp, f.event.pulse_id, f.truth_n_particles) for f in frames
    )


def test_exp_mpi_mode_gives_each_event_once_as_the_serial_reader_does(tmp_path: Path) -> None:
    """psana's MPI mode (smd0, event builder, two big-data ranks, batches of 3): every event exactly once, with
    the serial reader's identity (the index from the smalldata), pixels and truth, and one run end after them."""
    shape = (16, 16)
    write_run(tmp_path / "r.xtc2", 23, shape, run=5)
    xtc = exp_layout(tmp_path / "r.xtc2", tmp_path / "xtc", "tstx00001", 5)
    serial = read_all(open_source(f"exp:tstx00001:5?dir={xtc}&det=cam", settings()))
    items = read_items(open_source(f"exp:tstx00001:5?dir={xtc}&det=cam&ranks=4&batch=3", settings()))
    assert items[-1] == RunEnd("tstx00001", 5) and sum(isinstance(i, RunEnd) for i in items) == 1
    frames = [i for i in items if isinstance(i, Frame)]
    assert len(frames) == 23  # a rank reading the run serially would hand over every event again
    assert _identity(frames) == _identity(serial)
    assert [f.event.event for f in serial] == list(range(23))
    for f in frames:
        np.testing.assert_array_equal(f.data, frame_of(f.event.event, shape))
    assert leftovers() == []  # rings, heartbeats, the ranks' socket


def test_an_unknown_detector_in_mpi_mode_is_a_one_line_error_at_start(tmp_path: Path) -> None:
    write_run(tmp_path / "r.xtc2", 4, (8, 8), run=5)
    xtc = exp_layout(tmp_path / "r.xtc2", tmp_path / "xtc", "tstx00001", 5)
    source = open_source(f"exp:tstx00001:5?dir={xtc}&det=jungfrau&ranks=3", settings())
    with pytest.raises(UserError, match=r"no detector 'jungfrau' in run 5 \(detectors: cam, hitfinder_truth, timing\)"):
        source.open()
    source.close()
    assert leftovers() == []  # rings, heartbeats, the ranks' socket


@dataclass(frozen=True)
class FreezeOnce:
    """A psana read loop that freezes with the GIL held (as a shmem client does) after `after` frames of its
    first start, in every big-data rank."""

    loop: Psana2ReadLoop
    after: int

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        if not delivered:
            put, count = sink.put, [0]

            def put_then_freeze(*args: Any) -> None:
                if count[0] == self.after:
                    ctypes.PyDLL(None).sleep(3600)  # libc sleep without releasing the GIL
                count[0] += 1
                put(*args)

            sink.put = put_then_freeze  # type: ignore[method-assign]
        self.loop(sink, delivered)


def test_a_frozen_mpi_rank_restarts_the_ranks_and_no_event_is_lost_or_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = (16, 16)
    write_run(tmp_path / "r.xtc2", 12, shape, run=5)
    xtc = exp_layout(tmp_path / "r.xtc2", tmp_path / "xtc", "tstx00001", 5)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the ranks unpickle FreezeOnce from here
    loop = read_loop(parse_uri(f"exp:tstx00001:5?dir={xtc}&det=cam&ranks=3&batch=2"))
    slack = settings(stall_s=3.0).reader  # four processes on two cores: no false stall, only the frozen rank
    reader = SupervisedReader(FreezeOnce(loop, after=4), slack, "freeze", live=False, mpi_ranks=3)
    end = time.monotonic() + 90
    try:
        reader.start(wait_ready_s=60)
        items = [i for i in _until(reader.frames(), end) if i is not None]
    finally:
        reader.close()
    frames = [i for i in items if isinstance(i, Frame)]
    assert reader.restarts == 1
    assert sorted(f.event.event for f in frames) == list(range(12))
    assert items[-1] == RunEnd("tstx00001", 5)
    assert leftovers() == []  # rings, heartbeats, the ranks' socket


def test_a_killed_service_leaves_nothing_of_its_mpi_reader_behind(tmp_path: Path) -> None:
    """SIGKILL of the service: its MPI job dies with it, and the resource tracker removes the rings, the
    heartbeats, the ranks' socket and MPICH's segment from /dev/shm."""
    write_run(tmp_path / "r.xtc2", 12, (16, 16), run=5)
    xtc = exp_layout(tmp_path / "r.xtc2", tmp_path / "xtc", "tstx00001", 5)
    uri = f"exp:tstx00001:5?dir={xtc}&det=cam&ranks=3&batch=2"
    script = tmp_path / "service.py"
    script.write_text(
        f"""
import time
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import open_source
if __name__ == "__main__":
    source = open_source({uri!r}, ServeSettings(reader={{"stuck_s": 10.0}}))
    source.open()
    frames = source.frames()
    while next(frames) is None:
        pass
    print("reading", flush=True)
    time.sleep(600)
"""
    )
    mpich_before = set(glob.glob("/dev/shm/mpich_shm_*"))
    service = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)

    def left() -> tuple[list[str], set[str]]:
        return glob.glob(f"/dev/shm/lhf_{service.pid}_*"), set(glob.glob("/dev/shm/mpich_shm_*")) - mpich_before

    lines: queue.Queue[str | None] = queue.Queue()  # psana prints to stdout too; None: the service's output ended

    def read() -> None:
        for line in service.stdout or ():
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 120  # against a hang, not a speed limit: the first frame takes seconds
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.1))) != "reading":  # Empty: none in 120 s
            assert line is not None, "the service ended before its first frame"
        mine, mpich = left()
        assert any(p.endswith("_ranks") for p in mine) and any(p.endswith("_hb") for p in mine) and mpich
    finally:
        service.kill()
        service.wait()
    deadline = time.monotonic() + 30  # against hanging: the tracker notices its parent's end at once
    while any(left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == ([], set())


@pytest.fixture
def servers() -> Iterator[list[ShmemServer]]:
    started: list[ShmemServer] = []
    yield started
    for server in started:
        server.stop()


def test_shmem_survives_a_killed_server_and_resumes_with_the_next(tmp_path: Path, servers: list[ShmemServer]) -> None:
    shape = (32, 32)
    end = write_run(tmp_path / "a.xtc2", 60, shape, run=1)
    write_run(tmp_path / "b.xtc2", 30, shape, run=2, start_ns=end + 10**9)  # later timestamps, as a DAQ's
    tag = f"lhftest{os.getpid()}"
    servers.append(ShmemServer(tag, [tmp_path / "a.xtc2"], rate_hz=30, buffer_bytes=2 * 32 * 32).start())
    source = open_source(f"shmem:{tag}?det=cam", settings())
    source.open()
    got: dict[int, list[Frame]] = {1: [], 2: []}
    killed_at = None
    end_by = time.monotonic() + 90
    try:
        for frame in source.frames():
            assert time.monotonic() < end_by, f"no recovery: {len(got[1])} + {len(got[2])} frames"
            if isinstance(frame, Frame):
                got[frame.event.run].append(frame)
            if len(got[1]) >= 5 and killed_at is None:
                servers[0].kill()  # mid-run: the client freezes with the GIL held
                killed_at = time.monotonic()
            if killed_at is not None and len(servers) == 1 and time.monotonic() - killed_at > 4:
                servers[0].stop()
                servers.append(ShmemServer(tag, [tmp_path / "b.xtc2"], rate_hz=30, buffer_bytes=2 * 32 * 32).start())
            if len(got[2]) >= 10:
                break
    finally:
        source.close()
    assert source.restarts >= 1
    assert 5 <= len(got[1]) < 60
    events = [f.event.event for f in got[2]]
    assert events == sorted(events) and len(set(events)) == len(events)
    np.testing.assert_array_equal(got[2][0].data, frame_of(events[0], shape))
    assert leftovers() == []


def test_a_live_reader_restarted_mid_run_numbers_on(tmp_path: Path, servers: list[ShmemServer]) -> None:
    """Frozen after 10 events of a run the server goes on serving: the restarted reader's events of that run
    are numbered after those the service already has, so (run, event) names one event (they began at 0)."""
    write_run(tmp_path / "a.xtc2", 240, (32, 32), run=1)
    tag = f"lhfnum{os.getpid()}"
    servers.append(ShmemServer(tag, [tmp_path / "a.xtc2"], rate_hz=30, buffer_bytes=2 * 32 * 32).start())
    loop = read_loop(parse_uri(f"shmem:{tag}?det=cam"))
    reader = SupervisedReader(FreezeOnce(loop, after=10), settings().reader, "freeze", live=True)
    frames: list[Frame] = []
    end = time.monotonic() + 90
    try:
        reader.start()
        for item in reader.frames():
            assert time.monotonic() < end, f"{len(frames)} frames, {reader.restarts} restarts"
            if isinstance(item, Frame):
                frames.append(item)
                item.release()
            if reader.restarts and len(frames) >= 25:
                break
    finally:
        reader.close()
    assert reader.restarts == 1
    events = [f.event.event for f in frames]
    stamps = [f.event.timestamp for f in frames]
    assert events == list(range(len(frames))) and stamps == sorted(set(stamps))
    assert leftovers() == []


def test_a_server_of_the_same_run_served_again_is_numbered_on(tmp_path: Path, servers: list[ShmemServer]) -> None:
    """The server stopped and started again at once on the same run: psana reconnects by itself (no
    restart of the reader), and the run's events go on from where they were, never named twice."""
    end = write_run(tmp_path / "a.xtc2", 60, (32, 32), run=1)
    write_run(tmp_path / "b.xtc2", 60, (32, 32), run=1, start_ns=end + 10**9)  # the same run, later stamps
    tag = f"lhfre{os.getpid()}"
    servers.append(ShmemServer(tag, [tmp_path / "a.xtc2"], rate_hz=30, buffer_bytes=2 * 32 * 32).start())
    source = open_source(f"shmem:{tag}?det=cam", settings(stall_s=30))
    source.open()
    frames: list[Frame] = []
    end_by = time.monotonic() + 90
    try:
        for item in source.frames():
            assert time.monotonic() < end_by, f"{len(frames)} frames"
            if isinstance(item, Frame):
                frames.append(item)
                item.release()
            if len(frames) == 5 and len(servers) == 1:
                servers[0].stop()
                servers.append(ShmemServer(tag, [tmp_path / "b.xtc2"], rate_hz=30, buffer_bytes=2 * 32 * 32).start())
            if len(frames) >= 25:
                break
    finally:
        source.close()
    events = [f.event.event for f in frames]
    assert events == list(range(len(frames))), events
    assert source.restarts == 0  # psana's own reconnection, not the watchdog's restart, was tested
    assert leftovers() == []


def test_a_live_source_that_cannot_connect_yet_restarts_until_it_can(
    tmp_path: Path, servers: list[ShmemServer]
) -> None:
    """The server's one client slot is taken: psana cannot open the shared memory. A live source restarts its
    reader (counted) instead of ending the service, and reads once the slot is free."""
    write_run(tmp_path / "a.xtc2", 2000, (32, 32), run=1)
    tag = f"lhfslot{os.getpid()}"
    servers.append(ShmemServer(tag, [tmp_path / "a.xtc2"], rate_hz=30, buffer_bytes=2 * 32 * 32, clients=1).start())
    first = open_source(f"shmem:{tag}?det=cam", settings())
    first.open()
    taken = first.frames()
    assert isinstance(next(f for f in taken if isinstance(f, Frame)), Frame)  # the slot is taken
    second = open_source(f"shmem:{tag}?det=cam", settings())
    second.open()
    frames: list[Frame] = []
    end_by = time.monotonic() + 90
    try:
        for item in second.frames():
            assert time.monotonic() < end_by, f"{second.restarts} restarts, {len(frames)} frames"
            if second.restarts and first is not None:  # refused and restarted: now free the slot
                first.close()
                first = None
            if isinstance(item, Frame):
                frames.append(item)
                item.release()
            if len(frames) >= 3:
                break
    finally:
        second.close()
        if first is not None:
            first.close()
    assert second.restarts >= 1 and len(frames) == 3
    assert leftovers() == []


def test_psana1_missing_is_a_clear_error() -> None:
    with pytest.raises(
        UserError, match=r"psana1 is not installed: `import psana` gives psana 4\.\d+\.\d+, which is psana2"
    ):
        open_source("psana1:exp=xpptut15:run=54:smd?det=cspad", settings())


def test_the_service_leaves_a_core_to_each_process_reading_the_source(tmp_path: Path) -> None:
    """serve.threads = 0: the cores less one for psana's reader child, or for each of its MPI ranks, at least
    one; none less for a source read in the service's own process; a number given is taken as it is."""
    from lcls_hitfinder.service.pipeline import service_threads

    write_run(tmp_path / "r.xtc2", 2, (16, 16), run=5)
    xtc = exp_layout(tmp_path / "r.xtc2", tmp_path / "xtc", "tstx00001", 5)
    cores = len(os.sched_getaffinity(0))
    readers = {
        "sim:?rate=0": 0,
        f"xtc2:{tmp_path / 'r.xtc2'}?det=cam": 1,
        f"exp:tstx00001:5?dir={xtc}&det=cam&ranks=3": 3,
    }
    for uri, n in readers.items():
        source = open_source(uri, settings())  # built, not opened: nothing runs yet
        assert source.reader_processes == n, uri  # sim reads in the service's own process
        assert service_threads(settings(), source) == max(1, cores - n), uri
        assert service_threads(ServeSettings(threads=3), source) == 3


def _blank_dataset(path: Path, adu: bool = False) -> Path:
    """Three 16 x 16 patterns of sparse photons (in ADU: 8 a photon over a pedestal of 30)."""
    from lcls_hitfinder.dataset import Batch, DatasetWriter

    images = np.random.default_rng(0).poisson(0.3, (3, 16, 16)).astype(np.float32)
    attrs = {"noise": {"adu_gain": 8.0, "adu_offset": 30.0}} if adu else {}
    with DatasetWriter(path, (16, 16), np.ones((16, 16), bool), attrs, units="adu" if adu else "photons") as w:
        n = len(images)
        zeros = np.zeros
        w.append(
            Batch(
                images * 8 + 30 if adu else images,
                zeros(n, np.int8),
                np.full(n, "", object),
                zeros(n, np.float32),
                zeros((n, 4, 4), np.float32),
                zeros((n, 4, 3), np.float32),
            )
        )
    return path


@pytest.mark.parametrize("adu", [False, True])
def test_xtc2_says_how_to_serve_a_run_in_adu(tmp_path: Path, adu: bool) -> None:
    """A run written in ADU (from a dataset in ADU, or with --adu-gain) needs [serve.calibration]: the
    command prints a config that holds it; a run in photons needs none."""
    import tomllib

    from lcls_hitfinder.config import HitfinderConfig

    data = _blank_dataset(tmp_path / "d.h5", adu)
    made = subprocess.run([CLI, "xtc2", data, "--out", tmp_path / "o.xtc2"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "writing XTC2" not in made.stdout  # the progress bar goes to stderr, the results to stdout
    out = made.stdout.split("serve it with: ", 1)[1]
    assert out.startswith("lcls-hitfinder serve -c FILE --source" if adu else "lcls-hitfinder serve --source")
    if adu:
        config = HitfinderConfig.model_validate(tomllib.loads(out.split("where FILE holds:\n", 1)[1]))
        assert (config.serve.calibration.gain, config.serve.calibration.offset) == (8.0, 30.0)
    assert leftovers() == []


def test_xtc2_refuses_a_gain_for_a_dataset_in_adu_by_its_images_units(tmp_path: Path) -> None:
    """Whether a dataset is in ADU is its images' `units`, as every reader takes it: a file in ADU written by
    DatasetWriter alone (no simulator attributes beside it) had the gain applied a second time."""
    data = _blank_dataset(tmp_path / "d.h5", adu=True)
    made = subprocess.run(
        [CLI, "xtc2", data, "--out", tmp_path / "o.xtc2", "--adu-gain", "8"], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 2 and "is in ADU already: leave out --adu-gain/--adu-offset" in made.stderr, made.stderr
    assert not (tmp_path / "o.xtc2").exists() and leftovers() == []


@pytest.mark.parametrize("det", ["my-cam", "timing", "hitfinder_truth"])
def test_xtc2_refuses_a_detector_name_psana_cannot_keep(tmp_path: Path, det: str) -> None:
    """psana aborted the process on "my-cam" (leaving an empty run); "timing" or "hitfinder_truth" silently lost
    the camera or the truth to the writer's own detector of that name."""
    data = _blank_dataset(tmp_path / "d.h5")
    made = subprocess.run(
        [CLI, "xtc2", data, "--out", tmp_path / "o.xtc2", "--det", det], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in made.stderr.splitlines() if line.startswith("lcls-hitfinder: error:")]
    assert made.returncode == 2 and len(errors) == 1 and f"detector name {det!r}" in errors[0], made.stderr
    assert not (tmp_path / "o.xtc2").exists() and leftovers() == []


def test_xtc2_written_where_its_exp_layout_puts_it_is_kept(tmp_path: Path) -> None:
    """--out already the exp= name in --exp-dir: the layout unlinked the run it had just written."""
    data = _blank_dataset(tmp_path / "d.h5")
    out = tmp_path / "ed" / "tstx00001-r0001-s000-c000.xtc2"
    made = subprocess.run(
        [CLI, "xtc2", data, "--out", out, "--exp-dir", tmp_path / "ed"], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    frames = read_all(open_source(f"exp:tstx00001:1?dir={tmp_path / 'ed'}&det=cam", settings()))
    assert len(frames) == 3 and out.exists()


def _pick(tmp_path: Path, source: str, picks: str, *more: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "picks.csv").write_text(picks)
    args = ["bank", "pick", "--source", source, "--picks", str(tmp_path / "picks.csv"), *more]
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source", ["shmem:hitfinder?det=cam", "psana1:shmem=psana.0:stop=no?det=cspad"])
def test_picking_from_live_shared_memory_is_refused_in_one_line(tmp_path: Path, source: str) -> None:
    """Its events pass once: those picked from its decision log would never come again (it read on forever)."""
    made = _pick(tmp_path, source, "event,label\n1,single\n", "--out", str(tmp_path / "r.h5"))
    errors = [line for line in made.stderr.splitlines() if line.startswith("lcls-hitfinder: error:")]
    assert made.returncode == 2 and len(errors) == 1 and "exp:EXPERIMENT:RUN" in errors[0], made.stderr
    assert not (tmp_path / "r.h5").exists()


def test_events_picked_from_a_run_become_references_for_bank_build(tmp_path: Path) -> None:
    """A new sample's bank from its own run: the events a scientist labelled, read through the xtc2 source and
    converted to photons with the service's calibration, as a labelled file that bank build takes."""
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.learn.nets import TwinEmbedder
    from lcls_hitfinder.model_io import export_onnx
    from lcls_hitfinder.preprocess import PreprocessSettings

    shape = (32, 32)
    write_run(tmp_path / "r.xtc2", 12, shape, run=3)
    source = f"xtc2:{tmp_path / 'r.xtc2'}?det=cam"
    (tmp_path / "serve.toml").write_text("[serve.calibration]\ngain = 2.0\noffset = 1.0\n")
    config = ["--config", str(tmp_path / "serve.toml")]
    picks = "event,label\n1,single\n2,multi\n5,blank\n6,single\n10,multi\n"
    made = _pick(tmp_path, source, picks, "--out", str(tmp_path / "refs.h5"), "--sample", "lyso", *config)
    assert made.returncode == 0, made.stderr
    assert "5 picked events" in made.stdout and "no [serve.calibration] is configured" not in made.stderr
    with Dataset(tmp_path / "refs.h5") as d:
        assert d.n_particles.tolist() == [1, 2, 0, 1, 2]
        assert d.structure.tolist() == ["lyso", "lyso", "", "lyso", "lyso"]
        expected = [np.clip((frame_of(i, shape).astype(np.float32) - 1.0) / 2.0, 0, None) for i in (1, 2, 5, 6, 10)]
        np.testing.assert_allclose(d.images(), np.stack(expected))
        assert d.calibration is None and d.attrs["picked_from"] == source  # photons already
        assert list(d.attrs["frame_shape"]) == list(shape)  # as read, before any tiling

    # by psana timestamp (the decision log's), with the run named; counts given as numbers
    stamp = psana_timestamp(START_NS + (4 + 1) * round(1e9 / RATE))
    made = _pick(
        tmp_path, source, f"run,timestamp,n_particles\n3,{stamp},3\n", "--out", str(tmp_path / "t.h5"), *config
    )
    assert made.returncode == 0, made.stderr
    with Dataset(tmp_path / "t.h5") as d:
        assert d.n_particles.tolist() == [3] and np.allclose(d.images()[0], (frame_of(4, shape) - 1.0) / 2.0)
    # the summary CSV of a live run: its `event` is the service's own count (0: the first it received), its
    # timestamp the run's; the timestamp names the event
    live_log = f"run,event,timestamp,label,score\n3,0,{stamp},multi,-0.5\n"
    made = _pick(tmp_path, source, live_log, "--out", str(tmp_path / "l.h5"), *config)
    assert made.returncode == 0, made.stderr
    with Dataset(tmp_path / "l.h5") as d:
        assert np.allclose(d.images()[0], (frame_of(4, shape) - 1.0) / 2.0)

    model = export_onnx(TwinEmbedder(8, 4, 2), PreprocessSettings(thumbnail=16), tmp_path / "m.onnx").path
    args = [
        "bank",
        "build",
        "--model",
        model,
        "--data",
        tmp_path / "refs.h5",
        "--per-class",
        "1",
        "--out",
        tmp_path / "b.h5",
    ]
    built = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0 and '"references": 3' in built.stdout, built.stderr

    missing = _pick(tmp_path, source, "event,n_particles\n3,1\n40,1\n", "--out", str(tmp_path / "x.h5"))
    assert (
        missing.returncode == 2 and "1 of 2 picked events are not in" in missing.stderr and "event 40" in missing.stderr
    )
    assert not (tmp_path / "x.h5").exists()
    assert "integers (raw detector values?) and no [serve.calibration] is configured" in missing.stderr
    bad = _pick(tmp_path, source, "event,count\n3,1\n", "--out", str(tmp_path / "y.h5"))
    assert bad.returncode == 2 and "needs a column event or timestamp, and n_particles or label" in bad.stderr
    assert leftovers() == []


def test_bank_pick_checks_the_picks_before_opening_a_psana_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening starts psana's reader (or mpirun) and waits for the run: a malformed CSV was said only after."""
    from typer.testing import CliRunner

    from lcls_hitfinder.cli import app
    from lcls_hitfinder.service.reader import SupervisedSource

    def opened(self: SupervisedSource, cancel: object = None) -> None:
        raise AssertionError("the source was opened before the picks were read")

    monkeypatch.setattr(SupervisedSource, "open", opened)
    write_run(tmp_path / "run.xtc2", 3, (16, 16))
    (tmp_path / "p.csv").write_text("nothing,useful\n1,2\n")
    args = ["bank", "pick", "--source", f"xtc2:{tmp_path / 'run.xtc2'}?det=cam", "--picks", str(tmp_path / "p.csv")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r.h5")])
    assert isinstance(result.exception, UserError), result.exception
    assert "needs a column event or timestamp, and n_particles or label" in str(result.exception)

"""psana2 (LCLS-II) sources: XTC2 files, live shared memory and experiment/run directories.

  xtc2:PATH?det=NAME                 a file, e.g. one written by `lcls-hitfinder xtc2`
  shmem:TAG?det=NAME                 live data from a shmemServer / DAQ monitoring tag
  exp:EXPERIMENT:RUN?dir=DIR&det=NAME  an experiment's run directory (psana's exp= mode)

Parameters: `det` (the area detector; may be left out when the run has only one), `data=raw|calib`
(default raw: the service converts ADU to photons with [serve.calibration]), `image=1` (psana's
assembled 2-D image instead of the (P, H, W) panel stack), `timing=NAME` (the timing detector
giving pulse ids, default `timing` where the run has one; a name given must be in the run),
`constants=FILE.npz` (local calibration constants, arrays named by psana ctype: pedestals, pixel_gain,
pixel_mask, ...), `calibdb=1` (ask SLAC's calibration database; off by default, since offline it fails
with a network error).

psana runs in a supervised child process (service/reader.py). Event identity: run.expt,
run.runnum, the event's index in the run, evt.timestamp, the pulse id when a timing detector is
recorded, and the particle count when the file carries truth (see xtc2_writer.py).

`exp:` sources take `ranks=N` (N >= 3) for psana's MPI mode: `mpirun -n N`, rank 0 reading the
smalldata (smd0), rank 1 building events, the other N - 2 reading big data in batches of `batch=`
events (psana's batch_size, default 100), each rank a channel of its own into the service
(reader.py). Big-data ranks see only their batches, so an event's index comes from the run's
smalldata (`SmallDataIndex`) and matches the serial reader's. Without `ranks` the run is read serially:
on the 2-core machine this was built on three ranks were slower than one reader (BENCHMARKS.md).
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EventId
from lcls_hitfinder.service.reader import Delivered, FrameSink, SupervisedSource
from lcls_hitfinder.service.sources.shmem_server import psana2_package
from lcls_hitfinder.service.sources.xtc2_writer import TIMING_DETECTOR, TRUTH_DETECTOR

if TYPE_CHECKING:
    from lcls_hitfinder.service.settings import ServeSettings
    from lcls_hitfinder.service.sources import SourceURI

PARAMS = ("det", "data", "image", "timing", "constants", "calibdb", "dir", "ranks", "batch")
MIN_MPI_RANKS = 3  # smd0, an event builder and one big-data rank
DEFAULT_BATCH = 100  # events a big-data rank takes at a time (psana's own default, 1000, gives a short run to one rank)
OPEN_TIMEOUT_S = 120.0  # psana import + reading the Configure of a file; a shmem source does not wait
_NOT_AREA_DETECTORS = {"runinfo", TRUTH_DETECTOR, "epics", "scan", "smdinfo"}


def flag(uri: SourceURI, name: str) -> bool:
    """A 0/1 URI parameter (absent = 0)."""
    value = uri.params.get(name, "0").lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise UserError(f"source {uri.raw}: {name}={value!r} must be 0 or 1")
    return value in ("1", "true", "yes")


def _existing(uri: SourceURI, path: str, what: str, directory: bool = False) -> str:
    """`path` (~ expanded, as h5: does) when it is there and of its kind; psana (or numpy) would fail on it in a
    traceback, or an empty dir= read psana's default data path."""
    if not path:
        raise UserError(f"source {uri.raw}: the {what} is empty")
    path = os.path.expanduser(path)
    if not Path(path).exists():
        raise UserError(f"source {uri.raw}: {what} {path} does not exist")
    if Path(path).is_dir() != directory:
        raise UserError(f"source {uri.raw}: {what} {path} is {'not a directory' if directory else 'a directory'}")
    return path


def _constants_file(uri: SourceURI, path: str) -> str:
    """A readable .npz of calibration constants, checked in the service (a .npy or a pickle fails at start-up,
    in one line)."""
    path = _existing(uri, path, "constants file")
    try:
        with np.load(path) as npz:
            npz.files  # noqa: B018 (an .npz opens lazily: its index is what is read)
    except Exception as err:
        why = f"is not an .npz of calibration constants ({type(err).__name__}: {err})"
        raise UserError(f"source {uri.raw}: constants file {path} {why}") from None
    return path


_CONFIGURE = 2  # psana.psexp.transitionid.TransitionId.Configure, in bits 24-27 of a datagram's env word


def _xtc2_file(uri: SourceURI, path: str) -> str:
    """An XTC2 run begins with its Configure datagram (time stamp, then env); anything else would crash psana's
    reader (a segfault, five times over with the restarts) instead of failing in one line."""
    path = _existing(uri, path, "file")
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12 or (int.from_bytes(head[8:12], "little") >> 24) & 0xF != _CONFIGURE:
        raise UserError(f"source {uri.raw}: {path} is not an XTC2 run (it does not begin with a Configure datagram)")
    return path


def _smalldata(xtc_dir: str, run: str) -> tuple[str, str]:
    """Where psana's exp= mode looks for the smalldata files of `run` (4 digits, or * for any): closed, and
    being written."""
    smd = os.path.join(xtc_dir, "smalldata", f"*r{run}-s*.smd.xtc2")
    return smd, smd + ".inprogress"


def _run_in(uri: SourceURI, xtc_dir: str, runnum: int) -> None:
    """A run that is not in `dir` in one line naming the runs that are (psana says "No smalldata files found
    from this path: DIR/smalldata", naming a folder that is there)."""
    if any(glob.glob(pattern) for pattern in _smalldata(xtc_dir, f"{runnum:04d}")):
        return
    names = [os.path.basename(f) for pattern in _smalldata(xtc_dir, "*") for f in glob.glob(pattern)]
    runs = sorted({int(m[1]) for name in names if (m := re.search(r"-r(\d{4})-s\d+", name))})
    raise UserError(
        f"source {uri.raw}: no run {runnum} in {xtc_dir} (no smalldata/*-r{runnum:04d}-s*.smd.xtc2); runs there: "
        + (", ".join(map(str, runs)) or "none")
    )


class SmallDataIndex:
    """The index of an event in its run, for a big-data rank of psana's MPI mode (which sees only its own
    batches): the event's place among the run's L1Accept timestamps, read from the run's smalldata files
    (a few bytes an event) by a serial DataSource, and read again for a timestamp not there yet (a run
    still being written). The files are those psana itself looks for on disk."""

    def __init__(self, xtc_dir: str, runnum: int, progress: Callable[[], None]) -> None:
        self._patterns = _smalldata(xtc_dir, f"{runnum:04d}")
        self._timestamps = np.zeros(0, np.uint64)
        self._progress = progress  # called per event read: a long run's index takes a while

    def _read(self) -> None:
        from psana import DataSource

        stamps: list[int] = []
        for path in sorted(f for pattern in self._patterns for f in glob.glob(pattern)):
            for run in DataSource(files=path, skip_calib_load="all").runs():
                for evt in run.events():
                    stamps.append(int(evt.timestamp))
                    self._progress()
        self._timestamps = np.unique(np.array(stamps, np.uint64))

    def _find(self, timestamp: int) -> int | None:
        i = int(np.searchsorted(self._timestamps, np.uint64(timestamp)))
        return i if i < len(self._timestamps) and int(self._timestamps[i]) == timestamp else None

    def __call__(self, timestamp: int) -> int:
        i = self._find(timestamp)
        if i is None:
            self._read()
            i = self._find(timestamp)
        if i is None:
            raise RuntimeError(f"timestamp {timestamp} is in no smalldata file of {self._patterns[0]}")
        return i


@dataclass(frozen=True)
class Psana2ReadLoop:
    """The child side: DataSource -> runs -> events -> sink, one frame per L1Accept."""

    label: str  # the URI, for messages
    datasource: tuple[tuple[str, Any], ...]  # DataSource keyword arguments
    detector: str | None
    calib: bool
    image: bool
    timing: str | None  # named in the URI (then it must be in the run), else TIMING_DETECTOR where present
    constants: str | None
    live: bool
    mpi_ranks: int = 0  # psana's MPI mode in that many ranks (exp: only); 0: serial

    def _open(self) -> Any:
        if not self.mpi_ranks:
            os.environ.setdefault("PS_PARALLEL", "none")  # one serial reader (psana's MPI stays single-rank)
        kwargs = dict(self.datasource)
        if "exp" in kwargs:
            # psana 4.3.4 asks the LCLS logbook web service for the run's files outside its try block, so
            # offline exp= mode dies with ConnectionError; without it psana scans DIR/smalldata itself.
            import psana.psexp.ds_base as ds_base

            ds_base.DataSourceBase._get_file_info_from_db = lambda self, runnum: {}
        from psana import DataSource

        try:
            return DataSource(**kwargs)
        except Exception as err:  # whatever psana raises here (an AssertionError for a run it cannot find)
            if self.live:  # no slot yet, a server starting: a crash, which restarts the reader with backoff
                raise
            raise UserError(f"source {self.label}: psana cannot open it: {type(err).__name__}: {err}") from None

    def _detector_name(self, run: Any) -> str:
        names = sorted(run.detnames)
        if self.detector is not None:
            if self.detector not in names:
                raise UserError(
                    f"source {self.label}: no detector {self.detector!r} in run {run.runnum} "
                    f"(detectors: {', '.join(names)})"
                )
            return self.detector
        cameras = [n for n in names if n not in {*_NOT_AREA_DETECTORS, self.timing, TIMING_DETECTOR}]
        if len(cameras) != 1:
            raise UserError(f"source {self.label}: say which detector with ?det=NAME (detectors: {', '.join(names)})")
        return cameras[0]

    def _local_constants(self, run: Any, name: str) -> None:
        """Inject constants from an .npz into psana, as the calibration database would (NOTES.md §1)."""
        if self.constants is None:
            return
        meta = {"experiment": run.expt or "local", "run": run.runnum or 0}
        with np.load(self.constants) as npz:
            run.dsparms.calibconst[name] = {ctype: (np.asarray(npz[ctype]), meta) for ctype in npz.files}

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        ds = self._open()
        wanted = dict(self.datasource).get("exp")
        for run in ds.runs():
            runnum = int(run.runnum or 0)
            key = (run.expt or "", runnum)
            if wanted and run.expt and run.expt != wanted:  # psana finds runs by number alone in dir=
                raise UserError(f"source {self.label}: run {runnum} in that directory is {run.expt}'s, not {wanted}'s")
            names = set(run.detnames)
            if self.timing is not None and self.timing not in names:  # a misspelt name would lose every pulse id
                raise UserError(
                    f"source {self.label}: no timing detector {self.timing!r} in run {run.runnum} "
                    f"(detectors: {', '.join(sorted(names))})"
                )
            name = self._detector_name(run)
            self._local_constants(run, name)
            det = run.Detector(name).raw
            kind = "calib" if self.calib else "raw"
            if not callable(getattr(det, kind, None)):  # timing, truth, epics, ...
                raise UserError(
                    f"source {self.label}: {name!r} is not an area detector: it has no {kind} image "
                    f"(detectors: {', '.join(sorted(names))})"
                )
            timing_name = self.timing or TIMING_DETECTOR
            timing = run.Detector(timing_name).raw if timing_name in names else None
            truth = run.Detector(TRUTH_DETECTOR).raw if TRUTH_DETECTOR in names else None
            sink.ready(f"{run.expt or '?'} run {run.runnum}: detector {name}, {kind}{' image' if self.image else ''}")
            index = SmallDataIndex(ds.xtc_path, runnum, sink.progress) if self.mpi_ranks else None
            first = delivered.next_index(key) if self.live else 0  # a live reader restarted mid-run
            for i, evt in enumerate(run.events(), start=first):
                if index is not None:
                    i = index(int(evt.timestamp))
                if not self.live and (key, i) in delivered:
                    sink.progress()  # read again after a restart, which takes time too
                    continue
                read_ns = time.perf_counter_ns()
                data = det.calib(evt) if self.calib else det.raw(evt)
                if self.image and data is not None:
                    data = det.image(evt, nda=data)
                n = truth.n_particles(evt) if truth is not None else None
                event = EventId(
                    experiment=key[0],
                    run=runnum,
                    event=i,
                    timestamp=int(evt.timestamp),
                    pulse_id=_pulse_id(timing, evt),
                )
                sink.put(event, data, None if n is None or n < 0 else int(n), read_ns)
                if self.live:  # psana may reconnect to a server of the same run by itself: number on
                    delivered.add(key, i)
            sink.end_run(*key)


def _pulse_id(timing: Any, evt: Any) -> int | None:
    """The event's pulse id; None without a timing detector, or for an event that lacks its data, where psana's
    timing detector raises AttributeError (reading None's pulseId) instead of returning None."""
    if timing is None:
        return None
    try:
        return int(timing.pulseId(evt))
    except AttributeError:
        return None


def read_loop(uri: SourceURI) -> Psana2ReadLoop:
    """Check a psana2 URI in the service process and turn it into the child's read loop."""
    uri.check_params(PARAMS)
    psana2_package(f"source {uri.raw}")
    datasource: dict[str, Any] = {}
    if uri.scheme == "xtc2":
        datasource["files"] = _xtc2_file(uri, uri.target)
    elif uri.scheme == "shmem":
        if not uri.target:
            raise UserError(f"source {uri.raw}: give the shmemServer tag, e.g. shmem:TAG?det=NAME")
        datasource["shmem"] = uri.target
    else:
        experiment, _, run = uri.target.partition(":")
        if not experiment or not (run.isascii() and run.isdigit()):
            raise UserError(f"source {uri.raw}: want exp:EXPERIMENT:RUN?dir=DIR&det=NAME")
        datasource.update(exp=experiment, run=int(run))
        if "dir" in uri.params:
            datasource["dir"] = _existing(uri, uri.params["dir"], "directory", directory=True)
            _run_in(uri, datasource["dir"], int(run))
    for name in ("dir", "ranks", "batch"):
        if name in uri.params and uri.scheme != "exp":
            raise UserError(f"source {uri.raw}: {name}= belongs to exp: sources")
    ranks = uri.get("ranks", int, 0)
    if ranks and ranks < MIN_MPI_RANKS:
        raise UserError(
            f"source {uri.raw}: ranks={ranks}: psana's MPI mode needs at least {MIN_MPI_RANKS} "
            "(smalldata, event builder, big data); leave ranks out to read serially"
        )
    if "batch" in uri.params and not ranks:
        raise UserError(f"source {uri.raw}: batch= is for psana's MPI mode (give ranks=N too)")
    if ranks:
        datasource["batch_size"] = uri.get("batch", int, DEFAULT_BATCH, at_least=1)
    data = uri.params.get("data", "raw")
    if data not in ("raw", "calib"):
        raise UserError(f"source {uri.raw}: data={data!r} must be raw or calib")
    constants = uri.params.get("constants")
    if constants is not None:
        constants = _constants_file(uri, constants)
    if not flag(uri, "calibdb"):
        datasource["skip_calib_load"] = "all"
    return Psana2ReadLoop(
        label=uri.raw,
        datasource=tuple(sorted(datasource.items())),
        detector=uri.params.get("det") or None,
        calib=data == "calib",
        image=flag(uri, "image"),
        timing=uri.params.get("timing") or None,
        constants=constants,
        live=uri.live,
        mpi_ranks=ranks,
    )


def constants_mask(loop: Psana2ReadLoop) -> np.ndarray | None:
    """The good pixels by the local constants, when frames are panels: psana's pixel_mask (1 = good) and its
    pixel_status (0 = good; a status per gain range, as a Jungfrau's, is bad where any is), both where both are."""
    if loop.constants is None or loop.image:
        return None
    with np.load(loop.constants) as npz:
        masks = []
        if "pixel_mask" in npz.files:
            masks.append(np.asarray(npz["pixel_mask"]).astype(bool))
        if "pixel_status" in npz.files:
            good = np.asarray(npz["pixel_status"]) == 0
            masks.append(good.reshape(-1, *good.shape[-3:]).all(0) if good.ndim > 3 else good)
    if len(masks) == 2 and masks[0].shape != masks[1].shape:
        raise UserError(
            f"source {loop.label}: constants {loop.constants}: pixel_mask {masks[0].shape} and pixel_status "
            f"{masks[1].shape} are not of one detector"
        )
    return np.logical_and.reduce(masks) if masks else None


class Psana2Source(SupervisedSource):
    """`xtc2:`, `shmem:` and `exp:` sources: psana2 in a supervised child process."""

    def __init__(self, uri: SourceURI, settings: ServeSettings) -> None:
        loop = read_loop(uri)
        super().__init__(uri.raw, loop, settings, loop.live, OPEN_TIMEOUT_S, constants_mask(loop), loop.mpi_ranks)

"""`h5:PATH`: frames from the project's dataset files (with their true particle counts) or CXI files.

Parameters: `rate=HZ` (0, the default: as fast as it reads), `repeat=N` passes over the file (0:
forever), `memory=1` to read the whole file first (benchmarks), `experiment=NAME` (default: the file
stem), `run=N` (default 0). CXI files: frames from `data=/entry_1/data_1/data` (N, H, W) or (N, P, H, W),
any dtype, and the CXI pixel mask (non-zero = bad) from `mask=...`, by default the first of
/entry_1/data_1/mask and /entry_1/instrument_1/detector_1/mask present (lcls_hitfinder/frame_file.py,
which `classify` reads files with too). A CXI file that records its frames' events (/LCLS/machineTime...,
as LCLS hit finders write it) gives each decision its event's timestamp, pulse id and number; otherwise
a frame is numbered by its place in the stream and stamped when it is read.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.frame_file import FrameFile, RecordedEvents
from lcls_hitfinder.preprocess import PhotonCalibration
from lcls_hitfinder.protocols import EventId, Frame, Source, psana_timestamp
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import Pacer, SourceURI

_CHUNK = 16  # frames read per HDF5 access
log = logging.getLogger(__name__)


class H5Source:
    """Reads an HDF5 file in chunks and yields its frames, optionally paced and repeated."""

    def __init__(self, uri: SourceURI, settings: ServeSettings) -> None:
        uri.check_params(("rate", "repeat", "memory", "experiment", "run", "data", "mask"))
        self.uri = uri.raw
        self.path = Path(uri.target).expanduser()
        self.rate = uri.get("rate", float, 0.0, at_least=0)
        self.repeat = uri.get("repeat", int, 1, at_least=0)
        self.memory = uri.get("memory", int, 0) != 0
        self.experiment = uri.get("experiment", str, self.path.stem)
        self.run = uri.get("run", int, 0, at_least=0)
        self._data_path: str | None = uri.get("data", str, None)
        self._mask_path = uri.params.get("mask")
        if not self.path.exists():  # refused before the service binds or makes anything; the rest when it opens
            raise UserError(f"source {self.uri}: no such file {self.path}")
        self.frame_shape: tuple[int, ...] | None = None
        self.mask: np.ndarray | None = None
        self.calibration: PhotonCalibration | None = None  # a dataset's own, when it holds ADU
        self.restarts = 0
        self.reader_processes = 0
        self._truth: np.ndarray | None = None
        self._events: RecordedEvents | None = None
        self._read: Callable[[slice], np.ndarray] | None = None
        self._n = 0
        self._file: FrameFile | None = None

    def open(self, cancel: threading.Event | None = None) -> None:  # opens at once: nothing to cancel
        f = self._file = FrameFile(self.path, f"source {self.uri}", self._data_path, self._mask_path)
        self.mask, self._truth, self._n, self.frame_shape = f.mask, f.truth, len(f), f.shape
        self._events = f.events
        self.calibration = f.calibration
        self._read = f.images
        if self.memory:
            everything = f.images(slice(None))
            self._read = everything.__getitem__

    def frames(self) -> Iterator[Frame | None]:
        assert self._read is not None, "open() first"
        n = self._n
        pacer = Pacer(self.rate)
        passes = itertools.count() if self.repeat == 0 else range(self.repeat)
        event = 0
        for _ in passes:
            for lo in range(0, n, _CHUNK):
                chunk = self._read(slice(lo, min(lo + _CHUNK, n)))
                for i, data in enumerate(chunk):
                    yield from pacer.wait()
                    truth = None if self._truth is None else int(self._truth[lo + i])
                    yield Frame(self._event_id(lo + i, event), data, time.perf_counter_ns(), truth)
                    event += 1

    @property
    def stamps_events(self) -> bool:
        """Whether its frames carry the events the file records (after `open`), not the time they are read."""
        return self._events is not None

    def _event_id(self, row: int, event: int) -> EventId:
        """The event the file records for frame `row` (a repeat replays it as it is); else the `event`-th frame
        served, stamped now."""
        e = self._events
        if e is None:
            return EventId(self.experiment, self.run, event, psana_timestamp(time.time_ns()))
        number = row if e.event is None else int(e.event[row])
        pulse = None if e.pulse_id is None else int(e.pulse_id[row])
        return EventId(self.experiment, self.run, number, int(e.timestamp[row]), pulse)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def recorded_calibration(settings: ServeSettings, source: Source) -> ServeSettings:
    """With no `[serve.calibration]` configured, a dataset in ADU (h5:) is decoded with the gain and offset it
    records, as `classify`, `evaluate` and training decode it. Call after `source.open()`."""
    if not isinstance(source, H5Source):
        return settings
    if settings.configured_calibration is not None:
        # not opened when a stop came while the service started: nothing to check then
        conflict = source._file is not None and source._file.conflicting_units(settings.calibration)
        if conflict:
            log.warning("%s", conflict)
        return settings
    if source.calibration is None:
        return settings
    c = source.calibration
    log.info("%s holds ADU: photons = (ADU - %g) / %g, as the file records", source.path, c.offset, c.gain)
    return settings.model_copy(update={"calibration": c})

"""`h5:PATH`: frames from the project's dataset files (with their true particle counts) or CXI files.

Parameters: `rate=HZ` (0, the default: as fast as it reads), `repeat=N` passes over the file (0:
forever), `memory=1` to read the whole file first (benchmarks), `experiment=NAME` (default: the file
stem), `run=N` (default 0). CXI files: frames from `data=/entry_1/data_1/data` (N, H, W) or (N, P, H, W),
any dtype, and the CXI pixel mask (non-zero = bad) from `mask=...`, by default the first of
/entry_1/data_1/mask and /entry_1/instrument_1/detector_1/mask present.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from lcls_hitfinder.dataset import Dataset
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EventId, Frame
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import Pacer, SourceURI, psana_timestamp

CXI_DATA = "/entry_1/data_1/data"
CXI_MASKS = ("/entry_1/data_1/mask", "/entry_1/instrument_1/detector_1/mask")
_CHUNK = 16  # frames read per HDF5 access


class H5Source:
    """Reads an HDF5 file in chunks and yields its frames, optionally paced and repeated."""

    def __init__(self, uri: SourceURI, settings: ServeSettings) -> None:
        uri.check_params(("rate", "repeat", "memory", "experiment", "run", "data", "mask"))
        self.uri = uri.raw
        self.path = Path(uri.target).expanduser()
        self.rate = uri.get("rate", float, 0.0)
        self.repeat = uri.get("repeat", int, 1)
        self.memory = uri.get("memory", int, 0) != 0
        self.experiment = uri.get("experiment", str, self.path.stem)
        self.run = uri.get("run", int, 0)
        self._data_path = uri.get("data", str, CXI_DATA)
        self._mask_path = uri.params.get("mask")
        self.frame_shape: tuple[int, ...] | None = None
        self.mask: np.ndarray | None = None
        self.restarts = 0
        self._truth: np.ndarray | None = None
        self._read: Callable[[slice], np.ndarray] | None = None
        self._n = 0
        self._file: h5py.File | None = None
        self._dataset: Dataset | None = None

    def open(self) -> None:
        if not self.path.is_file():
            raise UserError(f"source {self.uri}: no such file {self.path}")
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            raise UserError(f"source {self.uri}: cannot read {self.path} as HDF5: {err}") from None
        if "images" in f and "n_particles" in f:  # the project's dataset format, through its one reader
            f.close()
            self._dataset = Dataset(self.path)
            self._truth = self._dataset.n_particles
            self.mask = self._dataset.mask
            shape: tuple[int, ...] = (len(self._dataset), *self._dataset.shape)
            self._read = self._dataset.images
        else:
            self._file = f
            if self._data_path not in f:
                self.close()
                raise UserError(f"source {self.uri}: neither a dataset file nor CXI (no {self._data_path})")
            images = f[self._data_path]
            shape = tuple(images.shape)
            if len(shape) in (3, 4):
                self.mask = self._cxi_mask(f, shape[1:])
            self._read = images.__getitem__
        if len(shape) not in (3, 4) or shape[0] == 0:
            self.close()
            raise UserError(f"source {self.uri}: frames must be (N, H, W) or (N, P, H, W), got {shape}")
        self._n = shape[0]
        self.frame_shape = tuple(int(s) for s in shape[1:])
        if self.memory:
            everything = self._read(slice(None))
            self._read = everything.__getitem__

    def _cxi_mask(self, f: h5py.File, shape: tuple[int, ...]) -> np.ndarray | None:
        paths = [self._mask_path] if self._mask_path else [p for p in CXI_MASKS if p in f]
        if not paths:
            return None
        if paths[0] not in f:
            raise UserError(f"source {self.uri}: no mask {paths[0]} in {self.path}")
        mask = np.asarray(f[paths[0]][()])
        if mask.shape != shape:
            raise UserError(f"source {self.uri}: mask {paths[0]} is {mask.shape}, frames are {shape}")
        return mask == 0  # CXI: non-zero bits flag bad pixels

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
                    ident = EventId(self.experiment, self.run, event, psana_timestamp(time.time_ns()))
                    yield Frame(ident, data, time.perf_counter_ns(), truth)
                    event += 1

    def close(self) -> None:
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None
        if self._file is not None:
            self._file.close()
            self._file = None

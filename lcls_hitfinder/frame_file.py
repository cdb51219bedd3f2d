"""Frames from an HDF5 file: the project's datasets (with their true particle counts) or CXI files.

One reader for the service's `h5:` source and for offline `classify`, so both see the same frames and the
same mask. CXI: frames from `/entry_1/data_1/data` (N, H, W) or (N, P, H, W), any dtype, as stored (raw
ADU or photons), and the CXI pixel mask (non-zero = bad), by default the first of /entry_1/data_1/mask and
/entry_1/instrument_1/detector_1/mask present. Each frame's event, where the file records it as the LCLS
hit finders write it (Cheetah, psocake, OM: /LCLS/machineTime and machineTimeNanoSeconds, psana1's unix
time of the event, /LCLS/fiducial, /LCLS/eventNumber): `events`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from lcls_hitfinder.dataset import Dataset, taken, why_not_hdf5
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.preprocess import PhotonCalibration
from lcls_hitfinder.protocols import psana_timestamp

CXI_DATA = "/entry_1/data_1/data"
CXI_TIME = ("/LCLS/machineTime", "/LCLS/machineTimeNanoSeconds")  # unix seconds, nanoseconds (psana1's EventId)
CXI_FIDUCIAL = "/LCLS/fiducial"
CXI_EVENT = "/LCLS/eventNumber"
CXI_MASKS = ("/entry_1/data_1/mask", "/entry_1/instrument_1/detector_1/mask")
MOSTLY_BAD = 0.5  # a detector's mask (gaps, beam stop, bad pixels) leaves most of it good

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedEvents:
    """Per frame of a CXI file, the event it was taken from: to match decisions with psana's events."""

    timestamp: np.ndarray  # psana's 64-bit timestamps (protocols.psana_timestamp)
    pulse_id: np.ndarray | None  # LCLS-I fiducials
    event: np.ndarray | None  # the event's number in its run


class FrameFile:
    """`images(slice)` of an HDF5 file's frames, its `mask` (True = good, or None) and, for the project's
    datasets, `truth` (particle counts). `name` starts its error messages (e.g. "source h5:run.cxi")."""

    def __init__(self, path: Path, name: str, data_path: str | None = None, mask_path: str | None = None) -> None:
        self.path = path
        self.name = name
        self.mask: np.ndarray | None = None
        self.truth: np.ndarray | None = None
        self.calibration: PhotonCalibration | None = None  # a dataset's own, when it holds ADU
        self.events: RecordedEvents | None = None  # a CXI file's, when it records them
        self._dataset: Dataset | None = None
        self._file: h5py.File | None = None
        if path.is_dir():
            raise UserError(f"{name}: {path} is a directory; give an HDF5 file")
        if not path.is_file():
            raise UserError(f"{name}: no such file {path}")
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise UserError(f"{name}: cannot read {path} as HDF5: {why_not_hdf5(path, err)}") from None
        self._read: Callable[[slice], np.ndarray]
        if "images" in f and "n_particles" in f:  # the project's dataset format, through its one reader
            f.close()
            if data_path or mask_path:  # its frames and mask are where the format says
                given = " and ".join(p for p, v in (("data=", data_path), ("mask=", mask_path)) if v)
                raise UserError(f"{name}: {path} is a dataset file; {given} are for CXI files only")
            self._dataset = Dataset(path)
            self.truth, self.mask = self._dataset.n_particles, self._dataset.mask
            self.calibration = self._dataset.calibration
            shape: tuple[int, ...] = (len(self._dataset), *self._dataset.shape)
            self._read = self._dataset.images
        else:
            self._file = f
            data_path = data_path or CXI_DATA
            if data_path not in f:
                self.close()
                raise UserError(f"{name}: neither a dataset file nor CXI (no {data_path})")
            images = f[data_path]
            if not isinstance(images, h5py.Dataset):
                self.close()
                raise UserError(f"{name}: {data_path} in {path} is a group, not the frames' dataset")
            shape = tuple(images.shape)
            if len(shape) in (3, 4):
                self.mask = self._cxi_mask(f, mask_path, shape[1:])
            self.events = self._cxi_events(f, shape[0])
            self._read = images.__getitem__
        if len(shape) not in (3, 4) or 0 in shape[1:]:
            self.close()
            raise UserError(f"{name}: frames must be (N, H, W) or (N, P, H, W) with pixels, got {shape}")
        if shape[0] == 0:
            self.close()
            raise UserError(f"{name}: {path} holds no frames")
        self._n = int(shape[0])
        self.shape = tuple(int(s) for s in shape[1:])  # of one frame

    def _cxi_mask(self, f: h5py.File, mask_path: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
        paths = [mask_path] if mask_path else [p for p in CXI_MASKS if p in f]
        if not paths:
            return None
        if paths[0] not in f:
            self.close()
            raise UserError(f"{self.name}: no mask {paths[0]} in {self.path}")
        if not isinstance(f[paths[0]], h5py.Dataset):
            self.close()
            raise UserError(f"{self.name}: mask {paths[0]} in {self.path} is a group, not a dataset")
        mask = np.asarray(f[paths[0]][()])
        if mask.shape != shape:
            self.close()
            raise UserError(f"{self.name}: mask {paths[0]} is {mask.shape}, frames are {shape}")
        good = mask == 0  # CXI: non-zero bits flag bad pixels
        if good.mean() < MOSTLY_BAD:
            log.warning(
                "%s: the mask %s marks %.0f%% of the pixels bad. CXI masks flag bad pixels non-zero; a mask of good "
                "pixels (psana's pixel_mask, 1 = good) given as one leaves only the bad pixels to see",
                self.name,
                paths[0],
                100 * (1 - good.mean()),
            )
        return good

    def _cxi_events(self, f: h5py.File, n: int) -> RecordedEvents | None:
        """The frames' events, where /LCLS records a time for each frame (a file without one, or with columns of
        another length, is said and numbered by position: a half-written file's columns may run ahead)."""
        if not all(isinstance(f.get(p), h5py.Dataset) for p in CXI_TIME):
            return None
        columns = {p: f[p] for p in (*CXI_TIME, CXI_FIDUCIAL, CXI_EVENT) if isinstance(f.get(p), h5py.Dataset)}
        wrong = [f"{p} {c.shape}" for p, c in columns.items() if c.shape != (n,)]
        if wrong:
            log.warning("%s: %s for %d frames: events numbered by position", self.name, ", ".join(wrong), n)
            return None
        seconds, nanoseconds = (np.asarray(f[p][()], np.int64).tolist() for p in CXI_TIME)
        unix_ns = (s * 1_000_000_000 + ns for s, ns in zip(seconds, nanoseconds, strict=True))
        timestamp = np.array([psana_timestamp(t) for t in unix_ns], np.int64)
        given = {p: np.asarray(c[()], np.int64) for p, c in columns.items() if p not in CXI_TIME}
        return RecordedEvents(timestamp, given.get(CXI_FIDUCIAL), given.get(CXI_EVENT))

    def conflicting_units(self, configured: PhotonCalibration) -> str | None:
        """What to say when a configured gain and offset differ from the units a dataset records (a dataset
        in photons needs none; one in ADU records its own): the node's config applied to a simulated file, say.
        The configured calibration is applied, as asked; CXI files record no units."""
        if self._dataset is None:
            return None
        recorded = self.calibration or PhotonCalibration()
        if (recorded.gain, recorded.offset) == (configured.gain, configured.offset):
            return None
        units = "photons" if self.calibration is None else f"ADU (gain {recorded.gain:g}, offset {recorded.offset:g})"
        return (
            f"{self.path} records its images in {units}; the configured [serve.calibration] (gain {configured.gain:g}"
            f", offset {configured.offset:g}) is applied to them instead"
        )

    @property
    def dataset(self) -> Dataset | None:
        """The project's dataset this file is, with what made each pattern; None for a CXI file."""
        return self._dataset

    @property
    def taken(self) -> dict[str, Any]:
        """How its frames were taken (`dataset.taken`): a dataset's record, a CXI file's frame shape."""
        return self._dataset.taken if self._dataset is not None else taken({}, self.shape)

    def __len__(self) -> int:
        return self._n

    def images(self, sel: slice) -> np.ndarray:
        """Frames `sel`, as stored (a dataset's as float32 photons)."""
        return self._read(sel)

    def close(self) -> None:
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FrameFile:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

"""Write frames as an XTC2 run with psana's own writer (psana.dgramedit.DgramEdit), truth included.

The file is what the DAQ would record, as far as a reader can tell: Configure, BeginRun (with
runinfo expt/runnum), BeginStep, Enable, one L1Accept per frame with increasing 64-bit timestamps,
then Disable, EndStep, EndRun and (for shmemServer) Unconfigure. Three detectors:
  - the camera, declared as `opal` raw 2.0.0 with one field `image`: psana's opal class reads any
    2-D or (P, H, W) array with no calibration constants (NOTES.md §1);
  - `timing` (ts raw 2.1.0, `pulseId`), so readers get pulse ids as from a real timing system;
  - `hitfinder_truth` (pv raw 1.0.0, `n_particles`): the simulated ground truth per event, readable by
    any psana as `run.Detector('hitfinder_truth').raw.n_particles(evt)`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import psana_timestamp, unix_ns
from lcls_hitfinder.service.sources.shmem_server import psana_tool

TRUTH_DETECTOR = "hitfinder_truth"
TIMING_DETECTOR = "timing"
PULSES_PER_SECOND = 928_571  # LCLS-II timing: 1.3 GHz / 1400


class Xtc2Writer:
    """Appends frames (one shape and dtype per file) as L1Accepts; use as a context manager.

    Timestamps start at `start_unix_ns` (default: now) and advance by 1/`rate_hz` per event, so a
    second file written later has later timestamps, as shmemServer clients require across runs.
    """

    def __init__(
        self,
        path: Path | str,
        frame_shape: tuple[int, ...],
        dtype: np.dtype[Any] | type = np.uint16,
        detector: str = "cam",
        experiment: str = "tstx00001",
        run: int = 1,
        rate_hz: float = 120.0,
        start_unix_ns: int | None = None,
        truth: bool = True,
        unconfigure: bool = True,
    ) -> None:
        from psana.dgramedit import AlgDef, DetectorDef, DgramEdit
        from psana.psexp import TransitionId

        _check_detector_name(detector)
        self._edit, self._tid = DgramEdit, TransitionId
        self.frame_shape = tuple(int(s) for s in frame_shape)
        if len(self.frame_shape) not in (2, 3):
            raise ValueError(f"frames must be (H, W) or (P, H, W), got {self.frame_shape}")
        self.dtype = np.dtype(dtype)
        self._unconfigure = unconfigure
        # psana keeps a whole dgram in one buffer; leave room for the headers beside the frame
        self._bufsize = int(np.prod(self.frame_shape)) * self.dtype.itemsize + (1 << 20)
        self._buf = bytearray(self._bufsize)
        self._ts0 = psana_timestamp(time.time_ns() if start_unix_ns is None else start_unix_ns)
        self._dt_ns = round(1e9 / rate_hz)
        self._pulse0 = 10_000_000
        self._dpulse = max(1, round(PULSES_PER_SECOND / rate_hz))
        self.n = 0
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed by close()/__exit__

        cfg = DgramEdit(transition_id=TransitionId.Configure, ts=self._ts0, bufsize=self._bufsize)
        runinfo = cfg.Detector(
            DetectorDef("runinfo", "runinfo", ""),
            AlgDef("runinfo", 0, 0, 1),
            {"expt": (str, 1), "runnum": (np.uint32, 0)},
        )
        self._timing = cfg.Detector(
            DetectorDef(TIMING_DETECTOR, "ts", "tsserial0"), AlgDef("raw", 2, 1, 0), {"pulseId": (np.uint64, 0)}
        )
        self._cam = cfg.Detector(
            DetectorDef(detector, "opal", f"{detector}serial0"),
            AlgDef("raw", 2, 0, 0),
            {"image": (self.dtype.type, len(self.frame_shape))},
        )
        self._truth = (
            cfg.Detector(
                DetectorDef(TRUTH_DETECTOR, "pv", "truth0"), AlgDef("raw", 1, 0, 0), {"n_particles": (np.int32, 0)}
            )
            if truth
            else None
        )
        self._config = cfg
        self._save(cfg)
        begin = self._dgram(TransitionId.BeginRun, self._ts0 + 1)
        runinfo.runinfo.expt = experiment
        runinfo.runinfo.runnum = run
        begin.adddata(runinfo.runinfo)
        self._save(begin)
        for tid in (TransitionId.BeginStep, TransitionId.Enable):
            self._save(self._dgram(tid, self._ts0 + 2))

    def _dgram(self, transition: Any, ts: int) -> Any:
        return self._edit(transition_id=transition, config_dgramedit=self._config, ts=ts, bufsize=self._bufsize)

    def _save(self, edit: Any) -> None:
        edit.save(self._buf)
        self._f.write(self._buf[: edit.size])

    def _event_ts(self, i: int) -> int:
        """The i-th event's timestamp: ts0 + i/rate, carrying nanoseconds into seconds."""
        return psana_timestamp(unix_ns(self._ts0) + (i + 1) * self._dt_ns)

    def write(self, frame: np.ndarray | None, n_particles: int | None = None, timing: bool = True) -> None:
        """One L1Accept with the frame, its pulse id and (when the file carries truth) its particle count;
        `timing=False` leaves the timing system's data out of this event, and a frame of None the camera's,
        as a DAQ event missing them has."""
        if frame is not None and frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} != {self.frame_shape}")
        d = self._dgram(self._tid.L1Accept, self._event_ts(self.n))
        if timing:
            self._timing.raw.pulseId = self._pulse0 + self.n * self._dpulse
            d.adddata(self._timing.raw)
        if frame is not None:
            self._cam.raw.image = np.ascontiguousarray(frame, dtype=self.dtype)
            d.adddata(self._cam.raw)
        if self._truth is not None:
            self._truth.raw.n_particles = -1 if n_particles is None else int(n_particles)
            d.adddata(self._truth.raw)
        self._save(d)
        self.n += 1

    @property
    def end_unix_ns(self) -> int:
        """Unix time just after the last event: where a following run's timestamps should start."""
        return unix_ns(self._event_ts(self.n + 1))

    def close(self) -> None:
        """Close the run (Disable, EndStep, EndRun and, for shmemServer, Unconfigure)."""
        if self._f.closed:
            return
        tail = [self._tid.Disable, self._tid.EndStep, self._tid.EndRun]
        if self._unconfigure:
            tail.append(self._tid.Unconfigure)
        end = self._event_ts(self.n)
        for tid in tail:
            self._save(self._dgram(tid, end))
        self._f.close()

    def __enter__(self) -> Xtc2Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)


def photons_to_adu(photons: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """Simulated photons -> uint16 ADU as a detector would record them: round(photons*gain + offset), clipped."""
    adu = np.rint(np.asarray(photons, dtype=np.float64) * gain + offset)
    return np.clip(adu, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def constants_path(xtc2: Path | str) -> Path:
    """Where `dataset_to_xtc2` puts the run's local calibration constants: RUN.xtc2 -> RUN.constants.npz."""
    return Path(xtc2).with_suffix(".constants.npz")


def dataset_to_xtc2(
    dataset: Path | str,
    out: Path | str,
    detector: str = "cam",
    experiment: str = "tstx00001",
    run: int = 1,
    gain: float | None = None,
    offset: float | None = None,
    rate_hz: float = 120.0,
    start_unix_ns: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Convert a simulated dataset (lcls_hitfinder.dataset) into an XTC2 run of uint16 ADU; returns N.

    Photons become round(photons * gain + offset) ADU (default gain 1, offset 0: ADU = photons). A
    dataset simulated in ADU already is written as it is, and then gain/offset are refused. The
    dataset's mask goes beside the run as psana's `pixel_mask` constant (`constants_path(out)`): a
    mask is a calibration constant in psana, not event data; serve with `?constants=` that file.
    `progress`, when given, is called with the number of frames written so far.
    """
    from lcls_hitfinder.dataset import Dataset

    with Dataset(dataset) as ds:
        in_adu = ds.calibration is not None  # the units its images record, as every reader of a dataset takes them
        if in_adu and (gain is not None or offset is not None):
            raise UserError(f"{dataset} is in ADU already: leave out --adu-gain/--adu-offset")
        g, o = (1.0, 0.0) if in_adu else (1.0 if gain is None else gain, 0.0 if offset is None else offset)
        if g <= 0:
            raise UserError(f"the ADU gain must be positive, got {g}")
        np.savez(constants_path(out), pixel_mask=ds.mask.astype(np.uint8))
        with Xtc2Writer(out, ds.shape, np.uint16, detector, experiment, run, rate_hz, start_unix_ns) as writer:
            for batch in ds.batches(64):
                adu = photons_to_adu(batch.images, g, o)
                for frame, n in zip(adu, batch.n_particles, strict=True):
                    writer.write(frame, int(n))
                if progress is not None:
                    progress(writer.n)
            return writer.n


def _check_detector_name(name: str) -> None:
    """psana aborts the process (C++) on a name it cannot store, and a name the writer uses for its own
    detectors would silently replace the camera or the truth."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise UserError(f"detector name {name!r}: psana takes letters, digits and _ only")
    if name in (TIMING_DETECTOR, TRUTH_DETECTOR, "runinfo"):
        raise UserError(f"detector name {name!r} is taken by the run's own {name} detector: choose another")


def exp_run_file(root: Path, experiment: str, run: int) -> Path:
    """Where psana's exp= mode looks for the (first) XTC2 file of `run` under `root`."""
    return root / f"{experiment}-r{run:04d}-s000-c000.xtc2"


def exp_layout(xtc2: Path, root: Path, experiment: str, run: int) -> Path:
    """Put an XTC2 run where psana's exp= mode (and its MPI mode) looks for it: root/<exp>-r<run>-s000-c000.xtc2
    (a hard link where the file system allows, else a copy) and its smalldata index root/smalldata/...smd.xtc2
    written by psana's `smdwriter`. Returns root, the `dir=` of an `exp:` source."""
    big = exp_run_file(root, experiment, run)
    smd = root / "smalldata" / big.with_suffix(".smd.xtc2").name
    smd.parent.mkdir(parents=True, exist_ok=True)
    if not (big.exists() and big.samefile(xtc2)):  # written there already: unlinking it would lose the run
        big.unlink(missing_ok=True)
        try:
            big.hardlink_to(xtc2)
        except OSError:
            shutil.copyfile(xtc2, big)
    made = subprocess.run([psana_tool("smdwriter"), "-f", big, "-o", smd], capture_output=True, text=True)
    if made.returncode != 0:
        raise UserError(f"psana's smdwriter failed on {big}: {(made.stderr or made.stdout).strip()[-300:]}")
    return root

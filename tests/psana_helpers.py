"""Helpers of the psana tests: small XTC2 runs with known pixels and truth, and /dev/shm bookkeeping."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from lcls_hitfinder.service.sources.xtc2_writer import Xtc2Writer

START_NS = 1_790_000_000 * 10**9  # a fixed unix time, so timestamps are known in advance
RATE = 120.0


def frame_of(i: int, shape: tuple[int, ...]) -> np.ndarray:
    """The pixels of event i: reproducible, different for every event."""
    return np.random.default_rng(i).integers(0, 1000, size=shape, dtype=np.uint16)


def write_run(path: Path, n: int, shape: tuple[int, ...], run: int = 1, start_ns: int = START_NS) -> int:
    """Write n frames with truth i % 5; returns the unix ns after the run (where a next run may start)."""
    with Xtc2Writer(path, shape, run=run, rate_hz=RATE, start_unix_ns=start_ns) as w:
        for i in range(n):
            w.write(frame_of(i, shape), n_particles=i % 5)
    return w.end_unix_ns


def shm_files() -> set[str]:
    """Every ring segment and MPICH file in /dev/shm now, whoever made it."""
    return set(glob.glob("/dev/shm/lhf_*") + glob.glob("/dev/shm/mpich_shm_*"))


_BEFORE_TESTS = shm_files()  # other users' files, or a killed earlier session's: not this session's leftovers


def leftovers(pid: int | None = None) -> list[str]:
    """Ring segments of process `pid` (default: this one) and MPICH files of processes that are gone."""
    mine = glob.glob(f"/dev/shm/lhf_{pid or os.getpid()}_*")
    mpich = set(glob.glob("/dev/shm/mpich_shm_*")) - _BEFORE_TESTS
    orphans = [p for p in mpich if not Path(f"/proc/{int(p.split('_')[2], 16)}").exists()]
    return mine + orphans

"""`sim:?rate=HZ&...`: a live stream of simulated patterns, each carrying its true particle count.

Parameters: `rate=HZ` (default 120; 0: as fast as the simulator makes them), `n=N` events, then the
run ends (default: endless), `seed=S`, `experiment=NAME` (default `sim`), `run=N` (default 1), and
`config=FILE`, a config file whose [simulate] section describes the patterns (default: the built-in
settings). The simulator works a chunk ahead in a thread, so its bursts do not disturb the pacing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lcls_hitfinder.config import load_config
from lcls_hitfinder.dataset import Batch
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EventId, Frame, psana_timestamp
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import TICK_S, Pacer, SourceURI

if TYPE_CHECKING:
    from lcls_hitfinder.simulate.generate import PatternGenerator

_CHUNK = 16  # patterns per simulator call
_AHEAD = 2  # chunks made ahead of time


class SimSource:
    """Frames from lcls_hitfinder.simulate's PatternGenerator, paced at `rate`."""

    def __init__(self, uri: SourceURI, settings: ServeSettings) -> None:
        uri.check_params(("rate", "n", "seed", "experiment", "run", "config"))
        if uri.target:  # 'sim:rate=0' would otherwise run at the defaults
            raise UserError(f"source {uri.raw}: sim: takes its parameters after '?' (sim:?{uri.target})")
        self.uri = uri.raw
        self.rate = uri.get("rate", float, 120.0, at_least=0)
        self.n = uri.get("n", int, 0, at_least=0)
        self.seed: int | None = uri.get("seed", int, 0, at_least=0) if "seed" in uri.params else None
        self.experiment = uri.get("experiment", str, "sim")
        self.run = uri.get("run", int, 1, at_least=0)
        config = uri.params.get("config")
        # read here, at start-up, before the service binds its ports: a missing or bad file is one line then
        self.simulate = load_config(Path(config).expanduser() if config else None).simulate
        self.frame_shape: tuple[int, ...] | None = None
        self.mask: np.ndarray | None = None
        self.restarts = 0
        self.reader_processes = 0
        self.stamps_events = False  # stamped when simulated
        self._chunks: queue.Queue[Batch | BaseException] = queue.Queue(_AHEAD)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, cancel: threading.Event | None = None) -> None:  # opens at once: nothing to cancel
        from lcls_hitfinder.simulate.generate import PatternGenerator

        sim = self.simulate
        generator = PatternGenerator(
            sim, seed=sim.seed if self.seed is None else self.seed
        )  # the URI's, else the file's
        self.frame_shape = tuple(generator.shape)
        self.mask = generator.mask
        self._thread = threading.Thread(target=self._generate, args=(generator,), name="sim", daemon=True)
        self._thread.start()

    def _generate(self, generator: PatternGenerator) -> None:
        made = 0
        try:
            while not self._stop.is_set() and (self.n == 0 or made < self.n):
                size = _CHUNK if self.n == 0 else min(_CHUNK, self.n - made)
                batch = generator.generate(size)
                made += size
                while not self._stop.is_set():
                    try:
                        self._chunks.put(batch, timeout=TICK_S)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to frames(), which raises it in the reader
            self._chunks.put(err)

    def frames(self) -> Iterator[Frame | None]:
        pacer = Pacer(self.rate)
        event = 0
        while self.n == 0 or event < self.n:
            try:
                chunk = self._chunks.get(timeout=TICK_S)
            except queue.Empty:
                yield None
                continue
            if isinstance(chunk, BaseException):
                raise chunk
            for image, count in zip(chunk.images, chunk.n_particles.tolist(), strict=True):
                yield from pacer.wait()
                ident = EventId(self.experiment, self.run, event, psana_timestamp(time.time_ns()))
                yield Frame(ident, image, time.perf_counter_ns(), int(count))
                event += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

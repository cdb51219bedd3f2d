"""psana1 (LCLS-I) source: `psana1:DATASOURCE_STRING?det=NAME`, e.g. `psana1:exp=xpptut15:run=54:smd?det=cspad`.

The part after `psana1:` is handed to `psana.DataSource` unchanged (`exp=...:run=...:smd`,
`shmem=psana.0:stop=no`, ...). Parameters: `det` (a detector name or alias, see `DetNames()`),
`data=raw|calib`, `image=1` (geometry-assembled image), `calibdir=DIR` (psana.calib-dir, needed in
shared-memory mode where the experiment is unknown). The calls follow the psana1 reference in
../shared/notes/psana/11_psana1_api_reference.md; psana1 lives only in SLAC's conda ana-* environments,
and the `psana` on PyPI (4.x) is psana2, so this module tells the two apart and says so.

Event identity: `ds.env().experiment()`, the run, the event's index in its run, the EventId's unix
(sec, nsec) re-based to psana2's 64-bit form (seconds since 1990 << 32 | ns, one convention for every
source) and the 360 Hz fiducials as the pulse id. tests/test_psana1_standin.py runs this module against a
stand-in of those documented calls; it has never met a real psana1 here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EventId, psana_timestamp
from lcls_hitfinder.service.reader import Delivered, FrameSink, SupervisedSource
from lcls_hitfinder.service.sources.psana2 import flag

if TYPE_CHECKING:
    from lcls_hitfinder.service.settings import ServeSettings
    from lcls_hitfinder.service.sources import SourceURI

PARAMS = ("det", "data", "image", "calibdir")
OPEN_TIMEOUT_S = 300.0  # psana1 reads the run's index/smd before the first event


def require_psana1() -> None:
    """Raise a one-line UserError unless `import psana` would give LCLS-I psana."""
    if importlib.util.find_spec("psana") is None:
        raise UserError("psana1 is not installed: psana1: sources need an LCLS-I ana environment (conda ana-*)")
    if importlib.util.find_spec("psana.psexp") is not None:
        version = importlib.metadata.version("psana")
        raise UserError(
            f"psana1 is not installed: `import psana` gives psana {version}, which is psana2 (LCLS-II); "
            "read LCLS-I data in an LCLS-I ana environment, or LCLS-II data with xtc2:, shmem: or exp:"
        )


@dataclass(frozen=True)
class Psana1ReadLoop:
    """The child side: psana1's DataSource -> events -> sink."""

    label: str
    datasource: str
    detector: str
    calib: bool
    image: bool
    calib_dir: str | None
    live: bool

    def _detector(self, psana: Any) -> Any:
        names = sorted({n for entry in psana.DetNames() for n in entry if n})
        if self.detector not in names:
            raise UserError(f"source {self.label}: no detector {self.detector!r} (detectors: {', '.join(names)})")
        return psana.Detector(self.detector)

    def __call__(self, sink: FrameSink, delivered: Delivered) -> None:
        import psana

        if self.calib_dir is not None:
            psana.setOption("psana.calib-dir", self.calib_dir)
        try:
            ds = psana.DataSource(self.datasource)
        except Exception as err:  # psana1 raises plain Exceptions for a bad string or a missing run
            if self.live:  # shared memory not served yet: a crash, which restarts the reader with backoff
                raise
            raise UserError(f"source {self.label}: psana cannot open it: {err}") from None
        experiment = ds.env().experiment()
        det = self._detector(psana)
        sink.ready(f"{experiment} {self.datasource}: detector {self.detector}, {'calib' if self.calib else 'raw'}")
        last: int | None = None
        index = -1
        for evt in ds.events():
            read_ns = time.perf_counter_ns()
            eid = evt.get(psana.EventId)
            run = int(eid.run())
            if run == last:
                index += 1
            else:  # psana1's events() has no EndRun: a run ends where the next one's first event comes
                if last is not None:
                    sink.end_run(experiment, last)
                last = run
                index = delivered.next_index((experiment, run)) if self.live else 0  # a live reader restarted mid-run
            if not self.live and ((experiment, run), index) in delivered:
                continue
            data = det.calib(evt) if self.calib else det.raw(evt)
            if self.image and data is not None:
                data = det.image(evt, data)
            sec, nsec = eid.time()  # unix epoch in psana1
            event = EventId(
                experiment=experiment,
                run=run,
                event=index,
                timestamp=psana_timestamp(int(sec) * 1_000_000_000 + int(nsec)),
                pulse_id=int(eid.fiducials()),
            )
            sink.put(event, data, None, read_ns)
            if self.live:  # psana may reconnect to a server of the same run by itself: number on
                delivered.add((experiment, run), index)
        if last is not None:
            sink.end_run(experiment, last)


class Psana1Source(SupervisedSource):
    """`psana1:` sources: LCLS-I psana in a supervised child process."""

    def __init__(self, uri: SourceURI, settings: ServeSettings) -> None:
        require_psana1()
        uri.check_params(PARAMS)
        data = uri.params.get("data", "raw")
        if data not in ("raw", "calib"):
            raise UserError(f"source {uri.raw}: data={data!r} must be raw or calib")
        loop = Psana1ReadLoop(
            label=uri.raw,
            datasource=uri.target,
            detector=uri.require("det"),
            calib=data == "calib",
            image=flag(uri, "image"),
            calib_dir=uri.params.get("calibdir"),
            live=uri.live,
        )
        super().__init__(uri.raw, loop, settings, loop.live, OPEN_TIMEOUT_S)

"""The psana1 (LCLS-I) source against a stand-in of psana1's documented calls (tests/psana1_standin).

psana1 cannot be installed here, so this checks our side of the adapter only: that it makes the calls the
psana1 reference documents, in a supervised child, and turns their answers into the service's event identity
(psana2's 64-bit timestamp form from psana1's unix (sec, nsec), the run, the index in the run, fiducials as
the pulse id), raw / calib / image data, and a one-line error for an unknown detector.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.protocols import EPICS_EPOCH_UNIX, Frame
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import open_source

STANDIN = Path(__file__).parent / "psana1_standin"


@pytest.fixture
def psana1(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """`import psana` gives the stand-in, here and in the reader's child (spawn passes sys.path on)."""
    for name in [m for m in sys.modules if m == "psana" or m.startswith("psana.")]:
        monkeypatch.delitem(sys.modules, name)  # a psana2 imported by other tests; restored afterwards
    monkeypatch.syspath_prepend(str(STANDIN))
    module = importlib.import_module("psana")
    assert module.__file__ is not None and Path(module.__file__).is_relative_to(STANDIN)
    yield module
    sys.modules.pop("psana", None)  # before monkeypatch puts back what was there


def _frames(uri: str) -> list[Frame]:
    source = open_source(uri, ServeSettings())
    source.open()
    try:
        return [f for f in source.frames() if isinstance(f, Frame)]
    finally:
        source.close()


def test_psana1_events_carry_identity_and_data(psana1: ModuleType) -> None:
    frames = _frames("psana1:exp=cxitest17:run=3,4:smd?det=pnccdFront")
    n = psana1.N_EVENTS
    assert [(f.event.experiment, f.event.run, f.event.event) for f in frames] == [
        ("cxitest17", run, i) for run in (3, 4) for i in range(n)
    ]
    for f in frames:
        sec, nsec = psana1.EventId(f.event.run, f.event.event).time()
        assert f.event.timestamp == (sec - EPICS_EPOCH_UNIX) << 32 | nsec
        assert f.event.pulse_id == psana1.EventId(f.event.run, f.event.event).fiducials()
        np.testing.assert_array_equal(f.data, psana1.frame_of(f.event.run, f.event.event))
        assert f.truth_n_particles is None


def test_psana1_calib_and_image(psana1: ModuleType) -> None:
    calib = _frames("psana1:exp=cxitest17:run=3:smd?det=pnccdFront&data=calib")
    np.testing.assert_allclose(calib[2].data, psana1.frame_of(3, 2) - 100.0)
    image = _frames("psana1:exp=cxitest17:run=3:smd?det=pnccdFront&image=1")
    assert image[0].data.shape == (2 * psana1.SHAPE[1], psana1.SHAPE[2])


def test_psana1_unknown_detector_is_a_one_line_error(psana1: ModuleType) -> None:
    source = open_source("psana1:exp=cxitest17:run=3:smd?det=cspad", ServeSettings())
    with pytest.raises(UserError, match=r"no detector 'cspad' \(detectors: CxiDs1\.0:Pnccd\.0, EBeam, pnccdFront\)"):
        source.open()
    source.close()
    with pytest.raises(UserError, match="missing \\?det="):
        open_source("psana1:exp=cxitest17:run=3:smd", ServeSettings())


def test_psana1_ends_each_run_and_a_live_restart_numbers_on(psana1: ModuleType) -> None:
    """psana1's events() has no EndRun: each run ends where the next begins, and after the last event; a live
    reader restarted mid-run goes on counting after the events delivered, so (experiment, run, event) stays
    unique; a run of the same number in another experiment (run numbers start again in each) starts from 0."""
    from lcls_hitfinder.service.reader import Delivered
    from lcls_hitfinder.service.sources.psana1 import Psana1ReadLoop

    class Sink:
        def __init__(self) -> None:
            self.items: list[tuple[str, int, int]] = []

        def ready(self, message: str) -> None:
            pass

        def put(self, event: Any, data: Any, truth: Any, read_ns: int) -> None:
            self.items.append(("event", event.run, event.event))

        def end_run(self, experiment: str, run: int) -> None:
            self.items.append(("end", run, -1))

    def read(live: bool, delivered: Delivered) -> list[tuple[str, int, int]]:
        sink = Sink()
        loop = Psana1ReadLoop("psana1:test", "exp=cxitest17:run=3,4:smd", "pnccdFront", False, False, None, live)
        loop(sink, delivered)  # type: ignore[arg-type]
        return sink.items

    n = psana1.N_EVENTS
    expected = [("event", r, i) for r in (3,) for i in range(n)] + [("end", 3, -1)]
    expected += [("event", 4, i) for i in range(n)] + [("end", 4, -1)]
    assert read(False, Delivered()) == expected
    delivered = Delivered()
    for i in range(3):
        delivered.add(("cxitest17", 3), i)
        delivered.add(("cxiother18", 4), i)
    live = read(True, delivered)
    assert [item for item in live if item[1] == 3] == [("event", 3, i) for i in range(3, 3 + n)] + [("end", 3, -1)]
    assert [item for item in live if item[1] == 4] == [("event", 4, i) for i in range(n)] + [("end", 4, -1)]

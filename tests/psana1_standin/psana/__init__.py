"""A stand-in for LCLS-I psana1, which cannot be installed here (SLAC's conda ana-* environments only).

It implements just the calls that lcls_hitfinder's psana1 source makes, as the psana1 reference
(shared/notes/psana/11_psana1_api_reference.md) documents them, over events made up from the
DataSource string: `exp=EXP:run=R[,R2...]:smd` gives runs of N_EVENTS events each. Pixels are
reproducible per (run, event), timestamps are unix (sec, nsec) 1/120 s apart from START_UNIX_S and
fiducials step by 3 (360 Hz counter at 120 Hz). Nothing here is psana1's code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_EVENTS = 6
SHAPE = (2, 8, 10)  # a two-panel detector
START_UNIX_S = 1_500_000_000
_options: dict[str, str] = {}


def frame_of(run: int, event: int) -> np.ndarray:
    return np.random.default_rng([run, event]).integers(0, 500, size=SHAPE).astype(np.int16)


def setOption(name: str, value: str) -> None:
    _options[name] = value


class EventId:
    def __init__(self, run: int, index: int) -> None:
        self._run, self._index = run, index

    def run(self) -> int:
        return self._run

    def time(self) -> tuple[int, int]:
        ns = self._index * 1_000_000_000 // 120
        return START_UNIX_S + self._run * 1000 + ns // 10**9, ns % 10**9

    def fiducials(self) -> int:
        return (self._run * 10_000 + 3 * self._index) % (1 << 17)


class _Event:
    def __init__(self, run: int, index: int) -> None:
        self.eid = EventId(run, index)

    def get(self, kind: type) -> Any:
        return self.eid if kind is EventId else None


class _Env:
    def __init__(self, experiment: str) -> None:
        self._experiment = experiment

    def experiment(self) -> str:
        return self._experiment


class DataSource:
    def __init__(self, spec: str) -> None:
        fields = dict(part.split("=", 1) for part in spec.split(":") if "=" in part)
        if "exp" not in fields or "run" not in fields:
            raise Exception(f"stand-in psana1: cannot parse {spec!r}")  # psana1 raises plain Exceptions
        self._experiment = fields["exp"]
        self._runs = [int(r) for r in fields["run"].split(",")]

    def env(self) -> _Env:
        return _Env(self._experiment)

    def events(self) -> Any:
        for run in self._runs:
            for i in range(N_EVENTS):
                yield _Event(run, i)


def DetNames() -> list[tuple[str, str, str]]:
    return [("CxiDs1.0:Pnccd.0", "pnccdFront", ""), ("EBeam", "", "")]


class Detector:
    def __init__(self, name: str) -> None:
        self.name = name

    def raw(self, evt: _Event) -> np.ndarray:
        return frame_of(evt.eid.run(), evt.eid._index)

    def calib(self, evt: _Event) -> np.ndarray:
        return self.raw(evt).astype(np.float32) - 100.0  # a pedestal of 100 ADU

    def image(self, evt: _Event, nda: np.ndarray | None = None) -> np.ndarray:
        data = self.raw(evt) if nda is None else nda
        return data.reshape(-1, data.shape[-1])  # panels stacked: a crude "geometry"

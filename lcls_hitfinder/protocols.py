"""The roles of the pipeline as typing.Protocols; each backend class is named for what it wraps.

Source -> preprocessing -> Embedder -> Bank -> Publisher; service/pipeline.py wires them together through
these protocols. The preprocessing has no protocol on purpose: it is one class (preprocess.Preprocessor),
the same in training, evaluation and serving, on the CPU or CUDA; a second implementation would be a second
answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: a psana reader process imports this module without paying for torch
    import threading
    from pathlib import Path

    import torch

    from lcls_hitfinder.model_io import ModelInfo
    from lcls_hitfinder.service.binning import ReaderBinning

RunKey = tuple[str, int]  # (experiment, run): run numbers start again in each experiment
EPICS_EPOCH_UNIX = 631_152_000  # 1990-01-01 UTC in unix seconds: psana timestamps count from there


def psana_timestamp(unix_ns: int) -> int:
    """The psana 64-bit timestamp (seconds since 1990-01-01 UTC << 32 | nanoseconds) of a unix time in ns."""
    sec, nsec = divmod(unix_ns, 1_000_000_000)
    return (sec - EPICS_EPOCH_UNIX) << 32 | nsec


def unix_ns(timestamp: int) -> int:
    """The inverse of psana_timestamp: nanoseconds since 1970."""
    return ((timestamp >> 32) + EPICS_EPOCH_UNIX) * 1_000_000_000 + (timestamp & 0xFFFFFFFF)


@dataclass(frozen=True)
class EventId:
    """Who an event is: psana conventions (64-bit timestamp = seconds since 1990 << 32 | ns)."""

    experiment: str
    run: int
    event: int
    timestamp: int = 0
    pulse_id: int | None = None

    @property
    def run_key(self) -> RunKey:
        return self.experiment, self.run


@dataclass(frozen=True)
class Binned:
    """A frame converted, checked, counted and binned where it was read (service/binning.py), in its place."""

    means: np.ndarray  # (S, S) float32 bin means, as Preprocessor.binned gives them
    shape: tuple[int, ...]  # the frame's shape
    dtype: str  # the frame's dtype (numpy's str)
    measure: float  # the blank pre-filter's measure
    finite: bool  # no NaN or Inf pixel


@dataclass
class Frame:
    """One event's detector data with its identity. `data` is raw (ADU) or calibrated (photons); a frame binned
    where it was read (a psana reader on the CPU) comes as `binned`, its `data` then empty."""

    event: EventId
    data: np.ndarray
    read_ns: int  # time.perf_counter_ns() when the frame was read, for end-to-end latency
    truth_n_particles: int | None = None
    on_release: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    binned: Binned | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.binned.shape if self.binned is not None else tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.binned.dtype) if self.binned is not None else self.data.dtype

    def release(self) -> None:
        """The consumer is done with `data`. A supervised (psana) source lends its frames straight from the
        shared-memory ring, saving a copy of every megapixel frame; this hands the slot back (once; a no-op
        for other sources). `data` must not be read afterwards. A frame never released stays valid: the
        reader then copies instead of lending once most of its ring is out."""
        if self.on_release is not None:
            self.on_release()
            self.on_release = None


@dataclass(frozen=True)
class RunEnd:
    """A run's last event has been read (psana's EndRun): the service closes the run now, not when the next
    run begins, so nothing counts the time between runs as a run without decisions."""

    experiment: str
    run: int


@runtime_checkable
class Source(Protocol):
    """Yields frames with event identity.

    `frame_shape` and `mask` are known after `open()` where the source can tell (h5, sim); `frame_shape` stays
    None where runs may differ (psana: each run's first frame says). `frames()` yields a RunEnd after a run's
    last frame where the source knows it, and None as an idle tick at least every 0.5 s while no data comes,
    so the consumer can notice shutdown and keep heartbeats going. `restarts` counts how often
    a supervised reader (psana in a child process) was restarted by its watchdog. A source read by
    processes of its own (psana's child, MPI ranks) says how many in `reader_processes` (0: read in the
    service's process); the service leaves them their cores. `stamps_events` (known after `open()`): whether
    each `EventId.timestamp` is the event's own (psana's; a CXI file's that records them), not the time it was
    read; then it names the event whatever reads it, where an event index may not (a live service counts the
    events it received). `open(cancel)`: a source that waits for its data to open (psana) stops waiting once
    `cancel` is set, so a SIGTERM during start-up is answered in a tick, and `close()` then cleans up.
    """

    uri: str
    frame_shape: tuple[int, ...] | None
    mask: np.ndarray | None
    restarts: int
    reader_processes: int
    stamps_events: bool

    def open(self, cancel: threading.Event | None = None) -> None: ...

    def frames(self) -> Iterator[Frame | RunEnd | None]: ...

    def close(self) -> None: ...


@runtime_checkable
class BinsAtReader(Protocol):
    """A source whose reader can bin its frames where it reads them (psana's reader process, each MPI rank):
    the pipeline on the CPU asks it to, and from then on its frames come as `Frame.binned`."""

    def bin_at_reader(self, binning: ReaderBinning) -> None: ...


class Embedder(Protocol):
    """Thumbnails (B, 1, S, S) -> embeddings (B, D); `info` holds the preprocessing it was trained with."""

    model_hash: str
    provider: str
    embed_dim: int
    info: ModelInfo

    def embed(self, thumbnails: torch.Tensor | np.ndarray) -> np.ndarray: ...


@dataclass
class Decisions:
    """Per-event results of a batch, as arrays: label codes (labels.Label), keep flags, score, distance."""

    label: np.ndarray
    keep: np.ndarray
    score: np.ndarray
    distance: np.ndarray
    n_particles: np.ndarray  # estimate, -1 where none


class Bank(Protocol):
    """Reference embeddings that turn an embedding into a decision."""

    model_hash: str
    taken: dict[str, Any] | None  # how its references were taken (dataset.taken), where known

    def decide(self, embeddings: np.ndarray) -> Decisions: ...


class CurrentBank(Protocol):
    """The bank in use, replaced whole when its file changes (`check`) or on request (`reload`); a bank that is
    refused leaves the old one in place. Both return whether a new bank was taken."""

    path: Path

    @property
    def bank(self) -> Bank: ...

    def check(self) -> bool: ...

    def reload(self) -> bool: ...


class Publisher(Protocol):
    """Sends messages to subscribers without ever blocking the caller; `alive` is False once it cannot, `depth`
    is what waits to go out, `subscriptions` how many topic subscriptions subscribers hold."""

    @property
    def alive(self) -> bool: ...

    @property
    def depth(self) -> int: ...

    @property
    def subscriptions(self) -> int: ...

    def publish(self, topic: str, payload: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...

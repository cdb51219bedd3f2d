"""The serve pipeline: source -> checks -> preprocess -> blank pre-filter -> embed -> bank -> log + publish.

Threads (design.md, "The serve process model"):
  reader   iterates `Source.frames()` into a bounded queue, and stops on `stop()`;
  worker   takes dynamic batches, decides them and writes every decision to the run's log, then
           hands the messages to the publisher; it owns the runs (begin/end messages, logs) and `seq`;
  monitor  every heartbeat period: heartbeat message, gauges, source restarts, bank file changes;
  zmq      the publisher's own thread, the only one touching the socket.
Every frame read gets exactly one decision: frames that cannot be classified (wrong shape or dtype,
NaN/Inf pixels, or an unexpected failure of a batch) get `label: error` with a reason.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from lcls_hitfinder import __version__
from lcls_hitfinder.dataset import taken_otherwise
from lcls_hitfinder.devices import resolve_device
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import Label, label_of_count
from lcls_hitfinder.preprocess import OFFSET_TWICE, PEDESTAL_LEFT, Preprocessor, all_finite, offset_taken_twice
from lcls_hitfinder.protocols import BinsAtReader, CurrentBank, Embedder, Frame, Publisher, RunEnd, RunKey, Source
from lcls_hitfinder.service.batcher import Batcher
from lcls_hitfinder.service.binning import (
    FrameBinner,
    Prefilter,
    ReaderBinning,
    fitting_mask,
    readers_bin,
)
from lcls_hitfinder.service.log_writer import ChildLog, LogLost, LogWriter
from lcls_hitfinder.service.messages import DECISION, HEARTBEAT, RUN, decision_payloads
from lcls_hitfinder.service.metrics import ServiceMetrics
from lcls_hitfinder.service.reader import MAX_FRAME_SHAPES
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.systemd import notify
from lcls_hitfinder.verdicts import PREFILTER, Verdicts

log = logging.getLogger(__name__)

LABEL_TEXT = np.array([label.text for label in Label], dtype=object)  # indexed by label code
_IDLE_S = 0.2  # how long the worker waits for frames before doing its idle chores (log flush)
# torch's and onnxruntime's words for a CUDA runtime error, after which the device context is unusable:
# torch's "CUDA error: ...", "CUDA driver error: ...", "cuDNN error: ...", onnxruntime's "CUDA failure 700: ...",
# "CUBLAS failure 13: ...", "CUDNN failure ...", "TensorRT EP execution context enqueue failed." (out of memory
# is not one: the next batch may fit)
_GPU_FAILED = re.compile(r"\b(CUDA|CUBLAS|CUDNN)( driver)? (error|failure)\b|\bTensorRT EP\b.*\bfailed\b", re.I)
_DRAIN_QUIET_S = 2.0  # after a failure: how long without a frame before the reader is taken to have stopped
QUEUE_BYTES = 1 << 30  # frames queued at most, as float32: serve.queue_size (256) of a megapixel
QUEUE_MIN_FRAMES = 16  # however big the frames: a few batches


def service_threads(settings: ServeSettings, source: Source) -> int:
    """`serve.threads`, or for 0 the cores less one for each process reading the source (psana's reader child,
    or its MPI ranks), at least one: threads beyond the free cores only wait for each other (a small gain at
    most on two cores beside psana's child: BENCHMARKS.md, "Threads beside the reader")."""
    if settings.threads:
        return settings.threads
    return max(1, len(os.sched_getaffinity(0)) - source.reader_processes)


@dataclass
class Tally:
    """Decisions by label and keeps, for the whole service (heartbeats) and per run; drops: service-wide."""

    counts: dict[str, int] = field(default_factory=lambda: {label.text: 0 for label in Label})
    keep: int = 0
    dropped: int = 0
    truth_known: int = 0  # decisions on events whose true particle count the source knew
    truth_agree: int = 0  # ... whose label was the true one
    binned_at_reader: int = 0  # frames a psana reader binned (service-wide)

    def add(self, labels: np.ndarray, keep: np.ndarray) -> None:
        codes, n = np.unique(labels, return_counts=True)
        for code, count in zip(codes.tolist(), n.tolist(), strict=True):
            self.counts[Label(code).text] += count
        self.keep += int(keep.sum())

    @property
    def events(self) -> int:
        return sum(self.counts.values())


@dataclass
class Run:
    experiment: str
    run: int
    first_seq: int
    started_ns: int
    decision_log: ChildLog | None
    tally: Tally = field(default_factory=Tally)

    @property
    def key(self) -> RunKey:
        return self.experiment, self.run


class ColumnsError(Exception):
    """A batch's decisions cannot be put into the log's columns (e.g. an event index beyond int64)."""


class Pipeline:
    """Runs the service on an opened source until it ends or `stop()` is called; then drains."""

    def __init__(
        self,
        settings: ServeSettings,
        source: Source,
        embedder: Embedder,
        bank: CurrentBank,
        publisher: Publisher,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.source = source
        self.embedder = embedder
        self.bank = bank
        self.publisher = publisher
        self.metrics = metrics
        self.device = resolve_device(settings.device, "serve.device")
        self._frames: queue.Queue[Frame | RunEnd | None] = queue.Queue(self._queue_frames())
        self._batcher: Batcher[Frame | RunEnd] = Batcher(
            self._frames, settings.batch.max_size, settings.batch.max_wait_ms / 1e3
        )
        self._stop = threading.Event()
        self._interrupted = threading.Event()  # a second signal: the drain is cut short
        self.cut_short = False  # the interruption came before the drain had ended
        self._reload = threading.Event()
        self._done = threading.Event()
        # the shape the source states when opened (h5, sim); a psana source's comes from each run's first frame
        self._stated_shape: tuple[int, ...] | None = source.frame_shape
        self._shape = self._stated_shape
        self._pedestal_checked = False  # each run's first finite frame is looked at for ADU taken as photons
        self._offset_checked = False  # and its first whole frame for an offset taken off calibrated data
        self._pres: dict[tuple[int, ...], Preprocessor] = {}  # by frame shape: a run may bring another one
        self._host: dict[np.dtype, torch.Tensor] = {}  # a GPU's pinned batch buffers, by raw dtype
        self._sent: dict[np.dtype, torch.cuda.Event] = {}  # when each buffer's last copy to the GPU is done
        # The frames of a batch are shared among these threads (numpy and torch let go of the GIL), which
        # bin them one frame a thread on the CPU, each with a `FrameBinner` of its own (`_scratch`), or copy them
        # into the pinned buffer for a GPU. While the pipeline runs on the CPU, torch's own intra-op
        # threads are off: they wait for each other at every step of every frame, and stall whenever
        # another process (psana's reader) holds a core (BENCHMARKS.md, "Frames binned one at a time").
        self._workers = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="frames")
        self._blas: tuple[threadpool_limits, int] | None = None  # see start()
        self._scratch = threading.local()
        self._prefilter = Prefilter(settings.prefilter)
        self._next_seq = 0
        self._published_seq = 0  # decisions published and counted in the tallies (what heartbeats say)
        self._tally_lock = threading.Lock()  # the tallies and _published_seq move together
        self._accounted = 0  # frames the worker has logged or dropped: what a failure must not count again
        self._run: Run | None = None
        self._last_run: RunKey | None = None
        self._restarts_seen = 0
        self._restarts_lock = threading.Lock()
        self._started = time.monotonic()
        self.instance = secrets.token_hex(8)  # in every message: a subscriber tells a restart by it
        self.total = Tally()
        self._dropped_by_run: Counter[RunKey] = Counter()
        self._recent_latency_ns: deque[np.ndarray] = deque(maxlen=64)  # last batches, for the status line
        self.error: BaseException | None = None
        self._read_ended = "source_end"  # why the reader stopped: the last run's end says it
        self.logs: list[str] = []  # decision logs written, in run order
        self._log_writer = LogWriter()  # a process of its own: HDF5's failures cost a log, never the service
        metrics.set_build_info(__version__, embedder.model_hash, embedder.provider, str(self.device))
        self._threads = [
            threading.Thread(target=self._read, name="reader", daemon=True),
            threading.Thread(target=self._work, name="worker", daemon=True),
            threading.Thread(target=self._monitor, name="monitor", daemon=True),
        ]

    # ---- control -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # the pool works in parallel over frames instead (see __init__)
        if readers_bin(self.settings) and isinstance(self.source, BinsAtReader):
            s, preprocess = self.settings, self.embedder.info.preprocess
            always = s.reader.bin_in_reader == "always"
            self.source.bin_at_reader(ReaderBinning(preprocess, s.calibration, s.prefilter, self.source.mask, always))
        # The bank's distances are one small matrix product a batch. OpenBLAS's threads wait for each other
        # in it, and while every core is busy (psana's reader, the pool) one product took 2-8 ms instead of
        # 0.3-0.7 ms on one thread (BENCHMARKS.md, "numpy's BLAS on one thread"). Set here and restored by
        # `wait` in the caller's thread: OpenBLAS 0.3.31 ignored a worker thread's setting after the main
        # thread had made one.
        self._blas = threadpool_limits(1, user_api="blas"), threading.get_ident()
        if self.settings.log_dir is not None:
            try:
                self._log_writer.start()
            except Exception as err:  # no process to be had now (EAGAIN, ENOMEM): the first run's log tries again
                log.warning("the decision log's writer could not start (%s); the first run tries again", err)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop reading; what was read is still decided, logged and published."""
        self._stop.set()

    def interrupt(self) -> None:
        """Stop reading and cut the drain short: the batch in hand is finished, the frames still waiting are
        dropped (reason interrupted, in the run's totals), and the run is closed as after `stop`: whatever was
        published is in the log."""
        self._interrupted.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_bank_reload(self) -> None:
        self._reload.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once every decision is out and the last run is closed; then the BLAS threads of the thread
        that called `start` are as they were."""
        done = self._done.wait(timeout)
        if done and self._blas is not None and self._blas[1] == threading.get_ident():
            self._blas[0].restore_original_limits()
            self._blas = None
        return done

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # ---- reader --------------------------------------------------------------------------------------------
    def _read(self) -> None:
        limit = self.settings.max_events
        n = 0
        frames = self.source.frames()
        read_stage = self.metrics.stage.labels(stage="read")
        try:
            t = time.perf_counter()
            for frame in frames:
                if isinstance(frame, RunEnd):
                    self._frames.put(frame)  # never dropped: it closes its run
                elif frame is not None:
                    read_stage.observe(time.perf_counter() - t)
                    self._put(frame)
                    n += 1
                if self._stop.is_set() or (limit is not None and n >= limit):
                    self._read_ended = "stopped" if self._stop.is_set() else "max_events"
                    break
                if frame is not None:  # an idle tick (None) is not an event: the wait for the next one goes on
                    t = time.perf_counter()
        except UserError as err:  # said in one line: the source's own words
            log.error("the source failed, ending the run: %s", err)
            self.error, self._read_ended = err, "source_failed"
        except Exception as err:
            log.exception("the source failed; ending the run")
            self.error, self._read_ended = err, "source_failed"
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
            self._frames.put(None)

    def _put(self, frame: Frame) -> None:
        if self.settings.overflow == "block":
            self._frames.put(frame)
            return
        try:
            self._frames.put_nowait(frame)
        except queue.Full:
            self._drop(frame, "queue_full")

    def _drop(self, frame: Frame, reason: str) -> None:
        """An event read that will get no decision: counted, so that the run's totals account for it."""
        frame.release()
        self.metrics.dropped.labels(reason=reason).inc()
        with self._tally_lock:  # the reader (queue_full) and the worker (internal) both drop
            self.total.dropped += 1
            self._dropped_by_run[frame.event.run_key] += 1  # its run may not have begun yet
            if reason == "internal":
                self._accounted += 1

    # ---- worker --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        failed = False
        try:
            while True:
                if self._interrupted.is_set():
                    self.cut_short = True
                    self._drop_queued("interrupted")
                    break
                batch = self._batcher.next(_IDLE_S)
                if batch:
                    self._process_items(batch)
                elif self._batcher.ended:
                    break
                self._with_log(ChildLog.check)  # what the log's writer said while no batch came
        except Exception as err:
            log.exception("the pipeline failed")
            self.error, failed = err, True
            self._stop.set()
            self._drop_queued("internal")
        finally:
            try:
                self._end_run("failed" if failed else self._read_ended)
                self._poll_restarts()
            except Exception as err:
                log.exception("ending the last run failed")
                self.error = self.error or err
            finally:  # whatever happened, `wait` returns
                try:
                    self._log_writer.stop()
                except Exception:
                    log.exception("stopping the decision log's writer failed")
                self._pool.shutdown()
                if self.device.type == "cpu":
                    torch.set_num_threads(self._workers)
                self._done.set()

    def _drop_queued(self, reason: str) -> None:
        """After the worker failed or was interrupted: the frames queued, and those the stopping reader still
        puts (it stops after the frame in hand), are dropped (`reason`) until its end of stream, or until none
        came for longer than a reader goes between frames."""
        quiet_since = time.monotonic()
        while not self._batcher.ended and time.monotonic() - quiet_since < _DRAIN_QUIET_S:
            items = self._batcher.next(_IDLE_S)
            if items:
                quiet_since = time.monotonic()
            for item in items:
                if isinstance(item, Frame):
                    self._drop(item, reason)

    def _process_items(self, items: list[Frame | RunEnd]) -> None:
        """A batch may straddle a run boundary: frames go on in pieces of one run each, and a RunEnd closes
        its run once the frames before it are out. If this fails, its frames not yet recorded (logged or
        dropped) are dropped before the failure goes on up."""
        frames = [item for item in items if isinstance(item, Frame)]
        accounted = self._accounted
        try:
            self._process_pieces(items)
        except Exception:
            for frame in frames[self._accounted - accounted :]:  # recorded in order: the rest never were
                self._drop(frame, "internal")
            raise

    def _process_pieces(self, items: list[Frame | RunEnd]) -> None:
        n_frames = sum(isinstance(item, Frame) for item in items)
        if n_frames:
            self.metrics.batch_size.observe(n_frames)
        piece: list[Frame] = []
        for item in items:
            if isinstance(item, Frame) and (not piece or item.event.run_key == piece[0].event.run_key):
                piece.append(item)
                continue
            if piece:
                self._process(piece)
            piece = [item] if isinstance(item, Frame) else []
            if isinstance(item, RunEnd) and self._run is not None and self._run.key == (item.experiment, item.run):
                self._end_run("run_end")
        if piece:
            self._process(piece)

    def _process(self, frames: list[Frame]) -> None:
        key = frames[0].event.run_key
        if self._run is None or self._run.key != key:
            self._end_run("next_run")
            self._begin_run(*key)
        try:
            verdicts = self._decide(frames)
        except Exception as err:  # never lose the events: a failed batch becomes error decisions
            log.exception("a batch of %d frames failed", len(frames))
            verdicts = Verdicts.errors(len(frames), f"internal: {type(err).__name__}: {err}")
            if _GPU_FAILED.search(str(err)):  # a broken CUDA context fails every later batch as well
                log.error("the GPU failed: stopping with an error, so that the service is restarted")
                self.error = self.error or err
                self.stop()
        finally:
            for f in frames:  # those not converted (bad frames, a failed batch) too
                f.release()
        try:
            self._output(self._columns(frames, verdicts), verdicts)
        except ColumnsError:  # an event identity the log cannot hold: only that event is lost, and counted
            for i, frame in enumerate(frames):
                try:
                    self._output(self._columns([frame], verdicts[i : i + 1]), verdicts[i : i + 1])
                except ColumnsError as err:
                    log.error("event %s cannot be recorded (%s); dropped", frame.event, err)
                    self._drop(frame, "internal")

    def _check(self, frame: Frame) -> str:
        """Why a frame cannot be classified ('' if it can): dtype or shape."""
        if frame.shape == (0,):  # how readers hand over an event without this detector's data
            return "shape: the detector is missing from this event"
        if frame.dtype.kind not in "uif":
            return f"dtype: {frame.dtype} is not a numeric image"
        if self._shape is None and len(frame.shape) in (2, 3):
            if self._pres and frame.shape not in self._pres:
                log.warning("frames of %s from this run on, before of %s", frame.shape, ", ".join(map(str, self._pres)))
            self._shape = frame.shape
        if frame.shape != self._shape:
            return f"shape: {frame.shape}, expected {self._shape}"
        return ""

    def _queue_frames(self) -> int:
        """`serve.queue_size`, held to QUEUE_BYTES of float32 frames where the source states their shape (h5:,
        sim:): 256 frames of a 4-megapixel detector took 4.6 GB (a review), 16 MiB a frame. psana sources keep
        their frames in their ring and queue only its views."""
        size = self.settings.queue_size
        shape = self.source.frame_shape
        if shape is None:
            return size
        most = max(QUEUE_MIN_FRAMES, QUEUE_BYTES // (4 * math.prod(shape)))
        if most < size:
            log.info(
                "a queue of %d frames of %s (serve.queue_size %d: %d MiB at most)", most, shape, size, QUEUE_BYTES >> 20
            )
        return min(size, most)

    def _preprocessor(self) -> Preprocessor:
        """The preprocessing of the run's frame shape, built once for each shape the service meets."""
        shape = self._shape
        assert shape is not None
        pre = self._pres.get(shape)
        if pre is None:
            if len(self._pres) >= MAX_FRAME_SHAPES:  # the oldest goes: a few detector settings, not every run's
                del self._pres[next(iter(self._pres))]
            mask = fitting_mask(self.source.mask, shape)
            if mask is None and self.source.mask is not None:
                log.warning(
                    "the source's mask %s does not fit its frames %s; ignoring it", self.source.mask.shape, shape
                )
            preprocess = self.embedder.info.preprocess  # the model's own settings, as in training
            pre = self._pres[shape] = Preprocessor(preprocess, mask, shape, self.settings.calibration, self.device)
            self._say_references_taken_otherwise(shape)
        return pre

    def _say_references_taken_otherwise(self, shape: tuple[int, ...]) -> None:
        """Warn where the bank's references were frames of another shape (picked as a panel stack and served as
        psana's image, or the other way round): its decisions on these frames are not what it was made for."""
        otherwise = taken_otherwise(self.bank.bank.taken, {"frame_shape": list(shape)})
        if otherwise:
            log.warning("bank %s: %s", self.bank.path, otherwise)

    def _bin_on_cpu(self, pre: Preprocessor, frames: list[Frame]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bin means (B, 1, S, S), pre-filter measures (B,) and finiteness (B,) of frames: each frame as its
        reader binned it, or by the `FrameBinner` of one pool thread (released as soon as it is converted)."""
        n = len(frames)
        binned = torch.empty((n, 1, pre.settings.thumbnail, pre.settings.thumbnail))
        measure = np.zeros(n, np.float64)
        finite = np.ones(n, bool)

        @torch.inference_mode()  # a mode of the thread: the pool's threads need it too
        def bin_frame(i: int) -> None:
            binner = getattr(self._scratch, "binner", None)
            if binner is None or binner.pre is not pre:  # the thread's first frame, or a run of another shape
                binner = self._scratch.binner = FrameBinner(pre, self._prefilter)
            result = binner.bin(frames[i].data, frames[i].release)
            binned[i, 0] = torch.from_numpy(result.means)
            measure[i], finite[i] = result.measure, result.finite

        at_reader = [(i, f.binned) for i, f in enumerate(frames) if f.binned is not None]
        if at_reader:  # in one copy: frame by frame, torch's indexing cost more than the 16 KB each
            rows = [i for i, _ in at_reader]
            binned[rows, 0] = torch.from_numpy(np.stack([b.means for _, b in at_reader]))
            measure[rows] = [b.measure for _, b in at_reader]
            finite[rows] = [b.finite for _, b in at_reader]
        list(self._pool.map(bin_frame, [i for i, f in enumerate(frames) if f.binned is None]))
        return binned, torch.from_numpy(measure), torch.from_numpy(finite)

    def _bin_on_device(self, pre: Preprocessor, frames: list[Frame]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `_bin_on_cpu` gives, for a GPU: the batch's raw frames (uint16 stays uint16) are copied into
        a pinned host buffer by the pool's threads, sent without blocking and converted, checked, counted
        and binned on the device as one batch."""
        arrays = [f.data for f in frames]
        dtype = np.result_type(*(a.dtype for a in arrays))
        buf = self._host.get(dtype)
        if buf is None or tuple(buf.shape[1:]) != pre.frame_shape:  # the first batch, or a run of another shape
            torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
            shape = (self.settings.batch.max_size, *pre.frame_shape)
            buf = torch.empty(shape, dtype=torch_dtype, pin_memory=self.device.type == "cuda")
            self._host[dtype] = buf
        sent = self._sent.pop(dtype, None)
        if sent is not None:  # the last batch's copy out of this buffer may still run: not overwritten before
            sent.synchronize()
        view = buf[: len(arrays)]
        out = view.numpy()
        list(self._pool.map(lambda i: np.copyto(out[i], arrays[i], casting="unsafe"), range(len(arrays))))
        for f in frames:  # their pixels are in the pinned buffer now: the reader may reuse the slots
            f.release()
        raw = view.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._sent[dtype] = torch.cuda.Event()
            self._sent[dtype].record()
        finite = torch.ones(len(arrays), dtype=torch.bool, device=self.device)
        if any(a.dtype.kind == "f" for a in arrays):
            finite = all_finite(raw)
        # `raw` is the batch's own device copy, read for the last time above: converted in place, not copied again
        photons = pre.photons(raw, inplace=True, signed=any(a.dtype.kind in "if" for a in arrays))
        return pre.binned(photons), self._prefilter.measure(photons), finite

    def _decide(self, frames: list[Frame]) -> Verdicts:
        t0 = time.perf_counter()
        v = Verdicts.errors(len(frames))
        v.reason[:] = [self._check(f) for f in frames]
        good = np.flatnonzero(v.reason == "")
        if not len(good):
            return v
        pre = self._preprocessor()
        with torch.inference_mode():
            to_bin = [frames[i] for i in good]
            if not self._offset_checked:  # the run's first frame that came whole: its raw pixels, before binning
                whole = next((f.data for f in to_bin if f.binned is None), None)
                if whole is not None:
                    self._offset_checked = True
                    if offset_taken_twice(whole, pre.calibration, fitting_mask(self.source.mask, whole.shape)):
                        assert self._run is not None
                        c = pre.calibration
                        log.warning("run %s:%d looks like %s (offset %g)", *self._run.key, OFFSET_TWICE, c.offset)
            on_cpu = self.device.type == "cpu"
            binned, measure, finite = self._bin_on_cpu(pre, to_bin) if on_cpu else self._bin_on_device(pre, to_bin)
            at_reader = sum(f.binned is not None for f in to_bin)
            self.metrics.frames_binned.labels(where="reader").inc(at_reader)
            self.metrics.frames_binned.labels(where="service").inc(len(to_bin) - at_reader)
            self.total.binned_at_reader += at_reader
            if not self._pedestal_checked and bool(finite.any()):
                self._pedestal_checked = True
                first = int(finite.nonzero()[0, 0])  # the run's first finite frame
                self._say_pedestal(pre, binned[first : first + 1])
            blank = self._prefilter.blank(measure) & finite
            to_model = finite & ~blank
            all_to_model = bool(to_model.all())
            thumbs = pre.transformed(binned if all_to_model else binned[to_model]) if bool(to_model.any()) else None
            finite_np, blank_np = finite.cpu().numpy(), blank.cpu().numpy()
        t1 = time.perf_counter()
        self.metrics.stage.labels(stage="preprocess").observe(t1 - t0)
        if thumbs is None:
            v.judge(good, finite_np, blank_np, None)
            return v
        embeddings = self.embedder.embed(thumbs)
        t2 = time.perf_counter()
        v.judge(good, finite_np, blank_np, self.bank.bank.decide(embeddings))
        self.metrics.stage.labels(stage="infer").observe(t2 - t1)
        self.metrics.stage.labels(stage="decide").observe(time.perf_counter() - t2)
        return v

    def _say_pedestal(self, pre: Preprocessor, binned: torch.Tensor) -> None:
        """A run whose first frame looks like detector units taken as photons is said at its start: its frames would
        be decided (and nearly all vetoed) with nothing else to show that the calibration is missing."""
        if bool(pre.pedestal_left(binned)[0]):
            c = pre.calibration
            assert self._run is not None
            log.warning(
                "run %s:%d looks like %s. [serve.calibration] has gain %g, offset %g: give the detector's gain (ADU "
                "a photon) and, for raw data, its pedestal; or read psana's calibrated data (data=calib) with its gain",
                *self._run.key,
                PEDESTAL_LEFT,
                c.gain,
                c.offset,
            )

    def _columns(self, frames: list[Frame], v: Verdicts) -> dict[str, np.ndarray]:
        """The decisions of `frames` as the log's columns, numbered from the next `seq` (taken only once they
        are all built, so that a failure here leaves no gap)."""
        try:
            return self._build_columns(frames, v)
        except (OverflowError, ValueError, TypeError) as err:
            raise ColumnsError(err) from err

    def _build_columns(self, frames: list[Frame], v: Verdicts) -> dict[str, np.ndarray]:
        n = len(frames)
        events = [f.event for f in frames]
        truth = np.array([-1 if f.truth_n_particles is None else f.truth_n_particles for f in frames], np.int64)
        truth[(truth < 0) | (truth > np.iinfo(np.int8).max)] = -1  # unknown rather than wrapped
        latency_ns = time.perf_counter_ns() - np.array([f.read_ns for f in frames], np.int64)
        seq = np.arange(self._next_seq, self._next_seq + n, dtype=np.int64)
        columns = {
            "seq": seq,
            "experiment": np.array([e.experiment for e in events], dtype=object),
            "run": np.array([e.run for e in events], np.int64),
            "event": np.array([e.event for e in events], np.int64),
            "timestamp": np.array([e.timestamp for e in events], np.uint64),
            "time_ns": np.full(n, time.time_ns(), np.int64),
            "pulse_id": np.array([-1 if e.pulse_id is None else e.pulse_id for e in events], np.int64),
            "label": LABEL_TEXT[v.label],
            "decision": np.where(v.keep, "keep", "veto").astype(object),
            "score": v.score,
            "distance": v.distance,
            "n_particles": v.n_particles,
            "latency_us": latency_ns // 1000,
            "model": np.full(n, self.embedder.model_hash, dtype=object),
            "truth_n_particles": truth.astype(np.int8),
            "reason": v.reason,
        }
        self._next_seq += n
        return columns

    def _output(self, columns: dict[str, np.ndarray], v: Verdicts) -> None:
        """Log first, then publish: the log holds every decision whatever happens to the messages."""
        t0 = time.perf_counter()
        truth, latency_ns = columns["truth_n_particles"], columns["latency_us"] * 1000
        run = self._run
        assert run is not None
        self._with_log(lambda d: d.append(columns))
        self._accounted += len(columns["seq"])  # recorded: whatever publishing does now
        try:
            for payload in decision_payloads(columns, self.instance):
                self.publisher.publish(DECISION, payload)
        finally:  # decided and logged even where publishing failed: counted in the run's totals
            self._count(columns, v, truth, latency_ns)
            with self._tally_lock:  # a heartbeat sees the decisions published and their totals together
                run.tally.add(v.label, v.keep)
                self.total.add(v.label, v.keep)
                self._published_seq = self._next_seq
        self.metrics.stage.labels(stage="publish").observe(time.perf_counter() - t0)

    def _count(self, columns: dict[str, np.ndarray], v: Verdicts, truth: np.ndarray, latency_ns: np.ndarray) -> None:
        m = self.metrics
        pairs, counts = np.unique(np.stack([v.label, v.keep.astype(np.int8)]), axis=1, return_counts=True)
        for (code, keep), count in zip(pairs.T.tolist(), counts.tolist(), strict=True):
            m.events.labels(label=Label(code).text, decision="keep" if keep else "veto").inc(count)
        for reason in columns["reason"][v.label == Label.ERROR]:
            m.frame_errors.labels(reason=str(reason).split(":")[0]).inc()
        m.prefilter_blank.inc(int(np.count_nonzero(v.reason == PREFILTER)))  # of the decisions made
        known = (truth >= 0) & (v.label != Label.ERROR)
        tally: Counter[tuple[Label, bool]] = Counter(
            (label_of_count(t), label_of_count(t) == label)
            for t, label in zip(truth[known].tolist(), v.label[known].tolist(), strict=True)
        )
        for true_label in {t for t, _ in tally}:  # both children: a class never labelled right reads 0, not nothing
            for right, name in ((True, "yes"), (False, "no")):
                m.truth_events.labels(truth=true_label.text, agree=name).inc(tally[true_label, right])
        agree = sum(n for (_, right), n in tally.items() if right)
        self.total.truth_known += int(known.sum())
        self.total.truth_agree += agree
        for ns in latency_ns.tolist():
            m.latency.observe(ns / 1e9)
        self._recent_latency_ns.append(latency_ns)
        m.last_event_time.set(time.time())

    # ---- runs ----------------------------------------------------------------------------------------------
    def _begin_run(self, experiment: str, run: int) -> None:
        self._shape = self._stated_shape  # where the source does not state it, the run's first frame sets it
        self._pedestal_checked = self._offset_checked = False
        decision_log = None
        if self.settings.log_dir is not None:
            attrs = {
                "experiment": experiment,
                "run": run,
                "source": self.source.uri,
                "model": self.embedder.model_hash,
                "provider": self.embedder.provider,
                "bank": str(self.bank.path),
                "instance": self.instance,
            }
            try:
                decision_log = self._log_writer.open(self.settings.log_dir, experiment, run, attrs)
            except Exception as err:  # an unwritable or unreachable log folder must not stop the decisions either
                log.error(
                    "cannot open a decision log in %s (%s); run %s:%d goes on without it",
                    self.settings.log_dir,
                    err,
                    experiment,
                    run,
                )
                self._log_failed()
            else:
                self.logs.append(str(decision_log.path))
                self.metrics.decision_log_lost.set(0)
        self._run = Run(experiment, run, self._next_seq, time.time_ns(), decision_log)
        self._last_run = (experiment, run)
        self.metrics.run_open.set(1)
        self.metrics.run_number.set(run)
        self.publisher.publish(RUN, self._run_payload("begin"))
        log.info("run %s:%d begins (seq %d)", experiment, run, self._next_seq)

    def _end_run(self, ended: str) -> None:
        """Close the open run, saying why (`ended`, as the run message's field documents)."""
        run = self._run
        if run is None:
            return
        payload = {**self._run_payload("end"), "ended": ended}
        totals = ("events", "counts", "keep", "dropped", "duration_s", "ended")
        self._with_log(lambda d: d.close({k: payload[k] for k in totals}))
        if run.decision_log is None:  # it failed at the close: the end names no log it cannot vouch for
            payload["log"] = None
        self.publisher.publish(RUN, payload)
        self._dropped_by_run.pop(run.key, None)  # a run served again starts from 0
        self.metrics.run_open.set(0)
        self._run = None
        log.info("run %s:%d ends: %d events, %s", run.experiment, run.run, run.tally.events, run.tally.counts)

    def _with_log(self, action: Callable[[ChildLog], None]) -> None:
        """Apply `action` to the run's decision log; a disk error is reported and the run goes on without it."""
        run = self._run
        if run is None or run.decision_log is None:
            return
        try:
            action(run.decision_log)
        except Exception as err:  # a full disk (or any failure to write) must not stop the decisions
            path = run.decision_log.path
            log.error("decision log %s failed (%s); this run goes on without it", path, err)
            self._log_failed()
            run.decision_log.abandon()
            run.decision_log = None
            if isinstance(err, LogLost) and not err.kept and str(path) in self.logs:  # not one of the logs written
                self.logs.remove(str(path))

    def _log_failed(self) -> None:
        """Counted, and said lost until a run's log is created again (the alert lasts as long as the loss)."""
        self.metrics.decision_log_failures.inc()
        self.metrics.decision_log_lost.set(1)

    def _run_payload(self, phase: str) -> dict[str, object]:
        run = self._run
        assert run is not None
        return {
            "instance": self.instance,
            "phase": phase,
            "experiment": run.experiment,
            "run": run.run,
            "time_ns": time.time_ns(),
            "source": self.source.uri,
            "model": self.embedder.model_hash,
            "provider": self.embedder.provider,
            "first_seq": run.first_seq,
            "events": run.tally.events,
            "counts": dict(run.tally.counts),
            "keep": run.tally.keep,
            "dropped": self._dropped_by_run[(run.experiment, run.run)],
            "duration_s": (time.time_ns() - run.started_ns) / 1e9 if phase == "end" else 0.0,
            "log": None if run.decision_log is None else str(run.decision_log.path),
            "ended": None,
        }

    # ---- monitor -------------------------------------------------------------------------------------------
    def _monitor(self) -> None:
        period = self.settings.publish.heartbeat_s
        last_events, last_t = 0, time.monotonic()
        next_bank_check = time.monotonic()
        status = _Status(self.total.events, time.monotonic())
        while not self._done.wait(period):
            try:
                now = time.monotonic()
                events = self.total.events
                self._heartbeat((events - last_events) / max(now - last_t, 1e-9))
                last_events, last_t = events, now
                if self.settings.status_s and now - status.since >= self.settings.status_s:
                    status = self._log_status(status, events, now)
                self._poll_restarts()
                if not self.publisher.alive and not self._stop.is_set():  # the log still holds every decision
                    log.error("the publisher's thread has ended: stopping with an error, to be restarted")
                    self.error = self.error or RuntimeError("the publisher's thread ended")
                    self.stop()
                taken = False
                if self._reload.is_set():
                    self._reload.clear()
                    taken = self.bank.reload()
                elif now >= next_bank_check:
                    next_bank_check = now + self.settings.bank_poll_s
                    taken = self.bank.check()
                shape = self._shape
                if taken and shape is not None:
                    self._say_references_taken_otherwise(shape)
            except Exception:  # heartbeats must outlive any one failure: without them the service looks dead
                log.exception("the monitor's round failed; heartbeats go on")

    def _log_status(self, previous: _Status, events: int, now: float) -> _Status:
        """One line for the operator: rate, latency, keep fraction and (simulations) agreement with the truth."""
        t = self.total
        line = f"{(events - previous.events) / (now - previous.since):.0f} Hz, {events} events"
        recent = list(self._recent_latency_ns)
        if recent:
            p50, p99 = np.percentile(np.concatenate(recent), [50, 99]) / 1e6
            line += f", latency p50 {p50:.1f} ms p99 {p99:.1f} ms"
        if events:
            line += f", keep {100 * t.keep / events:.1f}%, errors {t.counts[Label.ERROR.text]}"
        if t.truth_known:
            line += f", agrees with the truth {100 * t.truth_agree / t.truth_known:.1f}%"
        if t.dropped:
            line += f", dropped {t.dropped}"
        log.info(line)
        notify(f"STATUS={line}")  # `systemctl status` shows it under systemd
        return _Status(events, now)

    def _poll_restarts(self) -> None:
        """Carry the source's restart count into the metric (from the monitor, and once more at the end)."""
        with self._restarts_lock:
            restarts = int(self.source.restarts)
            if restarts > self._restarts_seen:
                self.metrics.source_restarts.inc(restarts - self._restarts_seen)
                self._restarts_seen = restarts

    def _heartbeat(self, rate_hz: float) -> None:
        depth = self._frames.qsize()
        self.metrics.queue_depth.labels(queue="frames").set(depth)
        self.metrics.queue_depth.labels(queue="publish").set(self.publisher.depth)
        now = time.time_ns()
        self.metrics.heartbeat_time.set(now / 1e9)
        last = self._last_run
        with self._tally_lock:
            next_seq, counts, keep = self._published_seq, dict(self.total.counts), self.total.keep
        self.publisher.publish(
            HEARTBEAT,
            {
                "instance": self.instance,
                "time_ns": now,
                "uptime_s": time.monotonic() - self._started,
                "next_seq": next_seq,
                "rate_hz": rate_hz,
                "counts": counts,
                "keep": keep,
                "dropped": self.total.dropped,
                "source_restarts": self._restarts_seen,
                "queue_depth": depth,
                "subscriptions": self.publisher.subscriptions,
                "run_open": self._run is not None,
                "experiment": None if last is None else last[0],
                "run": None if last is None else last[1],
                "model": self.embedder.model_hash,
                "provider": self.embedder.provider,
                "source": self.source.uri,
            },
        )


@dataclass(frozen=True)
class _Status:
    events: int
    since: float

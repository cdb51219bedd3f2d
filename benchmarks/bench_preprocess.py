"""The service's CPU preprocessing of 1024 x 1024 uint16 frames, side by side with the alternatives.

    .venv/bin/python benchmarks/bench_preprocess.py [--batch 32] [--threads 2] [--repeats 5]

  binning      `block_means` (adds each bin's rows first, then sums the short rows) against summing along
               the rows first, on a batch of float32 frames and on one frame already in cache;
  per frame    `Pipeline._bin_on_cpu`: each frame converted, counted and binned in one frame-sized float32
               buffer that stays in cache, the frames shared among --threads threads (torch's own threads
               off, as in the service); against the service's path before it (`batch_buffer`): frames
               counted and converted into a float32 batch buffer by a pool of threads, then each step
               over the whole batch;
  floor        one read of each frame (a copy into a frame-sized uint16 buffer): what touching every
               pixel once costs on this machine's memory.
Milliseconds a frame, best of --repeats; the pipeline rows with the default lit-pixel pre-filter and without.
"""

from __future__ import annotations

import argparse
import functools
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_service import SIDE, model_and_bank  # benchmarks/ is this script's directory

from lcls_hitfinder.embedder import OnnxEmbedder
from lcls_hitfinder.preprocess import Preprocessor, block_means
from lcls_hitfinder.protocols import EventId, Frame, RunEnd
from lcls_hitfinder.service.bank_reload import ReloadingBank
from lcls_hitfinder.service.metrics import ServiceMetrics
from lcls_hitfinder.service.pipeline import Pipeline
from lcls_hitfinder.service.publish import ZmqPublisher
from lcls_hitfinder.service.settings import ServeSettings


def rows_first(frames: torch.Tensor, side: int) -> torch.Tensor:
    """The alternative order: sum each bin's pixels along the rows, then down the columns."""
    b, h, w = frames.shape
    rows = frames.reshape(b, h, side, w // side).sum(-1)
    return (rows.reshape(b, side, h // side, side).sum(2) / (h // side * w // side)).unsqueeze(1)


def batch_buffer(
    pipeline: Pipeline, pre: Preprocessor, frames: list[Frame], buf: np.ndarray, pool: ThreadPoolExecutor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The alternative: the CPU path of the service until 2026-12-06 (bins and pre-filter measures)."""
    count = pipeline._prefilter.raw_count(pre, {f.data.dtype for f in frames})

    def put(i: int) -> int:
        counted = count(frames[i].data) if count is not None else 0
        np.copyto(buf[i], frames[i].data, casting="unsafe")
        return counted

    counts = list(pool.map(put, range(len(frames))))
    photons = pre.photons(torch.from_numpy(buf[: len(frames)]), inplace=True, signed=False)
    measure = torch.tensor(counts, dtype=torch.float64) if count is not None else pipeline._prefilter.measure(photons)
    return pre.binned(photons), measure


def best_ms(run: Callable[[], object], frames: int, repeats: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return best / frames * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:SIDE, :SIDE] - SIDE / 2
    ring = 3.0 * np.exp(-((np.hypot(y, x) - 200) ** 2) / 2000)
    raw = rng.poisson(0.05 + ring * rng.random((args.batch, 1, 1)), (args.batch, SIDE, SIDE)).astype(np.uint16)
    as_float = torch.from_numpy(raw.astype(np.float32))
    n = args.batch
    rows: list[tuple[str, float, float]] = []  # name, ours, alternative

    in_cache = as_float[:1].clone()  # the service bins a frame it has just converted
    for name, frames, times in (("binning, batch", as_float, 1), ("binning, one frame in cache", in_cache, n)):
        ours, alt = (
            best_ms(functools.partial(_bin_repeatedly, f, frames, times), n, args.repeats)
            for f in (block_means, rows_first)
        )
        rows.append((name, ours, alt))

    scratch = np.empty((SIDE, SIDE), np.uint16)
    floor = best_ms(functools.partial(_copy_each, raw, scratch), n, args.repeats)

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as d:
        model, bank = model_and_bank(Path(d), None, None)
        embedder = OnnxEmbedder(model)
        metrics = ServiceMetrics()
        publisher = ZmqPublisher("tcp://127.0.0.1:*", 1000)
        pre = Preprocessor(embedder.info.preprocess, None, (SIDE, SIDE))
        buf = np.empty((n, SIDE, SIDE), np.float32)
        pool = ThreadPoolExecutor(args.threads)
        results: list[tuple[torch.Tensor, torch.Tensor]] = []
        for prefilter in ("lit_pixels", "none"):
            settings = ServeSettings.model_validate(
                {"prefilter": {"kind": prefilter}, "batch": {"max_size": n}, "metrics": {"port": None}, "log_dir": d}
            )
            reloading = ReloadingBank(bank, embedder, metrics)
            pipeline = Pipeline(settings, _NoSource(), embedder, reloading, publisher, metrics)
            batch = _frames(raw)  # nothing in a Frame is used up by binning it
            torch.set_num_threads(1)  # as `Pipeline.start` has it on the CPU: the pool's threads share the frames
            ours = best_ms(functools.partial(pipeline._bin_on_cpu, pre, batch), n, args.repeats)
            torch.set_num_threads(args.threads)  # the alternative used torch's threads on the whole batch
            alt = best_ms(functools.partial(batch_buffer, pipeline, pre, batch, buf, pool), n, args.repeats)
            for path in (pipeline._bin_on_cpu, functools.partial(batch_buffer, pipeline, buf=buf, pool=pool)):
                with torch.inference_mode():
                    bins, measure = path(pre, _frames(raw))[:2]
                results.append((bins, measure))
            rows.append((f"frames -> bins, pre-filter {prefilter}", ours, alt))
        publisher.close()
        pool.shutdown()
    for (bins, measure), (alt_bins, alt_measure) in zip(results[::2], results[1::2], strict=True):
        torch.testing.assert_close(bins, alt_bins)  # the same work, or the comparison means nothing
        torch.testing.assert_close(measure, alt_measure)

    print(f"machine: {platform.machine()}, {args.threads} torch threads, torch {torch.__version__}")
    print(f"frames: {n} x {SIDE}x{SIDE} uint16 -> 64 x 64, best of {args.repeats}")
    print(f"{'ms a frame':<40}{'ours':>8}{'alternative':>13}{'alt / ours':>12}{'ours / floor':>14}")
    for name, ours, alt in rows:
        print(f"{name:<40}{ours:>8.3f}{alt:>13.3f}{alt / ours:>12.2f}{ours / floor:>14.2f}")
    print(f"{'floor: one copy of each frame':<40}{floor:>8.3f}")


def _bin_repeatedly(binning: Callable[[torch.Tensor, int], torch.Tensor], frames: torch.Tensor, times: int) -> None:
    for _ in range(times):
        binning(frames, 64)


def _copy_each(raw: np.ndarray, scratch: np.ndarray) -> None:
    for frame in raw:
        np.copyto(scratch, frame)


def _frames(raw: np.ndarray) -> list[Frame]:
    return [Frame(EventId("bench", 1, i, 0), f, 0) for i, f in enumerate(raw)]


class _NoSource:
    """The pipeline is only asked to bin frames here: nothing is read."""

    uri = "none:"
    frame_shape: tuple[int, ...] | None = (SIDE, SIDE)
    mask: np.ndarray | None = None
    restarts = 0
    reader_processes = 0
    stamps_events = False

    def open(self, cancel: threading.Event | None = None) -> None:
        pass

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        return iter(())

    def close(self) -> None:
        pass


if __name__ == "__main__":
    main()

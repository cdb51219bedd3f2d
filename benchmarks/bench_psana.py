"""The service on a psana2 XTC2 file of 1024 x 1024 uint16 frames, side by side with psana alone.

    .venv/bin/python benchmarks/bench_psana.py [--frames N] [--model M --bank B]

On one XTC2 file (written with psana's DgramEdit, then read once so it sits in the page cache):
  psana bare   psana's own loop: DataSource(files=) -> det.raw.raw(evt), nothing else, in this process;
  one pass     that loop plus one copy of each frame into a frame-sized buffer (in cache): the hardware
               floor, what reading every pixel once costs on this machine's memory;
  floor        that loop plus a block-average of each frame to the thumbnail (torch, float32, frame by
               frame as the service does): the least any classifier must do;
  source       `Psana2Source` alone: psana in the supervised child, frames through the shared-memory ring;
  exp, MPI     the same on the run laid out for psana's exp= mode: serial, and MPI in 3 and 4 ranks
               (1 and 2 big-data ranks, batches of 20), plus the whole service on the 4-rank source;
  serve        the whole service on `xtc2:` (the same `Pipeline` run as benchmarks/bench_service.py:
               checks, preprocessing, ONNX, bank, decision log, ZeroMQ), saturated, the reader sharing the
               binning (the default); the same with every frame crossing whole (`bin_in_reader = never`);
               and with every frame copied out of the reader's ring (the alternative to lending the slots);
  live shmem   the service on `shmem:` while psana's shmemServer replays the file at --rate (120 Hz):
               events decided and p50/p99 latency from read to publish, with the service's default
               batching (no wait for company) and with batches waiting up to 5 ms.
Ratios are frames/s against psana bare (target >= 0.8), against one pass and against the floor. The
psana loops (and the writing) run in a process of their own, the service rows in this one, which never
runs psana itself, as in `lcls-hitfinder serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_service import model_and_bank, serve  # benchmarks/ is this script's directory

from lcls_hitfinder.embedder import OnnxEmbedder
from lcls_hitfinder.model_io import read_model_info
from lcls_hitfinder.preprocess import block_means
from lcls_hitfinder.protocols import Frame
from lcls_hitfinder.service.bank_reload import ReloadingBank
from lcls_hitfinder.service.decision_log import read_decision_log
from lcls_hitfinder.service.metrics import ServiceMetrics
from lcls_hitfinder.service.pipeline import Pipeline, service_threads
from lcls_hitfinder.service.publish import ZmqPublisher
from lcls_hitfinder.service.reader import SupervisedReader
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import open_source
from lcls_hitfinder.service.sources.shmem_server import ShmemServer
from lcls_hitfinder.service.sources.xtc2_writer import Xtc2Writer, exp_layout

SIDE = 1024


def write_run(path: Path, n: int) -> None:
    """uint16 frames: a speckle ring on a dim background (raw ADU, gain 1)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:SIDE, :SIDE] - SIDE / 2
    ring = 3.0 * np.exp(-((np.hypot(y, x) - 200) ** 2) / 2000)
    distinct = [rng.poisson(0.05 + ring * rng.random()).astype(np.uint16) for _ in range(16)]
    with Xtc2Writer(path, (SIDE, SIDE)) as w:
        for i in range(n):
            w.write(distinct[i % len(distinct)], n_particles=i % 5)


def psana_loop(path: Path, thumbnail: int | None, copy: bool = False) -> float:
    """frames/s of psana's own read loop: bare, with each frame copied once into a frame-sized buffer that
    stays in cache (`copy`: every pixel read once, the least a reader that looks at the pixels does), or
    (floor) with each frame converted to float32 and block-averaged to the thumbnail while it is in cache,
    as the service does. From the first event to the last, as `source_only` counts: psana's opening of the
    run is start-up, not throughput (and psana waits a while at the end of a file)."""
    from psana import DataSource

    ds = DataSource(files=str(path), skip_calib_load="all")
    run = next(ds.runs())
    det = run.Detector("cam")
    buf = np.empty((SIDE, SIDE), np.uint16)
    scratch = torch.empty((1, SIDE, SIDE))
    n, start, last = 0, 0.0, 0.0
    with torch.inference_mode():
        for evt in run.events():
            frame = det.raw.raw(evt)
            if thumbnail:
                np.copyto(scratch[0].numpy(), frame, casting="unsafe")
                block_means(scratch, thumbnail)
            elif copy:
                np.copyto(buf, frame)
            n += 1
            last = time.perf_counter()
            if n == 1:
                start = last
    return (n - 1) / (last - start)


@contextlib.contextmanager
def copying_reader() -> Iterator[None]:
    """Readers that lend no slot: every frame is copied out of the ring, as before frames were lent."""
    init = SupervisedReader.__init__

    def no_loans(self: SupervisedReader, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self._lend_most, self._lend_wait_s = 0, 0.0

    SupervisedReader.__init__ = no_loans  # type: ignore[method-assign]
    try:
        yield
    finally:
        SupervisedReader.__init__ = init  # type: ignore[method-assign]


def source_only(uri: str, settings: ServeSettings) -> float:
    """frames/s of the psana source as the service sees it (child process + shared-memory ring)."""
    src = open_source(uri, settings)
    src.open()
    n, start, last = 0, 0.0, 0.0
    for frame in src.frames():
        if isinstance(frame, Frame):
            frame.release()  # what the service does once it has converted the frame
            n += 1
            last = time.perf_counter()
            if n == 1:
                start = last  # the child's start-up is not throughput
    src.close()
    return (n - 1) / (last - start)


def live(path: Path, settings: ServeSettings, model: Path, bank: Path, rate_hz: float) -> dict[str, float]:
    """The service on shared memory: shmemServer replays the file at `rate_hz`; delivered events and latency."""
    tag = f"bench_psana_{os.getpid()}"
    publisher = ZmqPublisher("tcp://127.0.0.1:*", settings.publish.sndhwm)
    metrics = ServiceMetrics()
    src = open_source(f"shmem:{tag}?det=cam", settings.model_copy(update={"max_events": None}))
    threads, before = service_threads(settings, src), torch.get_num_threads()  # as `lcls-hitfinder serve` sets them
    torch.set_num_threads(threads)
    embedder = OnnxEmbedder(model, settings.providers, settings.batch.max_size, threads)
    src.open()
    pipeline = Pipeline(settings, src, embedder, ReloadingBank(bank, embedder, metrics), publisher, metrics)
    with ShmemServer(tag, [path], rate_hz, SIDE * SIDE * 2) as server:
        pipeline.start()
        while server.running:  # it exits once the whole file is sent
            time.sleep(0.2)
        time.sleep(2.0)  # let the last events through
        pipeline.stop()
        pipeline.wait()
    src.close()
    publisher.close()
    torch.set_num_threads(before)
    columns, _ = read_decision_log(pipeline.logs[0])
    latency_ms = columns["latency_us"] / 1e3
    return {
        "frames": len(latency_ms),
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--bank", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rate", type=float, default=120.0, help="shmemServer replay rate of the live run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_psana_", dir=os.environ.get("TMPDIR", "/tmp")) as d:
        tmp = Path(d)
        run = tmp / "run.xtc2"
        # psana's own loops run in a process of their own: after psana has run in a process, a service
        # in that same process decides 0.7x as many frames/s (measured), and `lcls-hitfinder serve` never
        # runs psana in its own process either
        psana = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        t = time.perf_counter()
        psana.submit(write_run, run, args.frames).result()
        write_s = time.perf_counter() - t
        model, bank = model_and_bank(tmp, args.model, args.bank)
        thumbnail = read_model_info(model).preprocess.thumbnail
        settings = ServeSettings.model_validate(
            {
                "prefilter": {"kind": "none"},
                "batch": {"max_size": args.batch},  # the service's default wait: none (take what is waiting)
                "metrics": {"port": None},
                "log_dir": tmp / "logs",
                "max_events": args.frames,
            }
        )
        uri = f"xtc2:{run}?det=cam"
        psana.submit(psana_loop, run, None).result()  # into the page cache
        bare = psana.submit(psana_loop, run, None).result()
        one_pass = psana.submit(psana_loop, run, None, copy=True).result()
        floor = psana.submit(psana_loop, run, thumbnail).result()
        psana.shutdown()
        source = source_only(uri, settings)
        service = serve(uri, settings, model, bank)
        whole = settings.model_copy(update={"reader": settings.reader.model_copy(update={"bin_in_reader": "never"})})
        service_whole = serve(uri, whole, model, bank)
        with copying_reader():  # no slot stays out, so the reader would never be behind: whole frames
            service_copied = serve(uri, whole, model, bank)
        exp = f"exp:tstx00001:1?dir={exp_layout(run, tmp / 'xtc', 'tstx00001', 1)}&det=cam"
        mpi = {ranks: source_only(f"{exp}&ranks={ranks}&batch=20", settings) for ranks in (3, 4)}
        exp_serial = source_only(exp, settings)
        service_mpi = serve(f"{exp}&ranks=4&batch=20", settings, model, bank)
        shmem = live(run, settings, model, bank, args.rate)
        waiting = settings.model_copy(update={"batch": settings.batch.model_copy(update={"max_wait_ms": 5.0})})
        shmem_waiting = live(run, waiting, model, bank, args.rate)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average {load}")
    print(f"XTC2: {args.frames} frames {SIDE}x{SIDE} uint16 written with DgramEdit in {write_s:.1f} s")
    print(f"thumbnail {thumbnail}, batch <= {args.batch}, model {model.name}")
    print(f"{'run':<38}{'frames/s':>10}{'vs bare':>9}{'vs 1 pass':>11}{'vs floor':>10}")
    for name, fps in (
        ("psana bare (det.raw.raw)", bare),
        ("psana + one copy of each frame", one_pass),
        ("floor (psana + block-mean, 1 thread)", floor),
        ("Psana2Source (child + ring)", source),
        ("serve on xtc2:, saturated", service["fps"]),
        ("  same, no binning in reader", service_whole["fps"]),
        ("  same, frames copied from ring", service_copied["fps"]),
        ("Psana2Source exp:, serial", exp_serial),
        ("Psana2Source exp:, MPI 3 ranks", mpi[3]),
        ("Psana2Source exp:, MPI 4 ranks", mpi[4]),
        ("serve on exp:, MPI 4 ranks", service_mpi["fps"]),
    ):
        print(f"{name:<38}{fps:>10.0f}{fps / bare:>9.2f}{fps / one_pass:>11.2f}{fps / floor:>10.2f}")
    print(
        f"serve latency (saturated, queueing included): p50 {service['p50_ms']:.1f} ms, p99 {service['p99_ms']:.1f} ms"
    )
    for name, result in (("", shmem), (", batches waiting up to 5 ms for company", shmem_waiting)):
        print(
            f"live shmem{name}: at {args.rate:g} Hz, {result['frames']:.0f} of {args.frames} events decided "
            f"(the server drops what a slow reader misses), "
            f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
        )
    print(f"serve on xtc2:, frames binned by the reader: {service['binned_at_reader']:.0f} of {service['frames']}")
    per_frame = ", ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in service.items() if k.endswith("_ms_per_frame"))
    print(f"serve, ms per frame by stage: {per_frame}; error decisions: {service['errors']}")


if __name__ == "__main__":
    main()

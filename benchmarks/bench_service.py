"""Service throughput and latency on 1024 x 1024 uint16 frames, side by side with a floor.

    .venv/bin/python benchmarks/bench_service.py [--model M --bank B] [--seconds S]

Three measurements, in one process, on the same in-memory frames (an `h5:` CXI file with `memory=1`):
  floor      read the frames and block-average them to the thumbnail, nothing else (torch, frame by frame,
             on as many threads as the service bins with);
  saturated  the whole service (`Pipeline`: checks, preprocessing, pre-filter off, ONNX, bank, decision log,
             ZeroMQ publishing) reading as fast as it can: frames/s and the ratio to the floor; and the
             same with the service's default pre-filter (lit pixels counted on every frame);
  120 Hz     the service with frames arriving at LCLS-I's 120 Hz: p50/p99 latency from read to publish.
Without --model, a TwinEmbedder of the default size (64 x 64 thumbnails, 32-d) is exported and a bank of
random references built for it: the cost of inference does not depend on the weights.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.embedder import OnnxEmbedder
from lcls_hitfinder.learn.nets import TwinEmbedder
from lcls_hitfinder.model_io import export_onnx, read_model_info
from lcls_hitfinder.preprocess import PreprocessSettings, block_means
from lcls_hitfinder.protocols import Frame
from lcls_hitfinder.service.bank_reload import ReloadingBank
from lcls_hitfinder.service.decision_log import read_decision_log
from lcls_hitfinder.service.metrics import ServiceMetrics
from lcls_hitfinder.service.pipeline import Pipeline, service_threads
from lcls_hitfinder.service.publish import ZmqPublisher
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import open_source

SIDE = 1024
DISTINCT = 64  # distinct frames in memory (128 MiB), repeated


def write_frames(path: Path, rng: np.random.Generator) -> None:
    """uint16 frames: a speckle ring on a dim background, as a CXI file (raw ADU, gain 1)."""
    y, x = np.mgrid[:SIDE, :SIDE] - SIDE / 2
    ring = 3.0 * np.exp(-((np.hypot(y, x) - 200) ** 2) / 2000)
    frames = rng.poisson(0.05 + ring * rng.random((DISTINCT, 1, 1)), (DISTINCT, SIDE, SIDE)).astype(np.uint16)
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = frames


def model_and_bank(tmp: Path, model: Path | None, bank: Path | None) -> tuple[Path, Path]:
    if model is not None and bank is not None:
        return model, bank
    torch.manual_seed(0)
    info = export_onnx(TwinEmbedder(), PreprocessSettings(), tmp / "model.onnx")
    refs = np.random.default_rng(0).normal(size=(300, info.embed_dim))
    ReferenceBank(refs, np.repeat([0, 1, 2], 100), info.model_hash).save(tmp / "bank.h5")
    return info.path, tmp / "bank.h5"


def floor(uri: str, settings: ServeSettings, thumbnail: int, n: int) -> float:
    """frames/s of reading and block-averaging to the thumbnail, nothing else: each frame converted to
    float32 in a frame-sized buffer and binned there while it is in cache, as the service does, on as many
    threads as the service bins with (`service_threads`: a floor on one thread is no floor on two cores)."""
    src = open_source(uri, settings)
    threads, before = service_threads(settings, src), torch.get_num_threads()
    torch.set_num_threads(1)  # one frame a thread, as the service's pool bins them
    scratch = threading.local()

    @torch.inference_mode()
    def bin_frame(frame: Frame) -> None:
        if not hasattr(scratch, "buf"):
            scratch.buf = torch.empty((1, SIDE, SIDE))
        np.copyto(scratch.buf[0].numpy(), frame.data, casting="unsafe")
        block_means(scratch.buf, thumbnail)

    src.open()
    frames = itertools.islice((f for f in src.frames() if isinstance(f, Frame)), n)
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        for _ in pool.map(bin_frame, frames):
            pass
        elapsed = time.perf_counter() - start
    src.close()
    torch.set_num_threads(before)
    return n / elapsed


def serve(uri: str, settings: ServeSettings, model: Path, bank: Path) -> dict[str, float]:
    """Run the pipeline to the end of the source; frames/s after warm-up and latency percentiles."""
    publisher = ZmqPublisher("tcp://127.0.0.1:*", settings.publish.sndhwm)
    metrics = ServiceMetrics()
    src = open_source(uri, settings)
    threads, before = service_threads(settings, src), torch.get_num_threads()  # as `lcls-hitfinder serve` sets them
    torch.set_num_threads(threads)
    embedder = OnnxEmbedder(model, settings.providers, settings.batch.max_size, threads)
    src.open()
    pipeline = Pipeline(settings, src, embedder, ReloadingBank(bank, embedder, metrics), publisher, metrics)
    pipeline.start()
    pipeline.wait()
    src.close()
    publisher.close()
    torch.set_num_threads(before)
    columns, _ = read_decision_log(pipeline.logs[0])
    t = columns["time_ns"]
    skip = len(t) // 10  # warm-up: first batches build the preprocessor and the ONNX session's caches
    latency_ms = columns["latency_us"][skip:] / 1e3
    after = int(np.sum(t > t[skip]))  # decided after t[skip]: a batch's decisions share one time
    stages = {
        stage: metrics.stage.labels(stage=stage)._sum.get() / len(t) * 1e3
        for stage in ("preprocess", "infer", "decide", "publish")
    }
    return {
        **{f"{k}_ms_per_frame": v for k, v in stages.items()},
        "frames": len(t),
        "fps": after / ((t[-1] - t[skip]) / 1e9),
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
        "errors": int((columns["label"] == "error").sum()),
        "binned_at_reader": metrics.frames_binned.labels(where="reader")._value.get(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--bank", type=Path)
    parser.add_argument("--frames", type=int, default=3000, help="frames for the floor and the saturated run")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the 120 Hz run")
    parser.add_argument("--batch", type=int, default=32, help="serve.batch.max_size")
    parser.add_argument("--wait-ms", type=float, default=0.0, help="serve.batch.max_wait_ms")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_service_") as d:
        tmp = Path(d)
        write_frames(tmp / "frames.cxi", np.random.default_rng(0))
        model, bank = model_and_bank(tmp, args.model, args.bank)
        thumbnail = read_model_info(model).preprocess.thumbnail
        settings = ServeSettings.model_validate(
            {
                "prefilter": {"kind": "none"},
                "batch": {"max_size": args.batch, "max_wait_ms": args.wait_ms},
                "metrics": {"port": None},
                "log_dir": tmp / "logs",
            }
        )
        base = f"h5:{tmp / 'frames.cxi'}?memory=1&repeat=0"
        floor_fps = floor(base, settings, thumbnail, args.frames)
        saturated = serve(base, settings.model_copy(update={"max_events": args.frames}), model, bank)
        default_prefilter = ServeSettings().prefilter
        with_prefilter = serve(
            base, settings.model_copy(update={"max_events": args.frames, "prefilter": default_prefilter}), model, bank
        )
        n120 = int(120 * args.seconds)
        live = serve(f"{base}&rate=120", settings.model_copy(update={"max_events": n120}), model, bank)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"frames: {SIDE}x{SIDE} uint16, thumbnail {thumbnail}, batch <= {args.batch}, wait <= {args.wait_ms} ms, "
        f"model {model.name}"
    )
    print(f"{'run':<28}{'frames':>8}{'frames/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs floor':>10}")
    print(f"{'floor (read + block-mean)':<28}{args.frames:>8}{floor_fps:>10.0f}{'':>9}{'':>9}{1:>10.2f}")
    for name, r in (
        ("service, saturated", saturated),
        ("  same, lit-pixel pre-filter", with_prefilter),
        ("service, 120 Hz arrival", live),
    ):
        ratio = f"{r['fps'] / floor_fps:.2f}" if r is not live else "-"  # paced: its rate is the source's
        print(f"{name:<28}{r['frames']:>8.0f}{r['fps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{ratio:>10}")
    print(f"error decisions: {saturated['errors'] + with_prefilter['errors'] + live['errors']}")
    per_frame = ", ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in saturated.items() if k.endswith("_ms_per_frame"))
    print(f"saturated run, ms per frame by stage: {per_frame}")


if __name__ == "__main__":
    main()

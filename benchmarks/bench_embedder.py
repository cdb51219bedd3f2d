"""Embedder throughput in onnxruntime at batch 64, side by side with its floors.

Prints thumbnails/s for: a bare numpy copy of the batch (the floor any inference is measured against),
the same network in eager torch, and the exported model in onnxruntime (CPU provider), with ratios.
Usage: python benchmarks/bench_embedder.py [MODEL.onnx] [--threads 2] [--batch 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lcls_hitfinder.model_io import INPUT_NAME, read_model_info

ROOT = Path(__file__).resolve().parents[1]


def rate(fn: Callable[[], object], batch: int, seconds: float) -> float:
    for _ in range(5):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


ARCH_KEYS = ("embed_dim", "width", "depth", "convs", "unshuffle", "radial_rings")


def torch_twin(model: Path) -> torch.nn.Module | None:
    """The same architecture in eager torch (random weights: the speed is the same), None if not a twin.

    Built by training's own `build_net` from the model's summary; an ensemble's members side by side, as exported.
    """
    from lcls_hitfinder.learn.nets import ConcatEmbedder
    from lcls_hitfinder.learn.settings import TrainSettings
    from lcls_hitfinder.learn.train import build_net

    info = read_model_info(model)
    if info.summary.get("kind") != "twin":
        return None

    def member(s: dict[str, Any]) -> torch.nn.Module:
        arch = {k: s[k] for k in ARCH_KEYS if k in s}  # older summaries lack the newer keys: their defaults
        return build_net("twin", TrainSettings(preprocess=info.preprocess, **arch), 0)

    members = info.summary.get("members")
    net = ConcatEmbedder([member(m) for m in members]) if members else member(info.summary)
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?", type=Path, default=ROOT / "models" / "embedder.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = read_model_info(args.model)
    s = info.preprocess.thumbnail
    x = np.random.default_rng(0).normal(size=(args.batch, 1, s, s)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service runs it
    session = ort.InferenceSession(str(args.model), opts, providers=["CPUExecutionProvider"])
    out = np.empty_like(x)

    rows = {"numpy copy (floor)": rate(lambda: np.copyto(out, x), args.batch, args.seconds)}
    net = torch_twin(args.model)
    if net is not None:
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            rows["torch eager"] = rate(lambda: net(xt), args.batch, args.seconds)
    rows["onnxruntime"] = rate(lambda: session.run(None, {INPUT_NAME: x}), args.batch, args.seconds)

    size = args.model.stat().st_size / 1e6
    print(f"model {args.model.name} ({info.model_hash}, {size:.2f} MB), thumbnails {s}x{s}, embed dim {info.embed_dim}")
    print(f"batch {args.batch}, {args.threads} threads, {platform.machine()} {platform.processor() or ''}".rstrip())
    ort_rate = rows["onnxruntime"]
    print(f"{'path':<22}{'thumbnails/s':>14}{'onnxruntime / path':>22}")
    for name, r in rows.items():
        print(f"{name:<22}{r:>14,.0f}{ort_rate / r:>22.3f}")
    print(f"target >= 5,000 thumbnails/s in onnxruntime: {'met' if ort_rate >= 5000 else 'MISSED'}")


if __name__ == "__main__":
    main()

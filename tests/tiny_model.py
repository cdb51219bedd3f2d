"""What the end-to-end tests share: a tiny exported embedder with a bank of its own embeddings of simulated,
labelled patterns (the service's path does not depend on the model's quality, and this is quick on 2 cores),
free loopback ports, and rows for a decision log."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.embedder import OnnxEmbedder
from lcls_hitfinder.learn.nets import TwinEmbedder
from lcls_hitfinder.model_io import export_onnx
from lcls_hitfinder.preprocess import Preprocessor, PreprocessSettings
from lcls_hitfinder.service.messages import LOG_COLUMNS
from lcls_hitfinder.simulate.generate import PatternGenerator
from lcls_hitfinder.simulate.settings import SimulateSettings


def tiny_model_and_bank(d: Path, settings: SimulateSettings, seed: int | None = None) -> tuple[Path, Path]:
    """model.onnx and bank.h5 in `d`: the bank holds 60 references drawn with `settings` (and `seed`)."""
    torch.manual_seed(0)
    info = export_onnx(TwinEmbedder(8, 4, 2), PreprocessSettings(thumbnail=16), d / "model.onnx")
    generator = PatternGenerator(settings, seed=seed, device="cpu")
    refs = generator.generate(60)
    pre = Preprocessor(info.preprocess, generator.mask, tuple(generator.shape))
    emb = OnnxEmbedder(info.path).embed(pre(refs.images))
    ReferenceBank(emb, refs.n_particles, info.model_hash, k=3).save(d / "bank.h5")
    return info.path, d / "bank.h5"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: the kernel can give a port just released
    again at once, so two calls in a row (a service's publish endpoint and its metrics port) could get the same
    one, and the service then failed to bind its second."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def log_rows(n: int, text: str = "") -> dict[str, np.ndarray]:
    """`n` rows of a decision log's columns: zeros, and `text` in its string columns."""
    return {
        c.name: np.full(n, text if c.log_dtype == "str" else 0, dtype=object if c.log_dtype == "str" else c.log_dtype)
        for c in LOG_COLUMNS
    }

"""Export of a trained twin embedder to the project's ONNX model file, checked against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.learn.train import load_run
from lcls_hitfinder.model_io import INPUT_NAME, ModelInfo, export_onnx

PARITY_TOLERANCE = 1e-4


def parity(module: torch.nn.Module, model: Path, thumbnails: np.ndarray) -> float:
    """max |onnxruntime - torch| over the embeddings of `thumbnails`."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {INPUT_NAME: thumbnails.astype(np.float32)})[0]
    with torch.no_grad():
        torch_out = module.eval()(torch.from_numpy(thumbnails)).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def export_run(run_dir: Path, out: Path) -> tuple[ModelInfo, float]:
    """Export the best weights of a twin run, with its preprocessing and training summary as metadata.

    Refuses to leave a file behind whose outputs differ from torch's by more than PARITY_TOLERANCE.
    """
    run, settings, net = load_run(run_dir)
    if run["kind"] != "twin":
        raise UserError(f"{run_dir} is a {run['kind']} run; only twin embedders are exported for serving")
    summary = {
        "kind": "twin",
        "data": Path(run["data"]).name,
        "val": Path(run["val"]).name,
        "frame_shape": run["frame_shape"],
        "epochs": len(run["history"]),
        "embed_dim": settings.embed_dim,
        "width": settings.width,
        "depth": settings.depth,
        "unshuffle": settings.unshuffle,
        "radial_rings": settings.radial_rings,
        "alpha": settings.alpha,
        "mining": settings.mining,
        "classes": settings.classes,
        "seed": settings.seed,
        "best_validation": run["best"],
        "augment": settings.augment.model_dump(mode="json"),
    }
    info = export_onnx(net, settings.preprocess, out, summary)
    s = settings.preprocess.thumbnail
    probe = np.random.default_rng(0).normal(size=(16, 1, s, s)).astype(np.float32)
    diff = parity(net, out, probe)
    if diff > PARITY_TOLERANCE:
        Path(out).unlink()
        raise UserError(f"exported model differs from torch by {diff:.2e} > {PARITY_TOLERANCE}; not written")
    return info, diff

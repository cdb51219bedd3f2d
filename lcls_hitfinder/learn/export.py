"""Export of a trained twin embedder to the project's ONNX model file, checked against torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.learn.nets import ConcatEmbedder
from lcls_hitfinder.learn.settings import TrainSettings
from lcls_hitfinder.learn.train import load_run
from lcls_hitfinder.model_io import INPUT_NAME, ModelInfo, export_onnx, read_model_info, rotations, with_rotations
from lcls_hitfinder.paths import apart, replaced

PARITY_TOLERANCE = 1e-4


def onnx_embedding(model: Path) -> Callable[[np.ndarray], np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return lambda thumbnails: session.run(None, {INPUT_NAME: thumbnails.astype(np.float32)})[0]


def torch_embedding(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def embed(thumbnails: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module.eval()(torch.from_numpy(thumbnails)).numpy()

    return embed


Reference = torch.nn.Module | Callable[[np.ndarray], np.ndarray]


def parity(reference: Reference, model: Path, thumbnails: np.ndarray) -> float:
    """max |onnxruntime - reference| over the embeddings of `thumbnails`, the reference (a torch module, or the
    plain model's embedding) averaged over as many rotations as the model averages over."""
    embed = torch_embedding(reference) if isinstance(reference, torch.nn.Module) else reference
    views = read_model_info(model).views
    expected = np.mean([embed(t) for t in rotations(thumbnails, views)], axis=0)
    return float(np.abs(onnx_embedding(model)(thumbnails) - expected).max())


def _checked(reference: Reference, model: Path, thumbnail: int) -> float:
    """Parity on random thumbnails (the caller's file is not written when it fails)."""
    probe = np.random.default_rng(0).normal(size=(16, 1, thumbnail, thumbnail)).astype(np.float32)
    diff = parity(reference, model, probe)
    if diff > PARITY_TOLERANCE:
        raise UserError(f"exported model differs from its reference by {diff:.2e} > {PARITY_TOLERANCE}; not written")
    return diff


def _twin_summary(run_dir: Path, run: dict[str, Any], settings: TrainSettings) -> dict[str, Any]:
    if run["kind"] != "twin":
        raise UserError(f"{run_dir} is a {run['kind']} run; only twin embedders are exported for serving")
    return {
        "kind": "twin",
        "data": Path(run["data"]).name,
        "val": Path(run["val"]).name,
        "frame_shape": run["frame_shape"],
        "epochs": len(run["history"]),
        "embed_dim": settings.embed_dim,
        "width": settings.width,
        "depth": settings.depth,
        "convs": settings.convs,
        "unshuffle": settings.unshuffle,
        "radial_rings": settings.radial_rings,
        "alpha": settings.alpha,
        "mining": settings.mining,
        "classes": settings.classes,
        "per_structure": settings.per_structure,
        "negatives": settings.negatives,
        "aux_weight": settings.aux_weight,
        "steps_per_epoch": settings.steps_per_epoch,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "best_validation": run["best"],
        "augment": settings.augment.model_dump(mode="json"),
    }


def export_run(run_dirs: list[Path], out: Path, views: int = 1) -> tuple[ModelInfo, float]:
    """Export the best weights of one twin run, or of several as one ensemble, with preprocessing and
    training summary as metadata; with `views` > 1, averaging over that many rotations (`with_rotations`).

    An ensemble's members must share their preprocessing (one thumbnail feeds them all) and their embedding
    dimension (the RMS distance over the concatenation weighs each member by its dimension: equal ones make
    it the members' mean squared distance); its summary lists theirs under "members". Refuses to leave a
    file behind whose outputs differ from torch's by more than PARITY_TOLERANCE.
    """
    if not run_dirs:
        raise UserError("export needs at least one run directory")
    if len({d.resolve() for d in run_dirs}) < len(run_dirs):
        raise UserError("an ensemble's members must be different runs: one run given twice costs twice the time")
    loaded = [(d, *load_run(d)) for d in run_dirs]
    summaries = [_twin_summary(d, run, settings) for d, run, settings, _ in loaded]
    preprocess = loaded[0][2].preprocess
    for d, _, settings, _ in loaded[1:]:
        if settings.preprocess != preprocess:
            raise UserError(
                f"{d} preprocesses differently from {run_dirs[0]} ({settings.preprocess} against {preprocess}); "
                "an ensemble's members must share their preprocessing (one thumbnail feeds them all)"
            )
    dims = {str(d): s["embed_dim"] for d, s in zip(run_dirs, summaries, strict=True)}
    if len(set(dims.values())) > 1:
        raise UserError(
            f"an ensemble's members must have one embedding dimension, not {dims}: the bank's distance would "
            "weigh them by their dimensions instead of averaging them"
        )
    nets = [net for *_, net in loaded]
    if len(nets) == 1:
        net, summary = nets[0], summaries[0]
    else:
        net = ConcatEmbedder(nets).eval()
        summary = {
            "kind": "twin",
            "ensemble": len(nets),
            "embed_dim": sum(m["embed_dim"] for m in summaries),
            "members": summaries,
        }
    with replaced(out) as tmp:  # a model already at `out` stays until this one is whole and checked
        info = export_onnx(net, preprocess, tmp, summary)
        if views != 1:
            info = with_rotations(tmp, views, tmp)
        return dataclasses.replace(info, path=out), _checked(net, tmp, preprocess.thumbnail)


def export_rotations(model: Path, views: int, out: Path) -> tuple[ModelInfo, float]:
    """An exported model made to average over `views` rotations, checked against the model itself."""
    apart(out, model, f"--out {out} is the model itself: write the averaging model to another file")
    with replaced(out) as tmp:
        info = with_rotations(model, views, tmp)
        return dataclasses.replace(info, path=out), _checked(onnx_embedding(model), tmp, info.preprocess.thumbnail)

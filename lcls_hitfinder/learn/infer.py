"""Offline inference with an exported embedder: dataset -> shared preprocessing -> the onnxruntime
embedder the service uses -> embeddings, and reference banks built from them.

Used by `bank build`, `classify`, `evaluate` and the demo (which builds its sample's bank).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lcls_hitfinder.bank import (
    DEFAULT_K,
    Method,
    ReferenceBank,
    at_single_fraction,
    calibrate_threshold,
    select_references,
)
from lcls_hitfinder.dataset import Dataset, pattern_digests
from lcls_hitfinder.embedder import OnnxEmbedder
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.frame_file import FrameFile
from lcls_hitfinder.labels import TARGET_PRECISION
from lcls_hitfinder.preprocess import (
    OFFSET_TWICE,
    PEDESTAL_LEFT,
    PhotonCalibration,
    Preprocessor,
    all_finite,
    offset_taken_twice,
)
from lcls_hitfinder.service.binning import Prefilter

_BATCH_BYTES = 256 << 20  # of float32 frames read at a time: 256 frames of a megapixel, 16 of a Jungfrau 4M


def embed_frames(
    embedder: OnnxEmbedder,
    data: Dataset | FrameFile,
    calibration: PhotonCalibration | None = None,
    prefilter: Prefilter | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (N, D) of every pattern, preprocessed for this model with the file's own mask and, for raw
    frames, `calibration` (the service's), or else the one a dataset in ADU records; per pattern whether all
    its pixels were finite (the service's check), and whether `prefilter` (the service's) calls it blank.
    Patterns that are not finite or are blank by the pre-filter are not embedded: their embedding is NaN.
    Patterns that look like raw ADU taken as photons are embedded, and said (a bank of them keeps nothing)."""
    from rich.console import Console
    from rich.progress import track

    pre = Preprocessor(embedder.info.preprocess, data.mask, data.shape, calibration or data.calibration)
    # frames at a time: a few copies of a batch are made on the way (a review: 64 Jungfrau 4M frames, 4.5 GB)
    batch = max(1, _BATCH_BYTES // (4 * int(np.prod(data.shape))))
    console = Console(stderr=True)  # stdout is the commands' output (bank build's JSON, classify's summary)
    progress = track(
        range(0, len(data), batch),
        description=f"embedding {data.path.name}",
        transient=True,
        console=console,
        disable=not console.is_terminal,  # a transient bar leaves only an empty line in a log file
    )
    embeddings = np.full((len(data), embedder.info.embed_dim), np.nan, np.float32)
    finite, blank = np.ones(len(data), bool), np.zeros(len(data), bool)
    pedestal = offset_twice = 0
    for lo in progress:
        frames = torch.from_numpy(np.ascontiguousarray(data.images(slice(lo, lo + batch))))
        offset_twice += sum(offset_taken_twice(f, pre.calibration, data.mask) for f in frames.numpy())
        ok = all_finite(frames).numpy() if frames.is_floating_point() else np.ones(len(frames), bool)
        finite[lo : lo + len(frames)] = ok
        rows = lo + np.flatnonzero(ok)
        photons = pre.photons(frames[torch.from_numpy(ok)])
        if prefilter is not None:
            dim = prefilter.blank(prefilter.measure(photons)).numpy()
            blank[rows[dim]] = True
            rows, photons = rows[~dim], photons[torch.from_numpy(~dim)]
        if len(rows):
            binned = pre.binned(photons)
            pedestal += int(pre.pedestal_left(binned).sum())
            embeddings[rows] = embedder.embed(pre.transformed(binned))
    if pedestal:
        console.print(
            f"warning: {pedestal} of {len(data)} patterns of {data.path} look like {PEDESTAL_LEFT}. Raw frames "
            "need the detector's gain and offset: `classify --config` and `bank pick --config` take them from "
            "[serve.calibration], as `serve` does (references picked without them: pick them again)",
            markup=False,
            highlight=False,
        )
    if offset_twice:
        console.print(
            f"warning: {offset_twice} of {len(data)} patterns of {data.path} look like {OFFSET_TWICE}",
            markup=False,
            highlight=False,
        )
    return embeddings, finite, blank


def embed_dataset(
    embedder: OnnxEmbedder, data: Dataset | FrameFile, calibration: PhotonCalibration | None = None
) -> np.ndarray:
    """`embed_frames`' embeddings alone, for labelled data (references, evaluation): a frame with NaN or Inf
    pixels has no embedding to draw or judge, and is refused by its index rather than scored."""
    embeddings, finite, _ = embed_frames(embedder, data, calibration)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise UserError(
            f"{data.path}: {len(bad)} pattern(s) hold NaN or Inf pixels (index {shown}); labelled data must be "
            "finite (`classify` labels such frames error)"
        )
    return embeddings


def build_bank(
    model: Path,
    data: Path,
    per_class: int,
    by_structure: bool = False,
    calibrate: Path | None = None,
    target_precision: float = TARGET_PRECISION,
    k: int = DEFAULT_K,
    method: Method = "knn",
    seed: int = 0,
    single_fraction: float | None = None,
) -> tuple[ReferenceBank, dict[str, float | int | bool]]:
    """References drawn from `data` (per particle count, optionally per structure); the threshold calibrated
    on `calibrate`, or else on the patterns of `data` not drawn as references, for the precision among patterns
    of which `single_fraction` are singles (None: as the calibration patterns are).

    Returns the bank and what calibration found (threshold, its precision and recall, reached).
    """
    embedder = OnnxEmbedder(model, threads=2)
    with Dataset(data) as d:
        emb, n, structure = embed_dataset(embedder, d), d.n_particles, d.structure
        picked_with = d.attrs.get("calibration") if "picked_from" in d.attrs else None  # `bank pick`'s
        taken = d.taken
    refs = select_references(n, structure if by_structure else None, per_class, seed)
    try:
        bank = ReferenceBank(
            emb[refs],
            n[refs],
            embedder.model_hash,
            method,
            k,
            structure=structure[refs],
            picked_with=picked_with,
            taken=taken,
        )
    except UserError as err:  # say which file the references came from
        raise UserError(f"references from {data}: {err}") from None
    if calibrate is not None:
        with Dataset(calibrate) as c:
            cal_emb, cal_n = embed_dataset(embedder, c), c.n_particles
        calibration_digests = pattern_digests(calibrate)
    else:
        rest = np.setdiff1d(np.arange(len(n)), refs)
        cal_emb, cal_n = emb[rest], n[rest]
        calibration_digests = pattern_digests(data, rest)
    bank.seen = np.unique(np.concatenate([pattern_digests(data, refs), calibration_digests]), axis=0)
    if not (cal_n == 1).any():  # say which file lacks them, and what to do
        if calibrate is not None:
            raise UserError(f"{calibrate} has no single hits to calibrate the threshold on")
        raise UserError(
            f"every single hit of {data} became a reference, none is left to calibrate the threshold on: "
            "use fewer --per-class, or give --calibrate FILE"
        )
    scores, _ = bank.scores(cal_emb)
    single = cal_n == 1
    bank.threshold, reached = calibrate_threshold(scores, single, target_precision, single_fraction)
    keep = scores >= bank.threshold
    precision = float((keep & single).sum() / keep.sum()) if keep.any() else float("nan")
    report = {
        "references": len(refs),
        "calibration_patterns": len(cal_n),
        "calibration_singles": int(single.sum()),  # what the precision rests on
        "threshold": bank.threshold,
        "target_precision": target_precision,
        "reached": reached,
        "precision": float(at_single_fraction(precision, single, single_fraction)),
        "single_fraction": float(single.mean()) if single_fraction is None else single_fraction,
        "recall": float((keep & single).sum() / single.sum()),  # single.any(): checked above
    }
    return bank, report

"""Frames to the thumbnail's bins on the CPU, one frame at a time, and the blank pre-filter's measure.

The same code runs in the service's preprocessing threads and, for psana sources, in the reader process
itself (each MPI rank for its own frames; `ReaderBinning`), which then sends the bins (16 KB at 64 x 64)
instead of the frame (2 MiB at a megapixel of uint16). Either way a frame is converted to float32, checked,
counted and binned by `FrameBinner` with the `Preprocessor` that training uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lcls_hitfinder.devices import resolve_device
from lcls_hitfinder.preprocess import PhotonCalibration, Preprocessor, PreprocessSettings, all_finite
from lcls_hitfinder.protocols import Binned
from lcls_hitfinder.service.settings import PrefilterSettings, ServeSettings

_EXACT_IN_FLOAT32 = {np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "float32")}


def readers_bin(settings: ServeSettings) -> bool:
    """Whether the service asks psana readers to bin (`ReaderBinning`): preprocessing on the CPU, and
    `serve.reader.bin_in_reader` not "never" (a GPU takes frames whole and converts them itself)."""
    return resolve_device(settings.device, "serve.device").type == "cpu" and settings.reader.bin_in_reader != "never"


class Prefilter:
    """The cheap pre-filter: a frame whose `measure` (lit pixels, or photons in all) is below the cut is blank.

    On the CPU numpy counts lit pixels: torch's comparison and count of a megapixel frame take 4-5x as long
    (the count goes through an int64 copy of the lit map). Where the count on the raw frame must come out
    the same, `raw_count` takes it on the raw frame instead, before it is converted.
    """

    def __init__(self, settings: PrefilterSettings) -> None:
        self.settings = settings

    def raw_count(self, pre: Preprocessor, dtypes: set[np.dtype]) -> Callable[[np.ndarray], int] | None:
        """A count of lit pixels to take on each raw frame of these dtypes, or None where it could differ
        from the count on photons: `pre` changes values on the way (`keeps_above`), or float32 does not
        hold every raw value exactly. Taken on the raw frame while it is read anyway, it saves a pass over
        the photons."""
        p = self.settings
        if p.kind != "lit_pixels" or not pre.keeps_above(p.lit_threshold) or not dtypes <= _EXACT_IN_FLOAT32:
            return None
        level = np.float32(p.lit_threshold)  # photons are float32: compared with the float32 threshold

        def count(frame: np.ndarray) -> int:
            if frame.dtype.kind == "f":
                return int(np.count_nonzero(frame > level))
            # an integer is above the threshold exactly where it is above its floor
            floor = min(math.floor(level), np.iinfo(frame.dtype).max)
            if floor == 0 and frame.dtype.kind == "u":  # above 0 is not 0: counted without a boolean copy,
                return int(np.count_nonzero(frame))  # 0.05 ms a megapixel against 0.14 (the default threshold)
            return int(np.count_nonzero(frame > floor))

        return count

    def measure(self, photons: torch.Tensor) -> torch.Tensor:
        """(B, H, W) photons -> (B,) float64 on their device: lit pixels or total photons (0 if no pre-filter)."""
        p = self.settings
        if p.kind == "lit_pixels":
            if photons.device.type != "cpu":
                lit = (photons > p.lit_threshold).flatten(1).sum(1)
            else:
                lit = torch.tensor([np.count_nonzero(f > p.lit_threshold) for f in photons.numpy()])
            return lit.to(torch.float64)
        if p.kind == "photons":
            return photons.flatten(1).sum(1, dtype=torch.float64)
        return torch.zeros(photons.shape[0], dtype=torch.float64, device=photons.device)

    def blank(self, measure: torch.Tensor) -> torch.Tensor:
        """(B,) measures -> (B,) bool: too dim to be a hit."""
        p = self.settings
        if p.kind == "lit_pixels":
            return measure < p.min_lit_pixels
        if p.kind == "photons":
            return measure < p.min_photons
        return torch.zeros(measure.shape, dtype=torch.bool, device=measure.device)


def fitting_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The source's mask where it fits the frames, else None (said once by the service)."""
    return mask if mask is not None and tuple(mask.shape) == shape else None


class FrameBinner:
    """Converts, checks, counts and bins frames one at a time in one float32 frame of its own, which stays in
    the CPU's cache: a frame's pixels come from memory once (through a batch-sized buffer every step read the
    whole batch from memory again: 1.1-2.5x the time a frame, benchmarks/bench_preprocess.py). One a thread."""

    def __init__(self, pre: Preprocessor, prefilter: Prefilter) -> None:
        self.pre = pre
        self.prefilter = prefilter
        self._scratch = torch.empty((1, *pre.frame_shape), dtype=torch.float32)
        self._counts: dict[np.dtype, Callable[[np.ndarray], int] | None] = {}

    @torch.inference_mode()  # a mode of the thread: the callers' threads need it too
    def bin(self, data: np.ndarray, converted: Callable[[], None] | None = None) -> Binned:
        """`data` (the preprocessor's frame shape, a numeric dtype) -> its bins, measure and finiteness.
        `converted` is called once its pixels have been read (a lent frame can go back to its reader)."""
        if data.dtype not in self._counts:
            self._counts[data.dtype] = self.prefilter.raw_count(self.pre, {data.dtype})
        count = self._counts[data.dtype]
        kind = data.dtype.kind
        measure = float(count(data)) if count is not None else 0.0
        np.copyto(self._scratch.numpy()[0], data, casting="unsafe")  # to float32: the one read of its pixels
        if converted is not None:
            converted()
        finite = kind != "f" or bool(all_finite(self._scratch)[0])  # integers cannot be NaN or Inf
        photons = self.pre.photons(self._scratch, inplace=True, signed=kind in "if")  # unsigned: no clamp
        if count is None:
            measure = float(self.prefilter.measure(photons)[0])
        means = self.pre.binned(photons)[0, 0].numpy().copy()
        return Binned(means=means, shape=tuple(data.shape), dtype=data.dtype.str, measure=measure, finite=finite)


@dataclass(frozen=True)
class ReaderBinning:
    """What a reader process needs to bin its frames as the service would: sent to it by the pipeline."""

    preprocess: PreprocessSettings  # the model's
    calibration: PhotonCalibration
    prefilter: PrefilterSettings
    mask: np.ndarray | None  # the source's
    always: bool = False  # bin every frame it can, not only while the service is behind

    def binner(self, shape: tuple[int, ...]) -> FrameBinner:
        """A binner for frames of `shape`, on the CPU; what the shape means for the thumbnail the service says."""
        mask = fitting_mask(self.mask, shape)
        pre = Preprocessor(self.preprocess, mask, shape, self.calibration, "cpu", say_shape=False)
        return FrameBinner(pre, Prefilter(self.prefilter))

"""THE preprocessing: one torch function for training, evaluation and serving.

frame (ADU or photons, 2-D or panels) -> photons -> mask -> clip -> mask-aware sum-binning to a
thumbnail -> intensity transform -> per-image normalisation.

The detector side (ADU gain, offset, threshold, mask) belongs to the data; the model side
(`PreprocessSettings`: thumbnail size, clip, transform, normalisation) travels with the model in its
ONNX metadata, so a model is always fed the way it was trained.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.settings_base import Section

MAX_ASPECT = 1.2  # frames longer than this on one side are said: the thumbnail is square

log = logging.getLogger(__name__)

# Detector units read as photons: even a bright hit leaves many bins barely lit (at 10^6 photons on 128 x 128
# pixels the dimmest 1% of the 64 x 64 bins with any signal read under a photon a pixel), while a pedestal left
# in, or ADU noise not divided by the gain, lifts every pixel. Bins at exactly 0 (panel gaps that psana's
# image() fills with zeros) say nothing either way. The level is above one photon a pixel: a frame no bigger
# than the thumbnail bins a pixel a bin, and there one photon reads 1.
# The converse: the pedestal taken off twice (calibrated data, psana's data=calib, given the raw data's offset).
# With the offset right, read noise leaves about half the raw pixels below it (and none, noise-free); taken off
# calibrated data, nearly every pixel is below it, and clamped to 0: the run is decided blank, every frame. Not
# judged with a single-photon threshold, which zeroes noise whatever the offset.
OFFSET_BELOW = 0.9
OFFSET_TWICE = (
    f"the pedestal taken off twice? {OFFSET_BELOW:.0%} or more of a frame's pixels are below [serve.calibration]'s "
    "offset, where raw data's noise leaves about half of them: data already calibrated (psana's data=calib) need "
    "offset 0"
)


def offset_taken_twice(raw: np.ndarray, calibration: PhotonCalibration, mask: np.ndarray | None = None) -> bool:
    """Whether a raw frame looks like calibrated data that `calibration` would take the pedestal off again
    (`OFFSET_TWICE`), judged on its good pixels (`mask`, of its shape: masked ones may read 0 whatever)."""
    c = calibration
    if c.offset <= 0 or c.threshold > 0:
        return False
    below = raw < c.offset
    return float(np.mean(below[mask] if mask is not None else below)) >= OFFSET_BELOW


PEDESTAL_QUANTILE = 0.01
PEDESTAL_PHOTONS = 1.5
PEDESTAL_LEFT = (
    "detector units, not photons: a pedestal left in, or ADU not divided by the gain? Even the dimmest 1% of the "
    f"thumbnail's lit bins read {PEDESTAL_PHOTONS:g} photons or more per pixel, where a diffraction pattern has "
    "faint ones"
)


class PreprocessSettings(Section):
    """Model-side preprocessing parameters, stored in the model's metadata."""

    model_config = ConfigDict(frozen=True)  # and Section's: no unknown key, no NaN

    thumbnail: int = Field(64, ge=2, le=512, description="side of the square thumbnail fed to the model")
    clip_photons: float | None = Field(
        None, gt=0, description="photons per pixel above which a pixel is clipped (saturation)"
    )
    transform: Literal["log1p", "sqrt", "none"] = "log1p"
    normalise: Literal["zscore", "max", "none"] = "zscore"


class PhotonCalibration(Section):
    """Detector-side conversion of raw values to photons: photons = (value - offset) / gain.

    Values below `threshold` photons are set to zero (single-photon discrimination). For data already
    in photons (simulations, calibrated psana data) the defaults do nothing.
    """

    model_config = ConfigDict(frozen=True)  # and Section's: no unknown key, no NaN

    gain: float = Field(1.0, gt=0, description="ADU per photon")
    offset: float = Field(0.0, description="ADU pedestal subtracted before dividing by the gain")
    threshold: float = Field(0.0, ge=0, description="photons below which a pixel counts as zero")


def panel_grid(n_panels: int, height: int = 1, width: int = 1) -> tuple[int, int]:
    """Rows and columns of the grid that tiles panels of height x width into the squarest image (of two as
    square, the one of fewer rows): the thumbnail is square, and a long strip would be squeezed into it,
    its rings into ellipses. Eight panels of 512 x 1024 go in four rows of two. The panels are placed in the
    order they are numbered, not where they sit on the detector (psana's geometry turns and places each:
    a Jungfrau 4M is two rows of four modules turned a quarter turn): `Preprocessor` says so."""
    grids = [(rows, n_panels // rows) for rows in range(1, n_panels + 1) if n_panels % rows == 0]
    return min(grids, key=lambda g: (round(abs(math.log(g[0] * height / (g[1] * width))), 9), g[0]))


def assemble_panels(frames: torch.Tensor) -> torch.Tensor:
    """(B, P, H, W) -> (B, rows*H, cols*W), panels tiled row by row; (B, H, W) passes through.

    A rough assembly that keeps every pixel; geometry-true assembly is psana's `image()` (source option
    `image=1`).
    """
    if frames.dim() == 3:
        return frames
    b, p, h, w = frames.shape
    rows, cols = panel_grid(p, h, w)
    return frames.reshape(b, rows, cols, h, w).permute(0, 1, 3, 2, 4).reshape(b, rows * h, cols * w)


def block_means(frames: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, W) -> (B, 1, side, side), the mean of each bin. Where the bins tile the frame exactly, adds
    each bin's rows together first (whole contiguous rows, added element-wise), then sums the short rows
    left: adaptive pooling's numbers at the cost of about one read of the frame (the hot path at a
    megapixel). On a frame in cache, as the service bins them, summing along the rows first took 1.6-2.8x
    as long; on a batch read from memory the two orders were within 30% either way
    (benchmarks/bench_preprocess.py)."""
    b, h, w = frames.shape
    if h % side == 0 and w % side == 0:
        kh, kw = h // side, w // side
        cols = frames.reshape(b, side, kh, w).sum(2)  # (B, side, W): one pass over every pixel
        return (cols.reshape(b, side, side, kw).sum(-1) / (kh * kw)).unsqueeze(1)
    return F.adaptive_avg_pool2d(frames.unsqueeze(1), (side, side))


def all_finite(frames: torch.Tensor) -> torch.Tensor:
    """Per frame of (B, ...): whether every value is finite. A NaN or Inf makes the frame's sum NaN or Inf;
    a sum can also overflow on finite values, so the few frames whose sum is not finite are looked at
    pixel by pixel. Exact, at the cost of one float32 sum per frame (no float64 copy of the batch)."""
    finite = torch.isfinite(frames.flatten(1).sum(1))
    for i in torch.nonzero(~finite).flatten().tolist():
        finite[i] = bool(torch.isfinite(frames[i]).all())
    return finite


class Preprocessor:
    """Turns batches of raw frames into normalised thumbnails (B, 1, S, S) on `device`.

    The mask and the per-bin pixel counts are prepared once here, so a batch costs a few whole-array
    torch operations and no Python loop over pixels or events. `say_shape`: warn of frames squeezed into the
    square thumbnail or panels tiled in number order (False where the service has said it, in reader processes).
    """

    def __init__(
        self,
        settings: PreprocessSettings,
        mask: np.ndarray | torch.Tensor | None,
        frame_shape: tuple[int, ...],
        calibration: PhotonCalibration | None = None,
        device: str | torch.device = "cpu",
        say_shape: bool = True,
    ) -> None:
        self.settings = settings
        self.calibration = calibration or PhotonCalibration()
        self.device = torch.device(device)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        if len(self.frame_shape) not in (2, 3):
            raise ValueError(f"frames must be (H, W) or (P, H, W), got {self.frame_shape}")
        if mask is None:
            m = torch.ones(self.frame_shape, dtype=torch.float32)
        else:
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if tuple(m.shape) != self.frame_shape:
                raise ValueError(f"mask shape {tuple(m.shape)} != frame shape {self.frame_shape}")
            m = m.to(torch.float32)
            if not bool(m.any()):  # e.g. a CXI mask read the wrong way round (there non-zero means bad)
                raise UserError("the mask marks every pixel bad: no pattern could be seen through it")
        self.mask = assemble_panels(m.unsqueeze(0)).to(self.device)  # (1, H', W')
        self._all_good = bool((self.mask == 1).all())
        s = settings.thumbnail
        h, w = self.mask.shape[-2:]
        if say_shape and max(h, w) / min(h, w) > MAX_ASPECT:
            log.warning(
                "frames of %s (%d x %d as tiled) are binned to the square %d x %d thumbnail: squeezed %.1fx along "
                "one axis, rings become ellipses the model never saw; a square region or psana's image=1 avoids it",
                self.frame_shape,
                h,
                w,
                s,
                s,
                max(h, w) / min(h, w),
            )
        if say_shape and len(self.frame_shape) == 3 and self.frame_shape[0] > 1:
            p, ph, pw = self.frame_shape
            rows, cols = panel_grid(p, ph, pw)
            log.warning(
                "frames of %d panels of %d x %d are tiled %d x %d in the order they are numbered, not as they sit on "
                "the detector: a pattern whose panels are turned or placed otherwise (a Jungfrau's, an ePix10k's) is "
                "broken up, and the model and the bank see it so; psana's image=1 assembles them by the detector's "
                "geometry (read the bank's references the same way)",
                p,
                ph,
                pw,
                rows,
                cols,
            )
        coverage = block_means(self.mask, s)[0]  # good fraction of each bin
        pixels_per_bin = self._pixels_per_bin = (h * w) / (s * s)
        # Sum over a bin's good pixels, rescaled as if the masked ones had the bin's mean: binning
        # then neither dims nor brightens bins under a beam stop edge or a panel gap.
        self._bin_scale = torch.where(
            coverage > 0, pixels_per_bin / coverage.clamp_min(1e-12), torch.zeros_like(coverage)
        )

    def photons(self, frames: torch.Tensor, inplace: bool = False, signed: bool | None = None) -> torch.Tensor:
        """Raw values (any dtype) -> float32 photons, masked and clipped, panels tiled: (B, H', W').

        Works in place on one float32 copy: at a megapixel per frame each full-size temporary costs as much
        as the arithmetic, so steps that cannot change a value are skipped too. `inplace=True` hands over
        a float32 tensor on the device to be overwritten (the service's batch buffer): no copy at all.
        `signed`: whether values can be negative; by default from the dtype (say False for unsigned raw
        values that the caller converted to float).
        """
        c = self.calibration
        x = frames.to(self.device, non_blocking=True)
        x = x.to(torch.float32, copy=not inplace and x.data_ptr() == frames.data_ptr())
        if c.offset != 0.0:
            x.sub_(c.offset)
        if c.gain != 1.0:
            x.div_(c.gain)
        x = assemble_panels(x)
        if c.threshold > 0:
            x.masked_fill_(x < c.threshold, 0.0)
        if c.offset != 0.0 or (frames.is_signed() if signed is None else signed):  # raw counts are never negative
            x.clamp_min_(0.0)
        if not self._all_good:
            x.mul_(self.mask)
        if self.settings.clip_photons is not None:
            x.clamp_max_(self.settings.clip_photons)
        return x

    def keeps_above(self, level: float) -> bool:
        """Whether `photons()` is above `level` exactly where the raw value is, pixel for pixel: no gain or
        offset, no masked pixel, and neither the single-photon threshold nor the clip on the far side of
        `level`. Then a count of bright pixels can be taken on the raw frame while it is being read anyway."""
        c, clip = self.calibration, self.settings.clip_photons
        return (
            level >= 0  # negative values (clamped to 0 in photons) are never above it either way
            and c.gain == 1.0
            and c.offset == 0.0
            and c.threshold <= level  # zeroed values were below `level` already
            and self._all_good
            and (clip is None or clip > level)
        )

    def thumbnails(self, photons: torch.Tensor) -> torch.Tensor:
        """Photons (B, H', W') -> binned, transformed and normalised thumbnails (B, 1, S, S)."""
        return self.transformed(self.binned(photons))

    def binned(self, photons: torch.Tensor) -> torch.Tensor:
        """Photons (B, H', W') -> mask-aware bin means (B, 1, S, S): the step that reads every pixel."""
        return block_means(photons, self.settings.thumbnail) * self._bin_scale

    def pedestal_left(self, binned: torch.Tensor) -> torch.Tensor:
        """Per frame of `binned()`'s (B, 1, S, S), whether it looks like detector units taken as photons
        (`PEDESTAL_LEFT`): the calibration is missing, and the model would see a flat frame."""
        good = binned[:, 0][:, self._bin_scale[0] > 0]  # bins with no good pixel read 0 whatever the data
        lit = torch.where(good > 0, good.float(), torch.nan)  # zeros (gaps, masked areas) left out
        dimmest = torch.nanquantile(lit, PEDESTAL_QUANTILE, dim=1)  # NaN for a frame with nothing lit
        return dimmest >= PEDESTAL_PHOTONS * self._pixels_per_bin  # bins are sums over pixels_per_bin pixels

    def transformed(self, binned: torch.Tensor) -> torch.Tensor:
        """Bin means (B, 1, S, S) -> intensity-transformed, normalised thumbnails: what the model sees."""
        s = self.settings
        if s.transform == "log1p":
            binned = torch.log1p(binned)
        elif s.transform == "sqrt":
            binned = torch.sqrt(binned)
        if s.normalise == "zscore":
            mean = binned.mean(dim=(2, 3), keepdim=True)
            std = binned.std(dim=(2, 3), keepdim=True)
            binned = (binned - mean) / (std + 1e-6)
        elif s.normalise == "max":
            binned = binned / binned.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return binned.contiguous()

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if tuple(t.shape[1:]) != self.frame_shape:
            raise ValueError(f"frame shape {tuple(t.shape[1:])} != expected {self.frame_shape}")
        return self.thumbnails(self.photons(t))

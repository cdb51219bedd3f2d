"""On-the-fly augmentation of photon images, applied before the shared preprocessing.

Everything is drawn per pattern and applied to the whole batch at once (one `grid_sample` for the
geometry, broadcast masks for the detector defects), from a seeded generator so runs are reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lcls_hitfinder.learn.settings import AugmentSettings
from lcls_hitfinder.simulate.generate import lognormal_of_mean_1


def poisson(rate: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Poisson counts of `rate`; on the CPU through numpy, about 10x faster than torch.poisson there."""
    if rate.device.type != "cpu":
        return torch.poisson(rate, generator=g)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    counts = np.random.default_rng(seed).poisson(rate.numpy())
    return torch.from_numpy(counts.astype(np.float32))


class Augmenter:
    """Augments (B, H, W) photon images of hits with `n_particles` particles each.

    `single_photons` is the mean photon count of a single hit in the training data: resampling the
    photons multiplies every pattern by (target / single_photons), so multi-hits keep their extra
    photons relative to single hits, as at a fixed fluence. With `p_matched_photons` a hit is instead
    scaled to the target as its own total, which takes brightness away as a cue to the particle count.
    `beam_center` (row, col) in pixels is the centre of rescaling and rotation (default: image centre).
    """

    def __init__(
        self,
        settings: AugmentSettings,
        frame_shape: tuple[int, int],
        single_photons: float,
        beam_center: tuple[float, float] | None = None,
    ) -> None:
        self.s = settings
        self.h, self.w = frame_shape
        self.single_photons = max(float(single_photons), 1e-6)
        cy, cx = beam_center if beam_center is not None else ((self.h - 1) / 2, (self.w - 1) / 2)
        self.center = (float(cy), float(cx))

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, hits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`hits` (B,) bool marks the patterns with a particle; only those can be matched in brightness."""
        if not self.s.enabled:
            return images
        x = self.geometry(images, generator)
        x = self.photons(x, generator, hits)
        return self.defects(x, generator)

    def _uniform(self, n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, device=device)

    def geometry(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Radial rescale by s, rotation by θ about the beam centre, then a shift of the beam centre."""
        s = self.s
        b, dev = x.shape[0], x.device
        if s.radial_scale == 0 and s.shift_px == 0 and not s.rotate:
            return x
        scale = self._uniform(b, 1 - s.radial_scale, 1 + s.radial_scale, g, dev)
        theta = self._uniform(b, 0.0, 2 * math.pi, g, dev) if s.rotate else torch.zeros(b, device=dev)
        shift = self._uniform(2 * b, -s.shift_px, s.shift_px, g, dev).reshape(b, 2)  # (dy, dx) pixels
        # Sampling map in pixels (x right, y down): in = c + R(θ) (out - c - shift) / scale.
        cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
        # to normalised coordinates (align_corners=False): u = (2 p + 1) / W - 1, so p = (u + 1) W / 2 - 1/2
        kx, ky = self.w / 2, self.h / 2
        cy, cx = self.center
        cxn, cyn = (2 * cx + 1) / self.w - 1, (2 * cy + 1) / self.h - 1
        a11, a12 = cos, -sin * ky / kx
        a21, a22 = sin * kx / ky, cos
        dxn, dyn = shift[:, 1] / kx, shift[:, 0] / ky
        t1 = cxn - a11 * (cxn + dxn) - a12 * (cyn + dyn)
        t2 = cyn - a21 * (cxn + dxn) - a22 * (cyn + dyn)
        mat = torch.stack([torch.stack([a11, a12, t1], 1), torch.stack([a21, a22, t2], 1)], 1)
        grid = F.affine_grid(mat, [b, 1, self.h, self.w], align_corners=False)
        out = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # a magnified pattern spreads its photons over more pixels
        return out[:, 0] / (scale * scale)[:, None, None]

    def photons(self, x: torch.Tensor, g: torch.Generator, hits: torch.Tensor | None = None) -> torch.Tensor:
        """New photons per single hit (log-uniform) with fluence jitter, Poisson noise, Gaussian noise."""
        s = self.s
        b, dev = x.shape[0], x.device
        if s.photons is not None:
            lo, hi = s.photons
            target = torch.exp(self._uniform(b, math.log(lo), math.log(hi), g, dev))
            mu, sd = lognormal_of_mean_1(s.fluence_jitter)  # as the simulator means it (it was sd of the log)
            jitter = torch.exp(mu + sd * torch.randn(b, generator=g, device=dev))
            per = torch.full((b,), self.single_photons, device=dev)
            if s.p_matched_photons > 0 and hits is not None:
                matched = (torch.rand(b, generator=g, device=dev) < s.p_matched_photons) & hits.to(dev)
                per = torch.where(matched, x.sum(dim=(1, 2)).clamp_min(1e-6), per)
            x = poisson((x * (target * jitter / per)[:, None, None]).clamp_min(0), g)
        if s.gaussian_sigma > 0:
            sigma = self._uniform(b, 0.0, s.gaussian_sigma, g, dev)
            sigma = sigma * (torch.rand(b, generator=g, device=dev) >= s.p_noiseless)
            x = x + sigma[:, None, None] * torch.randn(x.shape, generator=g, device=dev)
        return x

    def defects(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Zero a dead stripe (row or column band), a dead panel (one tile of a 4x4 grid), a beam stop."""
        s = self.s
        b, dev = x.shape[0], x.device
        h, w = self.h, self.w
        rows = torch.arange(h, device=dev)[None, :, None]
        cols = torch.arange(w, device=dev)[None, None, :]

        def draw(p: float) -> torch.Tensor:
            return (torch.rand(b, generator=g, device=dev) < p)[:, None, None]

        def per(values: torch.Tensor) -> torch.Tensor:
            return values[:, None, None]

        horizontal = per(torch.rand(b, generator=g, device=dev) < 0.5)
        width = per(1 + torch.randint(0, max(1, min(h, w) // 32), (b,), generator=g, device=dev))
        start = per(torch.rand(b, generator=g, device=dev)) * torch.where(horizontal, h, w)
        line = torch.where(horizontal, rows, cols)
        dead = draw(s.p_dead_stripe) & (line >= start) & (line < start + width)
        tile = per(torch.randint(0, 16, (b,), generator=g, device=dev))
        dead |= draw(s.p_dead_panel) & ((rows * 4 // h) * 4 + cols * 4 // w == tile)
        radius = per(self._uniform(b, 0.0, s.beamstop_max_frac * w, g, dev))
        cy, cx = self.center
        dead |= draw(s.p_beamstop) & ((rows - cy) ** 2 + (cols - cx) ** 2 < radius**2)
        return x.masked_fill(dead, 0.0)

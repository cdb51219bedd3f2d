"""Detector pixels -> scattering vectors on the Ewald sphere, solid angles, polarization and the mask.

Lab frame: z along the beam, x horizontal (detector columns), y vertical (rows). A pixel at (x, y, L)
receives k_out = k (x, y, L) / r; q = k_out - k_in with k_in = k (0, 0, 1), |k| = 2π / λ, so |q| =
2k sin θ exactly (Ewald curvature included). Lengths in metres here, q in nm⁻¹.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lcls_hitfinder.simulate.settings import BeamSettings, DetectorSettings

HC_EV_NM = 1239.84198
"""Planck constant times the speed of light in eV nm: λ = hc / E."""


@dataclass(frozen=True)
class DetectorGeometry:
    detector: DetectorSettings
    photon_energy_ev: float
    polarization: str

    @classmethod
    def from_settings(cls, detector: DetectorSettings, beam: BeamSettings) -> DetectorGeometry:
        return cls(detector, beam.photon_energy_ev, beam.polarization)

    @property
    def shape(self) -> tuple[int, int]:
        return self.detector.shape

    @property
    def wavelength_nm(self) -> float:
        return HC_EV_NM / self.photon_energy_ev

    @property
    def beam_center(self) -> tuple[float, float]:
        h, w = self.shape
        return self.detector.beam_center or ((h - 1) / 2, (w - 1) / 2)

    def _pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel centre offsets (x, y) from the beam in metres, each (H, W)."""
        h, w = self.shape
        cy, cx = self.beam_center
        p = self.detector.pixel_size_m
        y, x = np.meshgrid((np.arange(h) - cy) * p, (np.arange(w) - cx) * p, indexing="ij")
        return x, y

    def q_vectors(self) -> np.ndarray:
        """(H*W, 3) scattering vectors in nm⁻¹."""
        x, y = self._pixels()
        z = self.detector.distance_m
        r = np.sqrt(x**2 + y**2 + z**2)
        k = 2 * math.pi / self.wavelength_nm
        return np.stack([k * x / r, k * y / r, k * (z / r - 1)], -1).reshape(-1, 3)

    def q_abs(self) -> np.ndarray:
        return np.sqrt((self.q_vectors() ** 2).sum(1)).reshape(self.shape)

    def pixel_factor(self) -> np.ndarray:
        """(H*W,) solid angle (sr) times polarization factor of each pixel."""
        x, y = self._pixels()
        z = self.detector.distance_m
        r = np.sqrt(x**2 + y**2 + z**2)
        solid = self.detector.pixel_size_m**2 * z / r**3
        if self.polarization == "horizontal":
            pol = 1 - (x / r) ** 2
        elif self.polarization == "vertical":
            pol = 1 - (y / r) ** 2
        else:
            pol = (1 + (z / r) ** 2) / 2
        return (solid * pol).reshape(-1)

    def mask(self) -> np.ndarray:
        """(H, W) True for good pixels: not behind the beam stop, not in the gap or a dead row or column."""
        h, w = self.shape
        d = self.detector
        cy, cx = self.beam_center
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        good = (rows - cy) ** 2 + (cols - cx) ** 2 > d.beamstop_px**2 if d.beamstop_px > 0 else np.ones((h, w), bool)
        if d.gap_px:  # exactly gap_px rows, centred on the beam (one more below it when that cannot be even)
            lo = math.ceil(cy - d.gap_px / 2)
            good[max(lo, 0) : max(lo + d.gap_px, 0), :] = False
        good[d.dead_rows, :] = False
        good[:, d.dead_columns] = False
        return good

    def attrs(self) -> dict[str, Any]:
        """The geometry as dataset attributes (psana-style names in metres and eV)."""
        return {
            "photon_energy_ev": self.photon_energy_ev,
            "wavelength_m": self.wavelength_nm * 1e-9,
            "distance_m": self.detector.distance_m,
            "pixel_size_m": self.detector.pixel_size_m,
            "beam_center": list(self.beam_center),
            "polarization": self.polarization,
        }

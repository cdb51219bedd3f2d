"""The `[simulate]` config section: structures, detector geometry, beam, hits, background and noise.

Every `lcls-hitfinder simulate` flag overrides one key here. The defaults describe a pnCCD (1024 x 1024,
75 µm) binned 8 x 8 to 128 x 128 pixels of 600 µm, 0.15 m behind the interaction point at 1.7 keV (the
AMO PR772 geometry, scaled): a 10-40 nm particle shows 3 to 14 fringes from the centre to the edge.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lcls_hitfinder.labels import MAX_PARTICLES
from lcls_hitfinder.settings_base import Section


class DetectorSettings(Section):
    """A flat detector perpendicular to the beam; rows run along y (vertical), columns along x."""

    shape: tuple[int, int] = Field((128, 128), description="pixels (rows, columns)")
    # bounds that catch a unit slip (75 for 75 µm, 150 for 150 mm), far beyond any X-ray detector's values
    pixel_size_m: float = Field(600e-6, ge=1e-6, le=0.01, description="pixel pitch in metres (pnCCD: 75e-6)")
    distance_m: float = Field(0.15, ge=1e-3, le=100, description="interaction point to detector in metres")
    beam_center: tuple[float, float] | None = Field(
        None, description="(row, column) of the direct beam in pixels; null: the centre of the detector"
    )
    beamstop_px: float = Field(3.0, ge=0, description="radius of the beam stop in pixels (masked)")
    gap_px: int = Field(0, ge=0, description="width of a dead horizontal gap through the beam (pnCCD halves)")
    dead_rows: list[int] = Field(default_factory=list, description="rows that read zero (masked)")
    dead_columns: list[int] = Field(default_factory=list, description="columns that read zero (masked)")
    saturation: float | None = Field(None, gt=0, description="pixel values are clipped here (image units)")

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"detector shape must be positive, got {v[0]}x{v[1]}")
        return v

    @model_validator(mode="after")
    def _dead_lines_on_the_detector(self) -> DetectorSettings:
        for key, lines, size in (
            ("dead_rows", self.dead_rows, self.shape[0]),
            ("dead_columns", self.dead_columns, self.shape[1]),
        ):
            outside = [i for i in lines if not 0 <= i < size]
            if outside:
                raise ValueError(f"{key} {outside} are not on the detector (0 to {size - 1})")
        return self


class BeamSettings(Section):
    """Photon energy and fluence. Fluence is given directly or as a mean photon count per single hit."""

    photon_energy_ev: float = Field(
        1700.0, ge=100, le=1e5, description="photon energy in eV (LCLS: 250 to 25,000; 1.7 keV is 1700)"
    )
    photons_per_pattern: float = Field(
        1e4,
        gt=0,
        le=1e15,  # numpy draws Poisson counts up to about 1e19 a pixel; no X-ray pattern comes near either
        description="mean photons on the good pixels from one particle, averaged over orientations",
    )
    fluence: float | None = Field(
        None, gt=0, description="photons per µm² at the particle; when set it replaces photons_per_pattern"
    )
    fluence_jitter: float = Field(
        0.0, ge=0, description="shot-to-shot fluence spread: the relative sd of a log-normal factor of mean 1"
    )
    polarization: Literal["horizontal", "vertical", "none"] = Field(
        "horizontal", description="linear polarization of the beam (LCLS: horizontal); none: unpolarized"
    )


class NoiseSettings(Section):
    kind: Literal["none", "poisson", "poisson+gaussian"] = Field("poisson", description="detector noise model")
    gaussian_sigma: float = Field(0.0, ge=0, description="read-noise sd, in photons (or ADU when adu_gain is set)")
    adu_gain: float | None = Field(None, gt=0, description="write ADU (gain * photons + offset) instead of photons")
    adu_offset: float = Field(0.0, description="pedestal in ADU, with adu_gain")


class BackgroundSettings(Section):
    """Smooth scatter from the gas or the carrier liquid, added to the expected counts before noise."""

    kind: Literal["none", "flat", "radial"] = "none"
    photons_per_pixel: float = Field(0.0, ge=0, description="mean background per pixel (flat) or at q = 0 (radial)")
    q0_inv_nm: float = Field(0.5, gt=0, description="radial background falls as 1 / (1 + (q / q0)²)")


class SimulateSettings(Section):
    """Everything `lcls-hitfinder simulate` needs to make a dataset, and the live `sim:` source too."""

    structures: list[str] = Field(
        default_factory=lambda: ["procedural:1"],
        min_length=1,
        description="structure specs: a PDB/mmCIF file (optionally FILE@ASSEMBLY), sphere:R, coreshell:RC,R,"
        "RHO, ellipsoid:A,B,C, capsid:R, procedural:SEED (see docs/simulator.md)",
    )
    particles: dict[int, float] = Field(
        default_factory=lambda: {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0},
        description="relative weight of each particle count 0 (blank) to 4",
    )
    mixed_species: bool = Field(False, description="a multi-hit may mix structures (otherwise one per pattern)")
    n: int = Field(1000, ge=1, description="patterns to write")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="everything random derives from this and the chunk index")
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    beam: BeamSettings = Field(default_factory=BeamSettings)
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    background: BackgroundSettings = Field(default_factory=BackgroundSettings)
    oversampling: float = Field(
        8.0,
        ge=2,
        le=32,
        description="Fourier volume box over particle diameter: q sampling and interpolation error (≈1 % in "
        "|F|² at 8 for a uniform sphere); lowered per structure when its volume would exceed max_volume_gb",
    )
    chunk: int = Field(64, ge=1, le=4096, description="patterns per chunk; each chunk has its own random stream")
    workers: int = Field(1, ge=1, le=256, description="processes generating chunks in parallel")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device: auto uses CUDA when present")
    max_volume_gb: float = Field(1.0, gt=0, description="largest Fourier volume (GB) per structure")

    @field_validator("particles")
    @classmethod
    def _valid_counts(cls, v: dict[int, float]) -> dict[int, float]:
        bad = [k for k in v if not 0 <= k <= MAX_PARTICLES]
        if bad:
            raise ValueError(f"particle counts must be 0 to {MAX_PARTICLES}, got {bad}")
        if any(w < 0 for w in v.values()) or not 0 < sum(v.values()) < math.inf:
            raise ValueError("particle weights must be >= 0 with a positive, finite sum")
        return v

    @model_validator(mode="after")
    def _gaussian_needs_sigma(self) -> SimulateSettings:
        if self.noise.kind == "poisson+gaussian" and self.noise.gaussian_sigma <= 0:
            raise ValueError("noise.kind poisson+gaussian needs noise.gaussian_sigma > 0 (--gaussian-sigma)")
        if self.noise.kind != "poisson+gaussian" and self.noise.gaussian_sigma > 0:
            raise ValueError(
                f"noise.gaussian_sigma is added only with noise.kind poisson+gaussian (--noise), not {self.noise.kind}"
            )
        return self

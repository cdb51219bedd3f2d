"""The `[train]` config section: model, loss, mining, augmentation and optimiser settings.

`lcls-hitfinder train` flags override single keys here; the whole section is saved in each run
directory (run.json), so a run can be resumed and exported with exactly the settings it was trained with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lcls_hitfinder.preprocess import PreprocessSettings
from lcls_hitfinder.settings_base import Section


class AugmentSettings(Section):
    """On-the-fly augmentation of photon images (before the shared preprocessing), as in the design study.

    Geometry: radial rescale (detector distance / photon energy), beam-centre shift, in-plane rotation.
    Beam: photons per pattern resampled with fluence jitter, then Poisson noise (for noise-free
    training data), then Gaussian detector noise. Detector: dead stripes or panels, beam stop.
    """

    enabled: bool = True
    radial_scale: float = Field(0.3, ge=0, lt=1, description="q scale drawn uniformly in [1 - r, 1 + r]")
    shift_px: float = Field(5.0, ge=0, description="beam-centre shift, uniform in ±shift_px per axis")
    rotate: bool = Field(True, description="random in-plane rotation")
    photons: tuple[float, float] | None = Field(
        (500.0, 20000.0),
        description='photons per single hit, log-uniform in [lo, hi], then Poisson noise; "data" (or null) keeps '
        "the data's own photons and noise (for data that already has Poisson noise)",
    )

    @field_validator("photons", mode="before")
    @classmethod
    def _data_photons(cls, v: object) -> object:
        return None if v == "data" else v  # TOML has no null

    fluence_jitter: float = Field(
        0.3, ge=0, description="shot-to-shot fluence jitter: the relative sd of a log-normal factor of mean 1"
    )
    p_matched_photons: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability that a hit gets the drawn photons as its own total, not as a single hit's mean: "
        "its multi-hits are then as bright as its singles, so brightness is no cue to the count",
    )
    gaussian_sigma: float = Field(0.3, ge=0, description="Gaussian detector noise, sd drawn in [0, sigma] photons")
    p_noiseless: float = Field(
        0.3, ge=0, le=1, description="probability of no Gaussian noise (a clean zero background, as after thresholding)"
    )
    p_dead_stripe: float = Field(0.2, ge=0, le=1, description="probability of a dead stripe (row or column band)")
    p_dead_panel: float = Field(0.1, ge=0, le=1, description="probability of a dead panel: one tile of a 4 x 4 grid")
    p_beamstop: float = Field(0.3, ge=0, le=1, description="probability of a beam stop")
    beamstop_max_frac: float = Field(0.08, ge=0, le=0.5, description="largest beam-stop radius, fraction of width")


class CnnSettings(Section):
    """Multi-output CNN baselines of the design study (predict structure and particle count)."""

    arch: Literal[
        "late3", "late5", "late10", "late18", "early3", "early5", "early10", "early18", "resnet18", "vgg16"
    ] = "late5"
    width: int = Field(16, ge=4, le=128, description="channels of the first layer (VGG16/ResNet18 use 64 at full size)")


class TrainSettings(Section):
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, the sampler and the validation bank's draw")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    threads: int = Field(1, ge=1, le=64, description="torch CPU threads (on a shared CPU, 1 is often faster than 2)")
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="batches per epoch; default: one pass over the data")
    batch_size: int = Field(128, ge=4)
    lr: float = Field(2e-3, gt=0)
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="cosine decay to 0 over all epochs")
    weight_decay: float = Field(1e-4, ge=0)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    # twin network
    embed_dim: int = Field(32, ge=2, le=128)
    width: int = Field(12, ge=2, le=128, description="channels of the embedder's first conv layer")
    depth: int = Field(4, ge=1, le=6, description="conv blocks of the embedder (each halves the size)")
    convs: int = Field(1, ge=1, le=4, description="embedder: 3x3 conv layers per block")
    unshuffle: int = Field(
        1, ge=1, le=4, description="embedder: f x f pixel blocks into f² channels first (128 x 128 at 64's cost)"
    )
    radial_rings: int = Field(
        0, ge=0, le=64, description="embedder: rings of the thumbnail's radial profile fed to its head (0: none)"
    )
    alpha: float = Field(0.2, ge=0, description="triplet margin α in loss = max(d_p - d_n + α, 0)")
    mining: Literal["batch-hard", "semi-hard"] = Field(
        "semi-hard", description="semi-hard learned faster than batch-hard here (docs/RESULTS.md)"
    )
    classes: Literal["count", "hit"] = Field(
        "hit",
        description="hit: blank, single, multi (validated better); count: blank, 1, 2, 3, 4 are separate classes",
    )
    per_structure: bool = Field(False, description="also split the classes by structure id")
    negatives: Literal["all", "own-structure", "both"] = Field(
        "all",
        description="twin: own-structure keeps a hit's negatives to its own structure's classes and the blanks "
        "(needs per_structure); both: the mean of the two losses",
    )
    aux_weight: float = Field(
        0.0, ge=0, description="twin: weight of a blank/single/multi cross-entropy on the embedding (0: none)"
    )
    bank_per_class: int = Field(10, ge=1, description="references per class in the validation bank")
    cnn: CnnSettings = Field(default_factory=CnnSettings)

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.augment.photons is not None and not 0 < self.augment.photons[0] <= self.augment.photons[1]:
            raise ValueError("augment.photons must be 0 < lo <= hi")
        if self.negatives != "all" and not self.per_structure:
            raise ValueError(f"negatives = {self.negatives!r} needs per_structure = true")
        multiple = self.unshuffle * 2 ** (self.depth + 1)
        if self.preprocess.thumbnail % multiple:
            raise ValueError(f"preprocess.thumbnail must be a multiple of unshuffle * 2^(depth + 1) = {multiple}")
        return self

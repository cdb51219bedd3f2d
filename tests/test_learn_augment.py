"""Augmentation of photon images: each transform does what it says, reproducibly."""

from __future__ import annotations

import numpy as np
import torch

from lcls_hitfinder.learn.augment import Augmenter
from lcls_hitfinder.learn.settings import AugmentSettings

OFF = AugmentSettings(
    radial_scale=0.0,
    shift_px=0.0,
    rotate=False,
    photons=None,
    gaussian_sigma=0.0,
    p_dead_stripe=0.0,
    p_dead_panel=0.0,
    p_beamstop=0.0,
)
SHAPE = (64, 64)


def ring(radius: float, n: int = 8) -> torch.Tensor:
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 31.5, xx - 31.5)
    img = np.exp(-((r - radius) ** 2) / 2.0).astype(np.float32)
    return torch.from_numpy(np.repeat(img[None] * 10, n, 0))


def radius_of(images: torch.Tensor) -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    r = torch.from_numpy(np.hypot(yy - 31.5, xx - 31.5).astype(np.float32))
    return ((images * r).sum((1, 2)) / images.sum((1, 2))).numpy()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_disabled_and_neutral_settings_change_nothing() -> None:
    x = ring(10)
    assert torch.equal(Augmenter(AugmentSettings(enabled=False), SHAPE, 1.0)(x, gen()), x)
    torch.testing.assert_close(Augmenter(OFF, SHAPE, 1.0)(x, gen()), x)


def test_radial_rescale_moves_rings_within_bounds() -> None:
    aug = Augmenter(OFF.model_copy(update={"radial_scale": 0.3}), SHAPE, 1.0)
    out = aug(ring(12, 64), gen())
    scale = radius_of(out) / radius_of(ring(12, 1))[0]
    assert scale.min() < 0.85 and scale.max() > 1.15  # it does rescale, both ways
    assert scale.min() > 0.68 and scale.max() < 1.32


def test_shift_moves_the_centre_and_rotation_keeps_the_radius() -> None:
    x = ring(8, 32)
    shifted = Augmenter(OFF.model_copy(update={"shift_px": 5.0}), SHAPE, 1.0)(x, gen())
    yy = np.mgrid[:64, :64][0]
    cy = (shifted * torch.from_numpy(yy.astype(np.float32))).sum((1, 2)) / shifted.sum((1, 2))
    offset = (cy - 31.5).abs()
    assert offset.max() <= 5.01 and offset.max() > 1.0
    blob = torch.zeros(4, 64, 64)
    blob[:, 31:33, 50:52] = 1.0  # off-centre spot, 19 px from the centre
    rotated = Augmenter(OFF.model_copy(update={"rotate": True}), SHAPE, 1.0)(blob, gen())
    np.testing.assert_allclose(radius_of(rotated), radius_of(blob), atol=1.0)
    assert not torch.allclose(rotated, blob)


def test_photons_are_resampled_with_poisson_noise() -> None:
    s = OFF.model_copy(update={"photons": (2000.0, 2000.0), "fluence_jitter": 0.0})
    x = ring(10, 200)
    single = float(x[0].sum())
    out = Augmenter(s, SHAPE, single_photons=single)(x, gen())
    totals = out.sum((1, 2)).numpy()
    assert abs(totals.mean() - 2000) < 20 and 20 < totals.std() < 70  # Poisson: sd = sqrt(2000) ≈ 45
    assert torch.equal(out, out.round())
    noisy = Augmenter(OFF.model_copy(update={"gaussian_sigma": 0.5}), SHAPE, 1.0)(torch.zeros(50, 64, 64), gen())
    assert 0.1 < float(noisy.std()) < 0.5 and float(noisy.min()) < 0


def test_fluence_jitter_means_what_the_simulator_means_mean_1_and_that_relative_spread() -> None:
    s = OFF.model_copy(update={"photons": (20000.0, 20000.0), "fluence_jitter": 1.0})
    x = ring(10, 4000)
    totals = Augmenter(s, SHAPE, single_photons=float(x[0].sum()))(x, gen()).sum((1, 2)).numpy() / 20000
    assert (
        abs(totals.mean() - 1) < 0.1 and abs(totals.std() - 1) < 0.25
    )  # as the simulator's (sd of the log: 1.65, 2.2)


def test_matched_photons_take_brightness_away_from_multi_hits() -> None:
    """A pair twice as bright as a single: kept so at a fixed fluence, as bright as the single when matched;
    a blank (no hit) is scaled as before, never blown up to a hit's photons."""
    s = OFF.model_copy(update={"photons": (2000.0, 2000.0), "fluence_jitter": 0.0})
    single = ring(10, 100)
    x = torch.cat([single, 2 * single, 0.01 * single])
    hits = torch.tensor([True] * 200 + [False] * 100)
    s1 = float(single[0].sum())

    def mean_totals(p: float) -> np.ndarray:
        out = Augmenter(s.model_copy(update={"p_matched_photons": p}), SHAPE, single_photons=s1)(x, gen(), hits)
        return out.sum((1, 2)).reshape(3, 100).mean(1).numpy()

    fixed, matched = mean_totals(0.0), mean_totals(1.0)
    assert abs(fixed[1] / fixed[0] - 2) < 0.05 and abs(matched[1] / matched[0] - 1) < 0.05
    assert abs(matched[2] - 20) < 3 and abs(fixed[2] - 20) < 3


def test_defects_zero_a_stripe_a_panel_and_the_beam_stop() -> None:
    x = torch.ones(40, 64, 64)
    stripe = Augmenter(OFF.model_copy(update={"p_dead_stripe": 1.0}), SHAPE, 1.0)(x, gen())
    dead_rows = (stripe == 0).all(2).any(1)
    dead_cols = (stripe == 0).all(1).any(1)
    assert (dead_rows | dead_cols).all()
    panel = Augmenter(OFF.model_copy(update={"p_dead_panel": 1.0}), SHAPE, 1.0)(x, gen())
    assert ((panel == 0).sum((1, 2)) == 16 * 16).all()
    stop = Augmenter(OFF.model_copy(update={"p_beamstop": 1.0}), SHAPE, 1.0, beam_center=(20.0, 40.0))(x, gen(1))
    hit = stop[:, 20, 40] == 0
    assert hit.float().mean() > 0.9 and (stop[:, 0, 0] == 1).all()


def test_same_seed_same_augmentation() -> None:
    aug = Augmenter(AugmentSettings(), SHAPE, 100.0)
    x = ring(10)
    assert torch.equal(aug(x, gen(3)), aug(x, gen(3)))
    assert not torch.equal(aug(x, gen(3)), aug(x, gen(4)))


def test_some_patterns_stay_free_of_gaussian_noise() -> None:
    s = OFF.model_copy(update={"gaussian_sigma": 0.5, "p_noiseless": 0.5})
    out = Augmenter(s, SHAPE, 1.0)(torch.zeros(200, 64, 64), gen())
    clean = (out == 0).all(2).all(1).float().mean()
    assert 0.35 < clean < 0.65

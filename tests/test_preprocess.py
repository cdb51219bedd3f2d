import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcls_hitfinder.preprocess import (
    PhotonCalibration,
    Preprocessor,
    PreprocessSettings,
    assemble_panels,
    panel_grid,
)
from lcls_hitfinder.service.binning import ReaderBinning
from lcls_hitfinder.service.settings import PrefilterSettings


def test_sum_binning_preserves_photons_without_transform() -> None:
    s = PreprocessSettings(thumbnail=8, transform="none", normalise="none")
    frames = np.random.default_rng(0).poisson(2.0, (3, 64, 64)).astype(np.float32)
    out = Preprocessor(s, None, (64, 64))(frames)
    assert out.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(out.sum(dim=(1, 2, 3)).numpy(), frames.sum(axis=(1, 2)), rtol=1e-5)
    # one bin is exactly the sum of its 8x8 block
    assert out[0, 0, 0, 0].item() == pytest.approx(frames[0, :8, :8].sum(), rel=1e-5)


def test_masked_pixels_are_filled_with_the_bin_mean() -> None:
    s = PreprocessSettings(thumbnail=4, transform="none", normalise="none")
    mask = np.ones((16, 16), bool)
    mask[:2, :4] = False  # half of the first 4x4 bin
    frames = np.full((1, 16, 16), 3.0, np.float32)
    frames[0, ~mask] = 1000.0  # hot pixels under the mask must not leak
    out = Preprocessor(s, mask, (16, 16))(frames)
    np.testing.assert_allclose(out.numpy(), np.full((1, 1, 4, 4), 48.0), rtol=1e-6)


def test_fully_masked_bin_is_zero() -> None:
    s = PreprocessSettings(thumbnail=2, transform="none", normalise="none")
    mask = np.ones((4, 4), bool)
    mask[:2, :2] = False
    out = Preprocessor(s, mask, (4, 4))(np.ones((1, 4, 4), np.float32))
    assert out[0, 0, 0, 0].item() == 0.0
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0)


def test_adu_calibration_threshold_and_clip() -> None:
    cal = PhotonCalibration(gain=10.0, offset=100.0, threshold=0.5)
    s = PreprocessSettings(thumbnail=2, transform="none", normalise="none", clip_photons=5.0)
    raw = np.array([[[100, 104], [130, 1000]]], dtype=np.uint16)  # 0, 0.4 -> 0, 3, 90 -> 5
    p = Preprocessor(s, None, (2, 2), cal)
    np.testing.assert_allclose(p.photons(torch.from_numpy(raw)).numpy(), [[[0, 0], [3, 5]]])


def test_zscore_normalisation_and_log_transform() -> None:
    s = PreprocessSettings(thumbnail=16)
    frames = np.random.default_rng(1).exponential(5.0, (4, 64, 64)).astype(np.float32)
    out = Preprocessor(s, None, (64, 64))(frames)
    np.testing.assert_allclose(out.mean(dim=(1, 2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(dim=(1, 2, 3)).numpy(), 1.0, atol=1e-4)
    # the same by hand: 4 x 4 bin sums, log1p, then per-image z-score (sample std)
    logged = np.log1p(frames.astype(np.float64).reshape(4, 16, 4, 16, 4).sum(axis=(2, 4)))
    mean, std = logged.mean(axis=(1, 2), keepdims=True), logged.std(axis=(1, 2), ddof=1, keepdims=True)
    np.testing.assert_allclose(out[:, 0].numpy(), (logged - mean) / std, atol=1e-4)


def test_panels_are_tiled_in_a_grid() -> None:
    assert panel_grid(4) == (2, 2)
    assert panel_grid(16) == (4, 4)
    assert panel_grid(6) == (2, 3)
    x = torch.arange(4 * 2 * 3).reshape(1, 4, 2, 3)
    img = assemble_panels(x)[0]
    assert img.shape == (4, 6)
    assert torch.equal(img[:2, :3], x[0, 0]) and torch.equal(img[2:, 3:], x[0, 3])
    assert torch.equal(img[:2, 3:], x[0, 1]) and torch.equal(img[2:, :3], x[0, 2])  # row by row
    six = assemble_panels(torch.arange(6 * 2 * 3).reshape(1, 6, 2, 3))[0]  # 3 rows of 2: 6 x 6, square
    assert six.shape == (6, 6) and torch.equal(six[2:4, 3:], torch.arange(18, 24).reshape(2, 3))
    assert panel_grid(2, 512, 1024) == (2, 1) and panel_grid(8, 512, 1024) == (4, 2)  # pnCCD, Jungfrau 4M
    assert panel_grid(16, 352, 384) == (4, 4) and panel_grid(3, 10, 10) == (1, 3)  # ePix10k 2M; a strip


def test_threshold_keeps_values_at_it_and_negative_photons_become_zero() -> None:
    """Single-photon discrimination zeroes what is below the threshold, not what is at it; calibrated data
    (float, or signed) may dip below 0 with read noise and are clamped, as ADU after their offset are."""
    s = PreprocessSettings(thumbnail=2, transform="none", normalise="none")
    at = Preprocessor(s, None, (2, 2), PhotonCalibration(threshold=0.5))
    values = torch.tensor([[[0.49, 0.5], [0.51, 2.0]]])
    np.testing.assert_allclose(at.photons(values).numpy(), [[[0.0, 0.5], [0.51, 2.0]]])
    plain = Preprocessor(s, None, (2, 2))
    for noisy in (torch.tensor([[[-0.3, 1.0], [0.2, -2.0]]]), torch.tensor([[[-3, 1], [0, -2]]], dtype=torch.int16)):
        assert plain.photons(noisy).min().item() == 0.0 and plain.photons(noisy).max().item() == 1.0


def test_the_raw_count_shortcut_is_refused_where_a_clip_at_the_level_would_change_the_count() -> None:
    """`keeps_above(level)`: a raw value above `level` clipped to exactly `level` is no longer above it."""
    for clip, expected in ((0.5, False), (0.6, True), (None, True)):
        p = Preprocessor(PreprocessSettings(clip_photons=clip), None, (4, 4))
        assert p.keeps_above(0.5) is expected, clip


def test_max_normalisation_and_sqrt_transform() -> None:
    frames = np.random.default_rng(2).exponential(5.0, (3, 16, 16)).astype(np.float32)
    sums = frames.astype(np.float64).reshape(3, 4, 4, 4, 4).sum(axis=(2, 4))
    out = Preprocessor(PreprocessSettings(thumbnail=4, transform="sqrt", normalise="max"), None, (16, 16))(frames)
    expected = np.sqrt(sums) / np.sqrt(sums).max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out[:, 0].numpy(), expected, rtol=1e-5)


def test_wrong_frame_shape_is_refused() -> None:
    p = Preprocessor(PreprocessSettings(thumbnail=8), None, (32, 32))
    with pytest.raises(ValueError, match="frame shape"):
        p(np.zeros((1, 32, 31), np.float32))


def test_exact_and_uneven_bins_agree_with_adaptive_pooling() -> None:
    s = PreprocessSettings(thumbnail=8, transform="none", normalise="none")
    rng = np.random.default_rng(2)
    for shape in [(64, 64), (64, 40), (60, 52)]:  # bins tile the frame exactly (square, not), and do not
        frames = torch.from_numpy(rng.poisson(3.0, (2, *shape)).astype(np.float32))
        mask = rng.random(shape) > 0.1
        p = Preprocessor(s, mask, shape)
        photons = frames * torch.from_numpy(mask)
        coverage = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], (8, 8))
        expected = F.adaptive_avg_pool2d(photons.unsqueeze(1), (8, 8)) / coverage * (shape[0] * shape[1] / 64)
        np.testing.assert_allclose(p(frames.numpy()).numpy(), expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize(("photons", "side"), [(1e3, 128), (1e6, 128), (300, 64)])
def test_raw_adu_taken_as_photons_are_told_from_bright_patterns(photons: float, side: int) -> None:
    """`pedestal_left`: ADU with their pedestal read as photons (no calibration) are flagged, every frame; the same
    frames calibrated are not, nor are patterns of 0-4 particles as bright as 10^6 photons on 128 x 128 pixels
    (60 a pixel on average), with a beam stop masked, nor sparse ones on a frame of the thumbnail's size, where
    a bin is a pixel and one photon reads 1."""
    from lcls_hitfinder.simulate.generate import PatternGenerator
    from lcls_hitfinder.simulate.settings import SimulateSettings

    s = SimulateSettings.model_validate(
        {
            "structures": ["sphere:8", "ellipsoid:9,6,4"],
            "particles": {0: 0.2, 1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2},
            "beam": {"photons_per_pattern": photons},
            "noise": {"kind": "poisson", "adu_gain": 10.0, "adu_offset": 100.0},
            "detector": {"beamstop_px": 3, "shape": [side, side]},
        }
    )
    generator = PatternGenerator(s, seed=3, device="cpu")
    adu = torch.from_numpy(generator.generate(40).images)
    shape = tuple(generator.shape)
    raw = Preprocessor(PreprocessSettings(), generator.mask, shape)
    calibrated = Preprocessor(PreprocessSettings(), generator.mask, shape, PhotonCalibration(gain=10.0, offset=100.0))
    assert raw.pedestal_left(raw.binned(raw.photons(adu))).all()
    assert not calibrated.pedestal_left(calibrated.binned(calibrated.photons(adu))).any()
    gapped = adu.clone()
    gapped[:, :, 60:68] = 0  # a gap that psana's image() fills with zeros: 6% of the bins at 0
    assert raw.pedestal_left(raw.binned(raw.photons(gapped))).all()
    assert not raw.pedestal_left(raw.binned(raw.photons(torch.zeros_like(adu[:2])))).any()  # nothing lit


def test_an_offset_taken_off_calibrated_data_is_told_from_raw_frames() -> None:
    """Calibrated frames (photons, a pedestal already off) served with the raw data's offset are nearly all
    below it, clamped to 0 and decided blank, every one (a review: 300 of 300, unsaid). Raw frames with read
    noise have about half their pixels below the offset, noise-free ones none; a single-photon threshold zeroes
    noise whatever the offset, so it is not judged there."""
    from lcls_hitfinder.preprocess import offset_taken_twice

    rng = np.random.default_rng(0)
    photons = rng.poisson(0.05, (64, 64)).astype(np.float32)
    calibration = PhotonCalibration(gain=10.0, offset=100.0)
    assert offset_taken_twice(photons + rng.normal(0, 0.2, photons.shape).astype(np.float32), calibration)
    raw = (photons * 10 + 100 + rng.normal(0, 3, photons.shape)).astype(np.float32)
    assert not offset_taken_twice(raw, calibration)
    assert not offset_taken_twice((photons * 10 + 100).astype(np.uint16), calibration)  # noise-free ADU
    assert not offset_taken_twice(photons, PhotonCalibration(gain=10.0))  # no offset to take off
    assert not offset_taken_twice(photons, PhotonCalibration(gain=10.0, offset=100.0, threshold=0.5))
    mask = np.zeros(raw.shape, bool)  # a heavy mask whose pixels read 0: they are not the pedestal's
    mask[:, :6] = True
    masked = np.where(mask, raw, 0)
    assert offset_taken_twice(masked, calibration) and not offset_taken_twice(masked, calibration, mask)


def test_frames_far_from_square_are_said(caplog: pytest.LogCaptureFixture) -> None:
    """The thumbnail is square: a 64 x 128 frame is squeezed 2x (said); two 64 x 128 halves, tiled one above
    the other, are square (not squeezed)."""
    with caplog.at_level("WARNING", logger="lcls_hitfinder.preprocess"):
        Preprocessor(PreprocessSettings(), None, (64, 128))
        assert len(caplog.messages) == 1 and "squeezed 2.0x" in caplog.messages[0]
        caplog.clear()
        Preprocessor(PreprocessSettings(), None, (2, 64, 128))
        Preprocessor(PreprocessSettings(), None, (64, 70))
    assert not any("squeezed" in m for m in caplog.messages)


def test_panel_stacks_are_said_to_be_tiled_in_panel_order(caplog: pytest.LogCaptureFixture) -> None:
    """Tiled panels sit where their numbers put them, not where the detector has them (a Jungfrau's modules
    are turned a quarter turn): a review measured accuracy 0.98 -> 0.92 on a tiled Jungfrau 4M, and nothing
    said so. Single images, psana's image=1 among them, are not concerned."""
    with caplog.at_level("WARNING", logger="lcls_hitfinder.preprocess"):
        Preprocessor(PreprocessSettings(), None, (8, 64, 128))
        assert len(caplog.messages) == 1
        assert "8 panels of 64 x 128 are tiled 4 x 2" in caplog.messages[0] and "image=1" in caplog.messages[0]
        caplog.clear()
        Preprocessor(PreprocessSettings(), None, (1, 64, 64))
        Preprocessor(PreprocessSettings(), None, (256, 256))
        # a psana reader's own binner (each MPI rank, each run): the service has said it once
        binning = ReaderBinning(PreprocessSettings(), PhotonCalibration(), PrefilterSettings(), None)
        binning.binner((8, 64, 128))
    assert caplog.messages == []

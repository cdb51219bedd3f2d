"""The template-matching observer of experiments/template_observer.py (docs/RESULTS.md): its fit statistic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "template_observer", Path(__file__).parents[1] / "experiments" / "template_observer.py"
)
assert SPEC is not None and SPEC.loader is not None
observer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(observer)


@pytest.mark.parametrize("scale", [30.0, 1000.0, 30000.0])
def test_deviance_is_least_for_the_library_member_at_any_brightness(scale: float) -> None:
    """A noise-free copy of a library single, at any scale, fits it exactly (G = 0, the fluence is fitted);
    the coherent-like sum of two members fits no member, so its G is positive."""
    rng = np.random.default_rng(0)
    library = rng.gamma(0.5, 1.0, size=(20, 8, 8))
    good = np.ones((8, 8), bool)
    good[3:5, 3:5] = False  # a beam stop: those pixels do not count
    lib = observer.Library(library, good)
    member = library[[7]] * scale
    member[:, ~good] = 1e6  # masked values are ignored
    assert lib.deviance(member)[0] == pytest.approx(0.0, abs=1e-4 * scale)  # float32 sums of ~100 x scale
    mixed = (library[[3]] + library[[11]]) * scale
    assert lib.deviance(mixed)[0] > 0.01 * scale


def test_counts_drop_read_noise_under_half_a_photon() -> None:
    values = np.array([[-0.3, 0.2, 0.6, 1.4, 2.51]])
    counts, false_rate = observer.counted(values, 0.2)
    assert counts.tolist() == [[0.0, 0.0, 1.0, 1.0, 3.0]]
    assert false_rate == pytest.approx(0.00621, rel=1e-2)  # P(N(0, 0.2) > 0.5)
    assert observer.counted(values, 0.0)[1] == 0.0


def test_axes_from_beam_lie_in_their_band_on_both_sides() -> None:
    """Unit vectors whose angle to the beam line lies in the band, pointing along and against the beam; cos θ is
    uniform (uniform on the sphere's zone), so a 15-30° band holds its zone's share of the 15-23° half."""
    from lcls_hitfinder.simulate.generate import axes_from_beam

    axes = axes_from_beam(np.random.default_rng(1), 4000, 15.0, 30.0)
    assert np.allclose(np.linalg.norm(axes, axis=1), 1.0)
    theta = np.degrees(np.arccos(np.abs(axes[:, 2])))
    assert theta.min() >= 15.0 - 1e-9 and theta.max() <= 30.0 + 1e-9
    assert 0.4 < (axes[:, 2] > 0).mean() < 0.6
    share = (np.cos(np.radians(15)) - np.cos(np.radians(23))) / (np.cos(np.radians(15)) - np.cos(np.radians(30)))
    assert abs((theta < 23).mean() - share) < 0.03


def test_the_observers_pairs_are_the_simulators_touching_pairs() -> None:
    """Pairs of touching spheres along axes near the beam: the coherent sum of two particles, not one."""
    from lcls_hitfinder.simulate.generate import PatternGenerator
    from lcls_hitfinder.simulate.settings import SimulateSettings

    gen = PatternGenerator(SimulateSettings(structures=["sphere:6"], detector={"shape": (32, 32)}))
    pairs = observer.expected(gen, 3, (0.0, 15.0), np.random.default_rng(1))
    singles = observer.expected(gen, 3, None, np.random.default_rng(1))
    assert pairs.shape == singles.shape == (3, 32, 32)
    ratio = pairs.sum((1, 2)) / singles.sum((1, 2))
    assert np.all((ratio > 1.5) & (ratio <= 4.0))  # two coherent particles: up to 4x one where they add in phase

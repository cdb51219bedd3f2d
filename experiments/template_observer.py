"""Do the patterns of a pair lined up with the beam hold what tells it from a single? (docs/RESULTS.md,
"What the patterns hold: a template-matching observer")

A diagnostic, not a classifier for the service: it knows the particle's 3D structure, which a beamtime does
not. For one structure of a `simulate` file it builds a library of K noise-free singles in random orientations
(the simulator's own generator and geometry), then draws noisy singles and noisy touching pairs (axis within
each angle bin of the beam) at the file's photon level and asks how well the best single of the library fits
each one: G = min_k 2 Σ x log(x / (n S_k)), the Poisson deviance from the best-fitting single, its scale fitted
(so the fluence is unknown, as at a beamline). Pairs fit worse than singles where the patterns tell them apart.
The threshold keeps 90% of singles made as bright as the pairs; the fraction of pairs above it in each bin is
what this observer rejects. A coarse library fits singles worse too, which raises the threshold: the rejection
is a lower bound on what the patterns hold. Measured on the full detector and on the model's 2 x 2-binned thumbnail.

Usage: python experiments/template_observer.py DATA.h5 SPEC [SPEC ...] [--library 4000] [--n 150]
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import torch

from lcls_hitfinder.dataset import Dataset
from lcls_hitfinder.labels import MAX_PARTICLES
from lcls_hitfinder.simulate.generate import PatternGenerator, axes_from_beam, random_quaternions
from lcls_hitfinder.simulate.settings import SimulateSettings

BINS = (0, 15, 30, 45, 60, 90)


def expected(
    gen: PatternGenerator, n: int, pair_bin: tuple[float, float] | None, rng: np.random.Generator
) -> np.ndarray:
    """(n, H, W) noise-free photons: singles, or touching pairs whose axis lies in pair_bin (degrees from z)."""
    k = 1 if pair_bin is None else 2
    counts = np.full(n, k)
    species = np.zeros((n, MAX_PARTICLES), int)
    quats = random_quaternions(rng, n * MAX_PARTICLES).reshape(n, MAX_PARTICLES, 4)
    quats[:, k:] = 0
    positions = np.zeros((n, MAX_PARTICLES, 3))
    if pair_bin is not None:
        axes = axes_from_beam(rng, n, *pair_bin)  # touching along each axis, in the particles' orientations
        reach = [gen.extent(0, q[0])(a) + gen.extent(0, q[1])(-a) for q, a in zip(quats, axes, strict=True)]
        positions[:, 1] = np.array(reach)[:, None] * axes
        positions[:, :2] -= positions[:, :2].mean(1, keepdims=True)
    out = [
        gen.expected_intensity(counts[s], species[s], quats[s], positions[s], np.ones(len(counts[s]))).cpu().numpy()
        for s in np.array_split(np.arange(n), max(1, n // 256))
    ]
    return np.concatenate(out).reshape(n, *gen.shape)


def counted(x: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """Recorded values -> photon counts as a detector pipeline takes them (rounded, so read noise under half a
    photon is dropped), and the expected false photons per pixel that read noise of sd sigma leaves."""
    false_rate = 0.5 * math.erfc(0.5 / (sigma * math.sqrt(2))) if sigma > 0 else 0.0
    return np.rint(np.clip(x, 0, None)), false_rate


def bin2(x: np.ndarray) -> np.ndarray:
    n, h, w = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2).sum((2, 4))


class Library:
    """log S_k of unit-sum library singles on the good pixels; fits a pattern's best single by one matrix product."""

    def __init__(self, singles: np.ndarray, good: np.ndarray, false_fraction: float = 0.0) -> None:
        s = singles[:, good].astype(np.float64)
        s /= s.sum(1, keepdims=True)
        # a flat share of false photons (read noise above half a photon); and intensity zeros of a noise-free
        # pattern would make any photon there infinitely unlikely
        floor = (false_fraction + 1e-6) / good.sum()
        self.log_s = torch.from_numpy(np.log(s + floor).astype(np.float32))
        self.good = good

    def deviance(self, x: np.ndarray) -> np.ndarray:
        """G per pattern: 2 (Σ x log x - n log n - max_k Σ x log S_k), the Poisson deviance from the best single."""
        v = x[:, self.good].astype(np.float64)
        n = v.sum(1)
        xlogx = np.where(v > 0, v * np.log(np.where(v > 0, v, 1)), 0).sum(1)
        best = (torch.from_numpy(v.astype(np.float32)) @ self.log_s.T).amax(1).double().numpy()
        return 2 * (xlogx - n * np.log(n) - best)


def rejection(
    gen: PatternGenerator,
    lib: np.ndarray,
    pair_bin: tuple[float, float],
    n: int,
    sigma: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Fraction of n noisy pairs in pair_bin that fit worse than 90% of n noisy singles made as bright as they are
    (each single's fluence scaled to its pair's expected photons: a bright single misfits a coarse library more
    than a faint one, and brightness must not be the cue), on the full detector and 2 x 2-binned."""
    good = gen.mask
    pairs = expected(gen, n, pair_bin, rng)
    singles = expected(gen, n, None, rng)
    singles *= (pairs[:, good].sum(1) / singles[:, good].sum(1))[:, None, None]
    noisy = [gen.detect(torch.from_numpy(x.reshape(n, -1)), rng).reshape(n, *gen.shape) for x in (singles, pairs)]
    (s, false_rate), (p, _) = (counted(x, sigma) for x in noisy)
    false_fraction = false_rate * good.sum() / float(np.median(s.sum((1, 2))))
    out = []
    for f, mask in ((lambda x: x, good), (bin2, bin2(good[None].astype(float))[0] > 0)):
        library = Library(f(lib), mask, false_fraction)
        threshold = np.quantile(library.deviance(f(s)), 0.9)
        out.append(float((library.deviance(f(p)) > threshold).mean()))
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a simulate file: its geometry, beam and noise are used")
    p.add_argument("specs", nargs="+", help="structure specs, e.g. procedural:601 or sphere:10")
    p.add_argument("--library", type=int, default=4000)
    p.add_argument("--n", type=int, default=150, help="noisy singles, and pairs per angle bin")
    p.add_argument("--seed", type=int, default=5)
    a = p.parse_args()
    with Dataset(a.data) as d:
        base = SimulateSettings.model_validate(d.attrs["simulate_settings"])
    beam, noise = base.beam, base.noise
    print(f"{a.data}: {beam.photons_per_pattern:g} photons per single, noise {noise.kind}, library {a.library}")
    head = " | ".join(f"{lo}-{hi}°" for lo, hi in itertools.pairwise(BINS))
    print(f"| structure | pixels | {head} |\n|---|---|" + "---|" * (len(BINS) - 1))
    for spec in a.specs:
        settings = base.model_copy(update={"structures": [spec]})
        gen = PatternGenerator(settings, seed=a.seed)
        rng = np.random.default_rng(a.seed)
        sigma = settings.noise.gaussian_sigma if settings.noise.kind == "poisson+gaussian" else 0.0
        lib = expected(gen, a.library, None, rng) * gen.mask
        rows = np.array([rejection(gen, lib, b, a.n, sigma, rng) for b in itertools.pairwise(BINS)]).T
        for name, row in zip(("128 x 128", "64 x 64"), rows, strict=True):
            cells = " | ".join(f"{r:.2f}" for r in row)
            print(f"| {spec} (Rg {gen.volumes[0].rg_nm:.1f} nm) | {name} | {cells} |")


if __name__ == "__main__":
    main()

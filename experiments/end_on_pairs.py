"""A training file with extra 2-particle hits lined up with the beam (docs/RESULTS.md, "Training on more
end-on pairs"): an experiment that did not ship, kept so its numbers can be regenerated.

Copies TRAIN.h5 (a `simulate` file) and appends N noise-free 2-hits of its structures whose axis lies within
CONE degrees of the beam, made by the simulator's own generator (volumes, orientations, coherent sum).
Usage: python experiments/end_on_pairs.py TRAIN.h5 N CONE OUT.h5 [--seed 777]
"""

from __future__ import annotations

import argparse

import numpy as np

from lcls_hitfinder.dataset import Batch, Dataset, DatasetWriter
from lcls_hitfinder.labels import MAX_PARTICLES
from lcls_hitfinder.simulate.generate import PatternGenerator, axes_from_beam, random_quaternions
from lcls_hitfinder.simulate.settings import SimulateSettings


def end_on_pairs(gen: PatternGenerator, n: int, cone_deg: float, rng: np.random.Generator) -> Batch:
    """n touching pairs (one structure each) with axes uniform on the sphere's caps within cone_deg of z."""
    counts = np.full(n, 2)
    species = np.repeat(rng.integers(len(gen.volumes), size=(n, 1)), MAX_PARTICLES, 1)
    quats = random_quaternions(rng, n * MAX_PARTICLES).reshape(n, MAX_PARTICLES, 4)
    quats[:, 2:] = 0
    axis = axes_from_beam(rng, n, 0.0, cone_deg)
    # touching along the axis, as the simulator's clusters do: each particle's extent in its orientation
    reach = [
        gen.extent(int(s[0]), q[0])(a) + gen.extent(int(s[1]), q[1])(-a)
        for s, q, a in zip(species, quats, axis, strict=True)
    ]
    positions = np.zeros((n, MAX_PARTICLES, 3))
    positions[:, 1] = np.array(reach)[:, None] * axis
    positions[:, :2] -= positions[:, :2].mean(1, keepdims=True)
    intensity = gen.expected_intensity(counts, species, quats, positions, np.ones(n))
    good = gen.mask.reshape(-1)
    return Batch(
        images=gen.detect(intensity, rng).reshape(n, *gen.shape),
        n_particles=counts.astype(np.int8),
        structure=np.array([gen.volumes[s].name for s in species[:, 0]], dtype=object),
        photons=intensity.cpu().numpy()[:, good].sum(1).astype(np.float32),
        orientations=quats.astype(np.float32),
        positions=positions.astype(np.float32),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("n", type=int)
    p.add_argument("cone", type=float)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=777)
    a = p.parse_args()
    with Dataset(a.train) as src:
        settings = SimulateSettings.model_validate(src.attrs["simulate_settings"])
        gen = PatternGenerator(settings, seed=a.seed)
        rng = np.random.default_rng(a.seed)
        with DatasetWriter(a.out, src.shape, src.mask, gen.attrs) as out:
            for batch in src.batches(512):
                out.append(batch)
            for lo in range(0, a.n, 64):
                out.append(end_on_pairs(gen, min(64, a.n - lo), a.cone, rng))
    print(a.out)


if __name__ == "__main__":
    main()

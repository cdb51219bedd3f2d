"""Hits -> photons: random orientations, touching clusters, coherent sums, fluence, background and noise.

`PatternGenerator` makes patterns in memory, chunk by chunk (the live `sim:` source uses it);
`simulate_dataset` writes them through `DatasetWriter`, in parallel processes. Chunk k always draws from
the random stream (seed, k), so a dataset does not depend on the number of workers.

Intensity of a pattern in photons per pixel:
    I(q) = |Σ_j sqrt(s_j) F_j(R_jᵀ q) exp(i q·r_j)|² ΔΩ P
where F_j is the amplitude of particle j (electrons), R_j its orientation, r_j its position in the
cluster, ΔΩ the pixel's solid angle, P the polarization factor and s_j = fluence · r_e² (times the shot's
jitter). With `photons_per_pattern` the fluence of each structure is set so that one particle gives that
many photons on the good pixels on average over orientations (computed from the spherical average of |F|²);
a mixed cluster is lit at the fluence of its first particle's structure, the same for all its particles.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcls_hitfinder.dataset import Batch, DatasetWriter
from lcls_hitfinder.devices import resolve_device
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import MAX_PARTICLES
from lcls_hitfinder.simulate.geometry import DetectorGeometry
from lcls_hitfinder.simulate.settings import SimulateSettings
from lcls_hitfinder.simulate.structures import load_structure
from lcls_hitfinder.simulate.volume import VOLUME_VERSION, Volume, make_volume, spherical_intensity

R_E_NM = 2.8179403262e-6
"""Classical electron radius in nm."""

_POINTS_PER_CALL = 1 << 21
"""q points per interpolation call: bounds the memory of large detectors."""


def lognormal_of_mean_1(spread: float) -> tuple[float, float]:
    """(mu, sigma) of the logarithm of a log-normal factor with mean 1 and relative sd `spread`: what a fluence
    jitter means, in simulation and in training's augmentation alike."""
    sigma = math.sqrt(math.log1p(spread**2))
    return -sigma * sigma / 2, sigma


def random_quaternions(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) unit quaternions (w, x, y, z), uniform over rotations (Shoemake 1992), w >= 0."""
    u1, u2, u3 = rng.random((3, n))
    q = np.stack(
        [
            np.sqrt(u1) * np.cos(2 * np.pi * u3),
            np.sqrt(1 - u1) * np.sin(2 * np.pi * u2),
            np.sqrt(1 - u1) * np.cos(2 * np.pi * u2),
            np.sqrt(u1) * np.sin(2 * np.pi * u3),
        ],
        1,
    )
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def axes_from_beam(rng: np.random.Generator, n: int, lo_deg: float, hi_deg: float) -> np.ndarray:
    """(n, 3) unit vectors uniform on the sphere where their angle to the beam (±z) lies in [lo_deg, hi_deg]:
    the axes of pairs lined up with the beam, for the experiments that study them."""
    cos_t = rng.uniform(math.cos(math.radians(hi_deg)), math.cos(math.radians(lo_deg)), n) * rng.choice([-1, 1], n)
    phi = rng.uniform(0, 2 * math.pi, n)
    sin_t = np.sqrt(1 - cos_t**2)
    return np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], 1)


def rotation_matrices(q: np.ndarray) -> np.ndarray:
    """(n, 4) unit quaternions (w, x, y, z) -> (n, 3, 3) rotation matrices."""
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


Extent = Callable[[np.ndarray], float]  # how far a particle reaches from its centre along a unit lab direction


def touching_cluster(extents: Sequence[Extent], rng: np.random.Generator) -> np.ndarray:
    """(k, 3) centres (nm) of particles that reach extents[i](u) along a direction u, each touching an
    earlier one, none overlapping.

    Each new particle comes from a random direction u at a randomly chosen earlier one, as aggregates form,
    and stops where the planes normal to u that bound the two meet: spheres touch there, other convex
    shapes touch that plane (and each other, or nearly). It must be separated the same way (by a plane
    normal to the line between their centres) from every other particle. The cluster is centred on the mean
    position.
    """
    pos = [np.zeros(3)]
    for i in range(1, len(extents)):
        for _ in range(1000):
            j = int(rng.integers(i))
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            p = pos[j] + (extents[j](u) + extents[i](-u)) * u
            if all(_separated(p - pos[k], extents[k], extents[i]) for k in range(i) if k != j):
                break
        pos.append(p)
    out = np.array(pos)
    return out - out.mean(0)


def _separated(offset: np.ndarray, first: Extent, second: Extent) -> bool:
    """Whether a particle at `offset` from another clears it along the line between them."""
    distance = float(np.linalg.norm(offset))
    n = offset / distance
    return distance >= first(n) + second(-n) - 1e-9


def _check_memory(shape: tuple[int, int], chunk: int) -> None:
    """A detector whose chunk of patterns cannot fit in memory is a user error, not a crash."""
    pixels = shape[0] * shape[1]
    need = pixels * (64 + chunk * 40)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise UserError(
            f"detector shape {shape[0]}x{shape[1]} needs about {need / 1e9:.1f} GB for a chunk of {chunk} patterns, "
            f"more than this machine's {have / 1e9:.1f} GB: use a smaller shape or simulate.chunk"
        )


class PatternGenerator:
    """Builds the volumes once, then makes batches of labelled patterns (dataset.Batch) on demand."""

    def __init__(
        self, settings: SimulateSettings, seed: int | None = None, device: str | None = None, progress: bool = False
    ) -> None:
        self.settings = settings
        self.seed = settings.seed if seed is None else seed
        self.device = resolve_device(device or settings.device, "simulate.device")
        self.geometry = DetectorGeometry.from_settings(settings.detector, settings.beam)
        _check_memory(self.geometry.shape, settings.chunk)
        self.mask = self.geometry.mask()
        q = self.geometry.q_vectors()
        q_abs = np.sqrt((q**2).sum(1))
        self._q = torch.from_numpy(q.astype(np.float32)).to(self.device)
        factor = self.geometry.pixel_factor()
        self._factor = torch.from_numpy(factor.astype(np.float32)).to(self.device)
        self._good = torch.from_numpy(self.mask.reshape(-1)).to(self.device)
        self.volumes = self._volumes(float(q_abs.max()), progress)
        self.scales = [self._scale(v, q_abs, factor) for v in self.volumes]
        self._background = torch.from_numpy(self._background_counts(q_abs).astype(np.float32)).to(self.device)
        counts = sorted(k for k, w in settings.particles.items() if w > 0)
        weights = np.array([settings.particles[k] for k in counts], float)
        self._counts, self._p = np.array(counts), weights / weights.sum()
        self._next_chunk = 0

    def _volumes(self, q_max: float, progress: bool) -> list[Volume]:
        """One volume per structure spec (a repeated spec shares one), built or loaded from the disk cache."""
        from rich.progress import track

        s = self.settings
        built: dict[str, Volume] = {}
        specs = track(s.structures, "structures", transient=True, disable=not progress or len(s.structures) < 2)
        for spec in specs:
            if spec not in built:
                built[spec] = make_volume(load_structure(spec), q_max, s.oversampling, self.device, s.max_volume_gb)
        return [built[spec] for spec in s.structures]

    def _scale(self, volume: Volume, q_abs: np.ndarray, factor: np.ndarray) -> float:
        """fluence x r_e² (nm⁻² x nm²) for this structure."""
        beam = self.settings.beam
        if beam.fluence is not None:
            return beam.fluence * 1e-6 * R_E_NM**2
        radial = np.linspace(0, q_abs.max(), 512)
        mean_i = np.interp(q_abs, radial, spherical_intensity(volume, radial))
        expected = float((mean_i * factor)[self.mask.reshape(-1)].sum())
        if expected <= 0:
            raise UserError(f"structure {volume.name} scatters no photons onto the good pixels")
        return beam.photons_per_pattern / expected

    def _background_counts(self, q_abs: np.ndarray) -> np.ndarray:
        bg = self.settings.background
        if bg.kind == "flat":
            return np.full(q_abs.shape, bg.photons_per_pixel)
        if bg.kind == "radial":
            return bg.photons_per_pixel / (1 + (q_abs / bg.q0_inv_nm) ** 2)
        return np.zeros(q_abs.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.shape

    @property
    def units(self) -> str:
        return "adu" if self.settings.noise.adu_gain is not None else "photons"

    @property
    def attrs(self) -> dict[str, Any]:
        """Dataset attributes: geometry, beam, noise, seed, versions and the full settings."""
        from lcls_hitfinder import __version__

        s = self.settings
        return {
            **self.geometry.attrs(),
            "structures": list(s.structures),
            "photons_per_pattern": s.beam.photons_per_pattern if s.beam.fluence is None else "",
            "fluence_ph_per_um2": [scale / R_E_NM**2 * 1e6 for scale in self.scales],
            "fluence_jitter": s.beam.fluence_jitter,
            "noise": s.noise.model_dump(mode="json"),
            "background": s.background.model_dump(mode="json"),
            "seed": self.seed,
            "chunk": s.chunk,
            "simulator_version": f"{__version__}+volume{VOLUME_VERSION}",
            "simulate_settings": s.model_dump(mode="json"),
        }

    def generate(self, n: int) -> Batch:
        """The next n patterns of this generator's stream."""
        batch = self.chunk(self._next_chunk, n)
        self._next_chunk += 1
        return batch

    def chunk(self, index: int, n: int) -> Batch:
        """n patterns from the random stream (seed, index): the same on every call and in every process."""
        rng = np.random.default_rng([self.seed, index])
        counts = rng.choice(self._counts, size=n, p=self._p)
        n_species = len(self.volumes)
        species = (
            rng.integers(n_species, size=(n, MAX_PARTICLES))
            if self.settings.mixed_species
            else np.repeat(rng.integers(n_species, size=(n, 1)), MAX_PARTICLES, 1)
        )
        quats = random_quaternions(rng, n * MAX_PARTICLES).reshape(n, MAX_PARTICLES, 4)
        quats[np.arange(MAX_PARTICLES)[None, :] >= counts[:, None]] = 0
        jitter = self._jitter(rng, n)
        positions = np.zeros((n, MAX_PARTICLES, 3))
        for i in np.flatnonzero(counts > 1):
            extents = [self.extent(int(species[i, k]), quats[i, k]) for k in range(counts[i])]
            positions[i, : counts[i]] = touching_cluster(extents, rng)
        intensity = self.expected_intensity(counts, species, quats, positions, jitter)
        photons = (intensity * self._good).sum(1)
        images = self.detect(intensity + self._background, rng)
        names = ["+".join(dict.fromkeys(self.volumes[s].name for s in species[i, : counts[i]])) for i in range(n)]
        return Batch(
            images=images.reshape(n, *self.shape),
            n_particles=counts.astype(np.int8),
            structure=np.array(names, dtype=object),
            photons=photons.cpu().numpy().astype(np.float32),
            orientations=quats.astype(np.float32),
            positions=positions.astype(np.float32),
        )

    def extent(self, species: int, quat: np.ndarray) -> Extent:
        """A particle of this structure turned by this rotation: its extent along lab directions."""
        volume, rot = self.volumes[species], rotation_matrices(quat[None])[0]
        return lambda u: float(volume.extent((u @ rot)[None])[0])  # (Rᵀu)ᵀ = uᵀR: the particle's frame

    def _jitter(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Log-normal fluence factors with mean 1 and relative sd fluence_jitter."""
        mu, sd = lognormal_of_mean_1(self.settings.beam.fluence_jitter)
        return np.exp(rng.normal(mu, sd, n))

    def expected_intensity(
        self, counts: np.ndarray, species: np.ndarray, quats: np.ndarray, positions: np.ndarray, jitter: np.ndarray
    ) -> torch.Tensor:
        """(n, pixels) noise-free photons of the coherent sum over each pattern's particles.

        counts (n,), species (n, 4) indices into the structures, quats (n, 4, 4), positions (n, 4, 3) in nm
        (lab frame), jitter (n,) fluence factors; entries past a pattern's count are ignored.
        """
        n, npix = len(counts), self._q.shape[0]
        # one fluence per shot, that of its first particle's structure: in a mixed cluster every particle sees it
        shot_scale = np.asarray(self.scales)[species[:, 0]] * jitter
        amp = torch.zeros(n, npix, dtype=torch.complex64, device=self.device)
        pattern, slot = np.nonzero(np.arange(MAX_PARTICLES)[None, :] < counts[:, None])
        per_call = max(1, _POINTS_PER_CALL // npix)
        for s, volume in enumerate(self.volumes):
            sel = species[pattern, slot] == s
            p_idx, j_idx = pattern[sel], slot[sel]
            for lo in range(0, len(p_idx), per_call):
                pi, ji = p_idx[lo : lo + per_call], j_idx[lo : lo + per_call]
                rot = torch.from_numpy(rotation_matrices(quats[pi, ji]).astype(np.float32)).to(self.device)
                pos = torch.from_numpy(positions[pi, ji].astype(np.float32)).to(self.device)
                weight = torch.from_numpy(np.sqrt(shot_scale[pi]).astype(np.float32)).to(self.device)
                a = volume.rotated_amplitude(self._q, rot)
                phase = torch.polar(weight[:, None].expand(-1, npix), pos @ self._q.T)
                amp.index_add_(0, torch.from_numpy(pi).to(self.device), a * phase)
        return torch.view_as_real(amp).square().sum(-1) * self._factor

    def detect(self, expected: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        """Expected photons -> recorded values: Poisson, read noise, ADU, dead pixels, saturation."""
        noise = self.settings.noise
        lam = expected.double().cpu().numpy()
        try:
            values = rng.poisson(lam).astype(np.float32) if noise.kind != "none" else lam.astype(np.float32)
        except ValueError:  # numpy draws Poisson counts up to about 1e19 photons a pixel
            raise UserError(
                f"{lam.max():.3g} photons expected in one pixel, too many to draw: lower the photons per pattern "
                "or the fluence"
            ) from None
        if noise.adu_gain is not None:
            values = values * np.float32(noise.adu_gain) + np.float32(noise.adu_offset)
        if noise.kind == "poisson+gaussian":
            values += rng.normal(0, noise.gaussian_sigma, values.shape).astype(np.float32)
        values[:, ~self.mask.reshape(-1)] = 0
        saturation = self.settings.detector.saturation
        if saturation is not None:
            np.minimum(values, np.float32(saturation), out=values)
        return values


def _chunk_sizes(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - lo) for lo in range(0, n, chunk)]


_worker: PatternGenerator | None = None


def _init_worker(settings: SimulateSettings) -> None:
    global _worker
    torch.set_num_threads(1)
    _worker = PatternGenerator(settings, device="cpu")


def _work(job: tuple[int, int]) -> Batch:
    assert _worker is not None
    return _worker.chunk(*job)


def simulate_dataset(
    settings: SimulateSettings, out: Path, n: int | None = None, workers: int | None = None, progress: bool = True
) -> Path:
    """Write n (default settings.n) patterns to `out`, chunk by chunk, with `workers` processes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    n = settings.n if n is None else n
    workers = settings.workers if workers is None else workers
    generator = PatternGenerator(settings, progress=progress)  # builds and caches the volumes before the workers
    jobs = list(enumerate(_chunk_sizes(n, settings.chunk)))
    h_w = generator.shape
    columns = (TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        DatasetWriter(out, h_w, generator.mask, generator.attrs, units=generator.units) as writer,
        Progress(*columns, disable=not progress, console=Console(stderr=True)) as bar,  # stdout: results only
    ):
        task = bar.add_task("patterns", total=n)
        batches: Iterator[Batch]
        if workers == 1:
            batches = (generator.chunk(*job) for job in jobs)
            for batch in batches:
                writer.append(batch)
                bar.advance(task, len(batch))
        else:
            with mp.get_context("spawn").Pool(workers, _init_worker, (settings,)) as pool:
                for batch in pool.imap(_work, jobs):
                    writer.append(batch)
                    bar.advance(task, len(batch))
    return out

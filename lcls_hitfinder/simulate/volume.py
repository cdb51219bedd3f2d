"""Fourier volumes: the complex scattering amplitude F(q) of a structure, in electrons, sampled at any q.

Atomic structures get a grid of F(q) computed once by FFT and cached on disk; uniform bodies use their
closed-form transform. Both answer `amplitude(q)` (particle frame, nm⁻¹) and `rotated_amplitude(q, R)`
(lab frame, turned particles), so the detector geometry, orientations, multi-hit phases and beam all run
through one code path.

The FFT grid (see `build_grid`):
- Atoms are spread onto a real-space grid with a Gaussian kernel at twice the needed q range and the
  kernel is divided out after the FFT (Gaussian-gridding non-uniform FFT); each element's FFT is then
  multiplied by its form factor, so F(q) at the grid nodes is exact to about 1e-4.
- The q spacing is 2π / (oversampling x diameter). Slices interpolate F trilinearly. On average, linear
  interpolation attenuates the contribution of an atom at x by sinc²(q-spacing · x / 2) per axis; each
  atom's weight is divided by that factor before the FFT. What remains oscillates between grid nodes and
  midpoints (|F|² within 0.2 % of the exact atomic sum for a protein at oversampling 8, see
  tests/test_simulate_physics.py).
- A fine q spacing means a large real-space box; it is built from sub³ FFTs of a box that just holds the
  particle, each with a sub-grid phase ramp, so memory stays at the size of the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.paths import replaced
from lcls_hitfinder.simulate.structures import PROTEIN_DENSITY_E_NM3, AtomModel, Body, Structure

VOLUME_VERSION = 1
"""Bump when the grid construction changes, so cached volumes are rebuilt."""

CONTACT_MARGIN_NM = 0.2
"""How far a bead or atom model reaches beyond its outermost scatterers' centres: about a residue's radius."""

_KERNEL_SIGMA_QMAX = 1.5
"""Gaussian kernel sd times the output q range: aliasing exp(-4 x 1.5²) ≈ 1e-4, gain at qmax exp(1.125)."""

_KERNEL_HALF_WIDTH = 3.7
"""Kernel truncated at this many sd (exp(-3.7²/2) ≈ 1e-3 of the peak, at the kernel's far edge only)."""

log = logging.getLogger(__name__)

_Q_STEP = 0.25
"""The grid's q range is rounded up to a multiple of this (nm⁻¹), so nearby geometries share a cached volume."""


class Volume(Protocol):
    """A structure's scattering amplitude in electrons at q vectors (nm⁻¹, particle frame)."""

    @property
    def name(self) -> str: ...

    @property
    def radius_nm(self) -> float:
        """Largest distance of the structure's matter from its centre."""
        ...

    @property
    def rg_nm(self) -> float:
        """Radius of gyration of the electron density."""
        ...

    def extent(self, u: np.ndarray) -> np.ndarray:
        """(k,) how far the matter reaches from the centre along unit directions u (k, 3), particle frame:
        where particles touch in a multi-particle hit."""
        ...

    def amplitude(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., 3) float32 -> complex64 (...)."""
        ...

    def rotated_amplitude(self, q: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """F(Rᵀq) of the particle turned by each R: q (P, 3) lab frame, rot (I, 3, 3) -> complex64 (I, P)."""
        ...


def cache_dir() -> Path:
    """$LCLS_HITFINDER_CACHE/volumes, else ~/.cache/lcls-hitfinder/volumes."""
    root = os.environ.get("LCLS_HITFINDER_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lcls-hitfinder"
    return base / "volumes"


def _sphere_shape(u: torch.Tensor) -> torch.Tensor:
    """3 (sin u - u cos u) / u³, with its series near 0 where the closed form cancels."""
    small = u < 1e-2
    us = torch.where(small, torch.ones_like(u), u)
    exact = 3 * (torch.sin(us) - us * torch.cos(us)) / us**3
    return torch.where(small, 1 - u**2 / 10, exact)


@dataclass
class BodyVolume:
    """The closed-form amplitude of a uniform sphere, core-shell sphere or ellipsoid."""

    body: Body

    @property
    def name(self) -> str:
        return self.body.name

    @property
    def radius_nm(self) -> float:
        return self.body.radius_nm

    @property
    def rg_nm(self) -> float:
        return self.body.rg_nm

    def extent(self, u: np.ndarray) -> np.ndarray:
        return self.body.extent(u)

    def amplitude(self, q: torch.Tensor) -> torch.Tensor:
        rho = PROTEIN_DENSITY_E_NM3
        p = self.body.params
        if self.body.kind == "sphere":
            out = rho * 4 / 3 * math.pi * p[0] ** 3 * _sphere_shape(q.norm(dim=-1) * p[0])
        elif self.body.kind == "ellipsoid":
            axes = torch.tensor(p, dtype=q.dtype, device=q.device)
            out = rho * 4 / 3 * math.pi * p[0] * p[1] * p[2] * _sphere_shape((q * axes).norm(dim=-1))
        else:
            rc, r, ratio = p
            qn = q.norm(dim=-1)
            out = rho * 4 / 3 * math.pi * (r**3 * _sphere_shape(qn * r) + (ratio - 1) * rc**3 * _sphere_shape(qn * rc))
        return out.to(torch.complex64)

    def rotated_amplitude(self, q: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        return self.amplitude(torch.matmul(q, rot))  # row vectors: (Rᵀq)ᵀ = qᵀR


@dataclass
class GridVolume:
    """F(q) on a cubic grid: node (a, b, c) holds q = ((a, b, c) - n / 2) * dq; trilinear in between."""

    name: str
    values: torch.Tensor
    """(1, 2, n, n, n) float32: real and imaginary parts."""
    dq: float
    radius_nm: float
    rg_nm: float
    surface: np.ndarray
    """(S, 3) nm: the scatterers on the structure's convex hull."""

    def extent(self, u: np.ndarray) -> np.ndarray:
        return (u @ self.surface.T).max(-1) + CONTACT_MARGIN_NM

    def amplitude(self, q: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(3, dtype=q.dtype, device=q.device)[None]
        return self.rotated_amplitude(q.reshape(-1, 3), eye).reshape(q.shape[:-1])

    def rotated_amplitude(self, q: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        n = self.values.shape[-1]
        # grid_sample wants (x, y, z) = (last, middle, first) grid axis, scaled to [-1, 1] over the nodes:
        # fold the axis order and the scale into the rotation, so one matmul gives the coordinates.
        to_grid = rot.flip(-1) * (2 / ((n - 1) * self.dq))
        coords = torch.matmul(q.to(rot.dtype), to_grid) + (n / (n - 1) - 1)
        out = F.grid_sample(
            self.values, coords[None, :, :, None].to(self.values.dtype), mode="bilinear", align_corners=True
        )
        return torch.complex(out[0, 0, :, :, 0], out[0, 1, :, :, 0])


@dataclass(frozen=True)
class GridPlan:
    """Sizes of one FFT volume: spread grid spacing, sub-box points, sub-grids per axis, output nodes."""

    spacing_nm: float
    box: int
    sub: int
    n: int
    dq: float
    sigma_nm: float
    half_width: int

    @property
    def nbytes(self) -> int:
        return self.n**3 * 8


def plan_grid(radius_nm: float, q_max: float, oversampling: float) -> GridPlan:
    """Grid sizes for a particle of `radius_nm` seen up to |q| = q_max (already rounded) at `oversampling`."""
    spacing = math.pi / (2 * q_max)
    sigma = _KERNEL_SIGMA_QMAX / q_max
    half_width = math.ceil(_KERNEL_HALF_WIDTH * sigma / spacing)
    diameter = 2 * radius_nm
    box = 2 * math.ceil((diameter / spacing + 2 * half_width + 2) / 2)
    sub = max(1, math.ceil(oversampling * diameter / (box * spacing)))
    dq = 2 * math.pi / (sub * box * spacing)
    n = 2 * math.ceil(q_max / dq) + 4
    return GridPlan(spacing, box, sub, n, dq, sigma, half_width)


def _spread(plan: GridPlan, positions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum of normalised Gaussians (sd plan.sigma_nm) centred on the atoms, sampled on the sub-box grid."""
    m, h, d = plan.box, plan.half_width, plan.spacing_nm
    grid = np.zeros(m**3)
    offsets = np.arange(-h + 1, h + 1)
    norm = 1 / (math.sqrt(2 * math.pi) * plan.sigma_nm)
    for lo in range(0, len(positions), 8192):
        u = positions[lo : lo + 8192] / d + m / 2
        base = np.floor(u).astype(np.int64)
        idx = base[:, :, None] + offsets  # (atoms, 3, 2h)
        k = norm * np.exp(-(((idx - u[:, :, None]) * d) ** 2) / (2 * plan.sigma_nm**2))
        w = weights[lo : lo + 8192, None, None, None] * (
            k[:, 0, :, None, None] * k[:, 1, None, :, None] * k[:, 2, None, None, :]
        )
        flat = (
            (idx[:, 0, :, None, None] % m) * m * m + (idx[:, 1, None, :, None] % m) * m + idx[:, 2, None, None, :] % m
        )
        grid += np.bincount(flat.ravel(), w.ravel(), minlength=m**3)
    return grid.reshape(m, m, m)


def build_grid(model: AtomModel, plan: GridPlan, device: torch.device | None = None) -> np.ndarray:
    """F(q) in electrons on the plan's (n, n, n) grid, complex64.

    Node k = sub * k' + s of the fine grid is node k' of the sub-box FFT of the density times the phase
    ramp exp(2πi s x / L). The FFTs run one axis at a time, keeping only the nodes inside the output range
    before the next axis, and each partial transform is shared by all sub-grids that follow from it.
    """
    m, sub, n, d = plan.box, plan.sub, plan.n, plan.spacing_nm
    densities = []
    for group in model.groups:
        # Pre-compensate trilinear interpolation: its m = 0 term attenuates an atom at x by sinc²(dq x / 2).
        damp = np.prod(np.sinc(plan.dq * group.positions / (2 * math.pi)) ** 2, axis=1)
        densities.append(_spread(plan, group.positions, group.weights / damp))
    rho = torch.from_numpy(np.stack(densities)).to(device or "cpu", torch.complex64)
    x = (np.arange(m) - m / 2) * d
    k_all = np.arange(-n // 2, n // 2)
    axes = []
    for si in range(sub):
        ks = k_all[(k_all - si) % sub == 0]
        kp = (ks - si) // sub
        # Node k' of an FFT over x = (j - m/2) d is m * ifft[k' mod m] * (-1)^k'.
        ramp = torch.from_numpy(np.exp(2j * math.pi * si * x / (sub * m * d))).to(rho)
        scale = torch.from_numpy(m * (-1.0) ** kp).to(rho)
        axes.append((ks, ramp, torch.from_numpy(kp % m).to(rho.device), scale))
    # Form factor x kernel deconvolution depends on |q|² = dq² (ka² + kb² + kc²): tabulate it per integer.
    k2 = np.arange(3 * (n // 2) ** 2 + 1)
    qn = plan.dq * np.sqrt(k2)
    deconv = d**3 * np.exp(qn**2 * plan.sigma_nm**2 / 2)
    table = torch.from_numpy(np.stack([g.form_factor(qn) * deconv for g in model.groups])).to(rho)
    out = np.empty((n, n, n), np.complex64)
    for ka, ra, ia, ga in axes:
        a = torch.fft.ifft(rho * ra[:, None, None], dim=1).index_select(1, ia) * ga[:, None, None]
        for kb, rb, ib, gb in axes:
            b = torch.fft.ifft(a * rb[:, None], dim=2).index_select(2, ib) * gb[:, None]
            for kc, rc, ic, gc in axes:
                c = torch.fft.ifft(b * rc, dim=3).index_select(3, ic) * gc
                k2_block = torch.from_numpy(ka[:, None, None] ** 2 + kb[None, :, None] ** 2 + kc[None, None, :] ** 2)
                factors = table[:, k2_block.to(table.device)]
                out[np.ix_(ka + n // 2, kb + n // 2, kc + n // 2)] = (c * factors).sum(0).cpu().numpy()
    return out


def _load_grid(
    model: AtomModel, q_max: float, oversampling: float, max_bytes: float, device: torch.device
) -> tuple[np.ndarray, float]:
    plan = plan_grid(model.radius_nm, q_max, oversampling)
    if plan.nbytes > max_bytes:
        # Too big at the requested oversampling: take the largest that fits (interpolation gets coarser).
        fits = [
            o for o in np.arange(oversampling, 1.99, -0.5) if plan_grid(model.radius_nm, q_max, o).nbytes <= max_bytes
        ]
        if not fits:
            raise UserError(
                f"structure {model.name}: its Fourier volume ({plan.n}³ voxels, {plan.nbytes / 1e9:.1f} GB) exceeds "
                f"simulate.max_volume_gb = {max_bytes / 1e9:g} even at oversampling 2; raise max_volume_gb or "
                "shrink the detector's q range"
            )
        log.warning(
            "structure %s: oversampling %.3g -> %.3g to fit simulate.max_volume_gb", model.name, oversampling, fits[0]
        )
        oversampling = float(fits[0])
        plan = plan_grid(model.radius_nm, q_max, oversampling)
    key = json.dumps([VOLUME_VERSION, model.key, round(q_max, 6), oversampling], separators=(",", ":"))
    path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return f["values"], float(f["dq"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: built again
            path.unlink(missing_ok=True)
    log.warning(  # seconds to minutes, and up to max_volume_gb on disk: neither should be a surprise
        "structure %s: building its Fourier volume (%d³ voxels, %.0f MB), cached in %s",
        model.name,
        plan.n,
        plan.nbytes / 1e6,
        path.parent,
    )
    values = build_grid(model, plan, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        np.savez(tmp, values=values, dq=plan.dq, key=key)
    return values, plan.dq


def make_volume(
    structure: Structure, q_max: float, oversampling: float, device: torch.device, max_volume_gb: float
) -> Volume:
    """The volume of a structure that covers |q| <= q_max, from the disk cache when built before."""
    if isinstance(structure, Body):
        return BodyVolume(structure)
    q_grid = math.ceil(q_max * 1.02 / _Q_STEP) * _Q_STEP
    values, dq = _load_grid(structure, q_grid, oversampling, max_volume_gb * 1e9, device)
    tensor = torch.from_numpy(np.stack([values.real, values.imag])[None].astype(np.float32)).to(device)
    return GridVolume(structure.name, tensor, dq, structure.radius_nm, structure.rg_nm, structure.surface())


def fibonacci_directions(n: int) -> np.ndarray:
    """n nearly uniform unit vectors (Fibonacci lattice on the sphere)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + math.sqrt(5)) * i
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def spherical_intensity(volume: Volume, q_abs: np.ndarray, directions: int = 2000) -> np.ndarray:
    """The orientational average of |F|² at each |q| (electrons²): the mean of random-orientation patterns."""
    dirs = torch.from_numpy(fibonacci_directions(directions).astype(np.float32))
    out = np.empty(len(q_abs))
    for lo in range(0, len(q_abs), 64):
        qs = torch.from_numpy(np.asarray(q_abs[lo : lo + 64], np.float32))
        points = (qs[:, None, None] * dirs[None]).to(_device_of(volume))
        out[lo : lo + 64] = volume.amplitude(points).abs().square().mean(1).double().cpu().numpy()
    return out


def _device_of(volume: Volume) -> torch.device:
    return volume.values.device if isinstance(volume, GridVolume) else torch.device("cpu")

"""Physics acceptance tests of the simulator: each compares with a formula computed here, independently.

The reference geometry is recomputed from first principles in `_reference_q` (pixel -> 2θ -> q =
4π sin θ / λ), not taken from lcls_hitfinder.simulate.geometry.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from lcls_hitfinder.simulate.generate import R_E_NM, PatternGenerator, touching_cluster
from lcls_hitfinder.simulate.settings import SimulateSettings
from lcls_hitfinder.simulate.structures import load_structure
from lcls_hitfinder.simulate.volume import make_volume

SPHERE_MINIMA = (4.4934, 7.7253, 10.9041)
"""Zeros of tan(x) = x: the minima of the sphere form factor at qR."""


@pytest.fixture(autouse=True)
def _volume_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LCLS_HITFINDER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # not left to the tests of other modules


def _settings(structure: str, **kw: object) -> SimulateSettings:
    base: dict[str, object] = {
        "structures": [structure],
        "particles": {1: 1.0},
        "noise": {"kind": "none"},
        "detector": {"beamstop_px": 0},
    }
    base.update(kw)
    return SimulateSettings.model_validate(base)


def _reference_q(s: SimulateSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """|q| (nm⁻¹), radius in pixels, solid angle x polarization, and q_x, per pixel, from first principles."""
    h, w = s.detector.shape
    p, dist = s.detector.pixel_size_m, s.detector.distance_m
    y, x = np.meshgrid((np.arange(h) - (h - 1) / 2) * p, (np.arange(w) - (w - 1) / 2) * p, indexing="ij")
    r = np.hypot(x, y)
    two_theta = np.arctan2(r, dist)
    lam = 1239.84198 / s.beam.photon_energy_ev
    q = 4 * math.pi * np.sin(two_theta / 2) / lam
    ray = np.sqrt(r**2 + dist**2)
    factor = p * p * dist / ray**3 * (1 - (x / ray) ** 2)  # solid angle x horizontal polarization
    qx = 2 * math.pi / lam * x / ray
    return q, r / p, factor, qx


def _sphere_shape(u: np.ndarray) -> np.ndarray:
    return 3 * (np.sin(u) - u * np.cos(u)) / u**3


def _ring_profiles(image: np.ndarray, model: np.ndarray, radius_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ring = np.rint(radius_px).astype(int).ravel()
    count = np.bincount(ring)
    count[count == 0] = 1  # rings no pixel centre rounds to (none beyond the first few)
    return np.bincount(ring, image.ravel()) / count, np.bincount(ring, model.ravel()) / count


def _check_sphere_profile(image: np.ndarray, expected: np.ndarray, s: SimulateSettings, radius_nm: float) -> None:
    """Ring-averaged profile within 2 % up to the third minimum; simulated minima within a pixel."""
    _, radius_px, factor, _ = _reference_q(s)
    sim, ana = _ring_profiles(image / factor, expected / factor, radius_px)
    lam = 1239.84198 / s.beam.photon_energy_ev
    minima_px = [
        s.detector.distance_m * math.tan(2 * math.asin(x / radius_nm * lam / (4 * math.pi))) / s.detector.pixel_size_m
        for x in SPHERE_MINIMA
    ]
    rings = np.arange(1, math.floor(minima_px[-1]) + 1)
    near_minimum = np.min(np.abs(rings[:, None] - np.array(minima_px)[None]), 1) <= 1
    rel = np.abs(sim[rings] / ana[rings] - 1)
    assert rel[~near_minimum].max() < 0.02, f"worst ring {rings[~near_minimum][rel[~near_minimum].argmax()]}"
    found = [i for i in range(2, len(sim) - 1) if sim[i] < sim[i - 1] and sim[i] < sim[i + 1]][:3]
    assert len(found) == 3
    assert np.all(np.abs(np.array(found) - np.array(minima_px)) <= 1), (found, minima_px)


def test_sphere_profile_matches_the_analytic_form_factor() -> None:
    """Uniform sphere (closed-form volume) through the detector geometry, Ewald curvature included."""
    radius, fluence = 15.0, 1e12
    s = _settings(f"sphere:{radius}", beam={"fluence": fluence})
    image = PatternGenerator(s).chunk(0, 1).images[0]
    q, _, factor, _ = _reference_q(s)
    f0 = 430.0 * 4 / 3 * math.pi * radius**3
    expected = fluence * 1e-6 * R_E_NM**2 * (f0 * _sphere_shape(q * radius)) ** 2 * factor
    _check_sphere_profile(image, expected, s, radius)


def _lattice_sphere_cif(path: Path, radius_nm: float, spacing_nm: float) -> float:
    """A uniform sphere as carbon atoms on a fine cubic lattice, edge atoms weighted by the volume inside.

    Written as gzipped mmCIF (the file has more atoms than PDB's 99,999); returns the summed occupancy.
    """
    axis = np.arange(-radius_nm - spacing_nm, radius_nm + 2 * spacing_nm, spacing_nm)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    occ = np.round(np.clip(0.5 - (np.linalg.norm(pts, axis=1) - radius_nm) / spacing_nm, 0, 1), 4)
    pts, occ = pts[occ > 0] * 10, occ[occ > 0]
    fields = "group_PDB id type_symbol label_atom_id label_alt_id label_comp_id label_asym_id label_entity_id"
    fields += " label_seq_id pdbx_PDB_ins_code Cartn_x Cartn_y Cartn_z occupancy B_iso_or_equiv pdbx_formal_charge"
    fields += " auth_seq_id auth_asym_id pdbx_PDB_model_num"
    rows = [
        f"HETATM {i + 1} C C . SPH A 1 1 ? {x:.4f} {y:.4f} {z:.4f} {o:.4f} 0 ? 1 A 1"
        for i, ((x, y, z), o) in enumerate(zip(pts, occ, strict=True))
    ]
    text = "\n".join(["data_sphere", "loop_", *[f"_atom_site.{f}" for f in fields.split()], *rows, ""])
    path.write_bytes(gzip.compress(text.encode(), compresslevel=1))
    return float(occ.sum())


def test_sphere_profile_through_the_fft_volume(tmp_path: Path) -> None:
    """The same check for a sphere made of atoms: density -> FFT volume -> trilinear slices."""
    radius, fluence = 6.0, 1e12
    cif = tmp_path / "sphere.cif.gz"
    total = _lattice_sphere_cif(cif, radius, 0.15)
    s = _settings(str(cif), beam={"fluence": fluence})
    image = PatternGenerator(s).chunk(0, 1).images[0]
    q, _, factor, _ = _reference_q(s)
    f_carbon = np.vectorize(gemmi.Element("C").it92.calculate_sf)((q / (4 * math.pi * 10)) ** 2)
    expected = fluence * 1e-6 * R_E_NM**2 * (f_carbon * total * _sphere_shape(q * radius)) ** 2 * factor
    _check_sphere_profile(image, expected, s, radius)


def test_fft_volume_matches_the_direct_atomic_sum(shared_dir: Path) -> None:
    """F(q) = Σ f_j(q) exp(i q·r_j) summed over 2cex's atoms, against the interpolated FFT volume."""
    structure = load_structure(str(shared_dir / "data/pdb/2cex.pdb"))
    volume = make_volume(structure, 3.0, 8.0, torch.device("cpu"), 1.0)
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(3000, 3))
    q = dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * rng.uniform(0, 3.0, (3000, 1))
    exact = np.zeros(len(q), complex)
    for group in structure.groups:
        exact += group.form_factor(np.linalg.norm(q, axis=1)) * (np.exp(1j * q @ group.positions.T) @ group.weights)
    got = volume.amplitude(torch.from_numpy(q.astype(np.float32))).numpy()
    assert np.linalg.norm(np.abs(got) ** 2 - np.abs(exact) ** 2) / np.linalg.norm(np.abs(exact) ** 2) < 0.01


def test_friedel_symmetry_at_small_q(shared_dir: Path) -> None:
    """I(q) = I(-q) for a real density; the Ewald sphere breaks it only as q grows (q_z ≈ -q²/2k)."""
    s = _settings(str(shared_dir / "data/pdb/2cex.pdb"))
    images = PatternGenerator(s).chunk(0, 8).images
    mirrored = images[:, ::-1, ::-1]  # the pixel at -(x, y) about the central beam
    q, *_ = _reference_q(s)
    asym = np.abs(images - mirrored) / (images + mirrored)
    small, large = asym[:, (q > 0.05) & (q < 0.3)].mean(), asym[:, q > 2.0].mean()
    assert small < 0.01
    assert large > 5 * small


def test_mean_photons_over_1000_patterns_match_the_request() -> None:
    target = 1e4
    s = _settings("procedural:7", beam={"photons_per_pattern": target}, noise={"kind": "poisson"}, chunk=250)
    generator = PatternGenerator(s)
    batches = [generator.chunk(k, 250) for k in range(4)]
    totals = np.concatenate([b.images.reshape(len(b), -1).sum(1) for b in batches])
    assert len(totals) == 1000
    assert abs(totals.mean() / target - 1) < 0.02
    photons = np.concatenate([b.photons for b in batches])
    assert abs(photons.mean() / target - 1) < 0.02


def test_poisson_statistics_at_low_counts() -> None:
    """A sphere looks the same in every orientation, so each pixel is a fixed mean plus noise."""
    s = _settings(
        "sphere:12",
        beam={"photons_per_pattern": 1500},
        noise={"kind": "poisson"},
        detector={"shape": (24, 24), "beamstop_px": 0},
    )
    generator = PatternGenerator(s)
    images = np.concatenate([generator.chunk(k, 500).images for k in range(4)]).reshape(2000, -1)
    mean = generator.chunk(0, 1).photons  # noise-free photons of one pattern
    noise_free = PatternGenerator(s.model_copy(update={"noise": s.noise.model_copy(update={"kind": "none"})}))
    expected = noise_free.chunk(0, 1).images.reshape(-1)
    assert abs(images.sum(1).mean() / mean[0] - 1) < 0.01
    lit = expected > 0.05
    assert 0.05 < expected[lit].mean() < 5  # low counts: a few photons per pixel at most
    ratio = images.var(0)[lit] / images.mean(0)[lit]
    assert abs(np.median(ratio) - 1) < 0.05
    assert np.abs(images.mean(0)[lit] / expected[lit] - 1).mean() < 0.05


def test_two_touching_spheres_show_fringes_across_the_pair_axis() -> None:
    """Two spheres at ±R along x: I₂ = I₁ · 4 cos²(q_x R), fringes of period 2π / (2R) in q_x."""
    radius = 10.0
    s = _settings(f"sphere:{radius}", beam={"fluence": 1e12})
    generator = PatternGenerator(s)
    identity = np.zeros((2, 4, 4))
    identity[:, :, 0] = 1
    positions = np.zeros((2, 4, 3))
    positions[0, :2, 0] = [-radius, radius]
    counts, species, jitter = np.array([2, 1]), np.zeros((2, 4), int), np.ones(2)
    pair, single = generator.expected_intensity(counts, species, identity, positions, jitter).numpy()
    _, _, _, qx = _reference_q(s)
    lit = single.reshape(qx.shape) > single.max() * 1e-4
    fringes = 4 * np.cos(qx * radius) ** 2
    ratio = (pair / single).reshape(qx.shape)
    assert np.abs(ratio - fringes)[lit].max() < 0.01
    # The period read off the pattern: fringe maxima along the central row are 2π / (2R) apart in q_x.
    row = ratio[ratio.shape[0] // 2]
    peaks = [i for i in range(1, len(row) - 1) if row[i] >= row[i - 1] and row[i] > row[i + 1] and row[i] > 3]
    period = np.diff(qx[qx.shape[0] // 2, peaks]).mean()
    assert period == pytest.approx(2 * math.pi / (2 * radius), rel=0.03)


def test_touching_cluster_touches_without_overlap() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        radii = list(rng.uniform(2, 8, 4))
        pos = touching_cluster([lambda u, r=r: r for r in radii], rng)
        for i in range(1, 4):
            gaps = [np.linalg.norm(pos[i] - pos[j]) - radii[i] - radii[j] for j in range(4) if j != i]
            assert min(gaps) > -1e-6
            assert min(abs(g) for g in gaps[:i]) < 1e-6  # it touches one placed before it


def _pairs(structure: str, n: int = 150) -> tuple[PatternGenerator, np.ndarray, np.ndarray]:
    """Orientations (n, 2, 3, 3) and centres (n, 2, 3) of simulated pairs of `structure`."""
    from lcls_hitfinder.simulate.generate import rotation_matrices

    g = PatternGenerator(SimulateSettings(structures=[structure], particles={2: 1}, detector={"shape": (8, 8)}))
    batch = g.chunk(0, n)
    rots = rotation_matrices(batch.orientations[:, :2].reshape(-1, 4)).reshape(n, 2, 3, 3)
    return g, rots, batch.positions[:, :2].astype(np.float64)


def test_pairs_of_anisotropic_or_hollow_particles_touch_and_never_interpenetrate() -> None:
    """Particles touch where their shapes say, in their orientations: an elongated ellipsoid never reaches
    into its neighbour (a sphere of the same Rg did in a third of the pairs), hollow shells touch at their
    outer radius (not the larger radius of a sphere of the same Rg)."""
    axes = np.array([10.0, 5.0, 5.0])
    _, rots, centres = _pairs("ellipsoid:10,5,5")
    sphere = np.random.default_rng(0).normal(size=(4000, 3))
    surface = axes * sphere / np.linalg.norm(sphere, axis=1, keepdims=True)
    for (ra, rb), (ca, cb) in zip(rots, centres, strict=True):
        in_a = (surface @ rb.T + cb - ca) @ ra  # b's surface in a's frame: Rᵀ(lab - centre)
        assert (((in_a / axes) ** 2).sum(1) >= 1 - 1e-6).all()
    assert np.linalg.norm(centres[:, 0] - centres[:, 1], axis=1).min() < 10.5  # side by side too, not only end on
    _, _, shells = _pairs("coreshell:9,10,0")
    np.testing.assert_allclose(np.linalg.norm(shells[:, 0] - shells[:, 1], axis=1), 20.0, rtol=1e-6)  # float32


def test_pairs_of_bead_models_leave_a_residue_between_their_beads() -> None:
    """A pair of bead models stops where the planes normal to their axis that bound them, a margin beyond
    their outermost beads, meet: exactly that far apart, so never closer than two margins bead to bead."""
    from lcls_hitfinder.simulate.structures import load_structure
    from lcls_hitfinder.simulate.volume import CONTACT_MARGIN_NM

    beads = load_structure("procedural:5")._all[0]
    _, rots, centres = _pairs("procedural:5", 60)
    closest = []
    for (ra, rb), (ca, cb) in zip(rots, centres, strict=True):
        a, b = beads @ ra.T, beads @ rb.T  # about their centres, in the lab frame
        n = (cb - ca) / np.linalg.norm(cb - ca)
        reach = (a @ n).max() + (-(b @ n)).max() + 2 * CONTACT_MARGIN_NM
        assert np.linalg.norm(cb - ca) == pytest.approx(reach, rel=1e-5)  # positions are float32
        closest.append(cKDTree(a + ca).query(b + cb)[0].min())
    assert min(closest) >= 2 * CONTACT_MARGIN_NM - 1e-4


def _atomic_rg(path: Path) -> float:
    st = gemmi.read_structure(str(path))
    st.remove_waters()
    pos = np.array([a.pos.tolist() for r in st[0].all() for a in [r.atom]]) / 10
    z = np.array([r.atom.element.atomic_number * r.atom.occ for r in st[0].all()])
    centre = (pos * z[:, None]).sum(0) / z.sum()
    return float(np.sqrt((z * ((pos - centre) ** 2).sum(1)).sum() / z.sum()))


def test_2cex_guinier_radius_of_gyration(shared_dir: Path) -> None:
    """ln I(q) = ln I(0) - q² Rg² / 3 over q Rg < 1.1, from orientation-averaged simulated singles."""
    pdb = shared_dir / "data/pdb/2cex.pdb"
    s = _settings(str(pdb))
    images = np.concatenate([PatternGenerator(s).chunk(k, 100).images for k in range(3)]).mean(0)
    q, radius_px, factor, _ = _reference_q(s)
    profile, q_ring = _ring_profiles(images / factor, q, radius_px)
    rg_atoms = _atomic_rg(pdb)
    fit = (q_ring * rg_atoms > 0.2) & (q_ring * rg_atoms < 1.1)
    slope = np.polyfit(q_ring[fit] ** 2, np.log(profile[fit]), 1)[0]
    assert fit.sum() >= 5
    assert math.sqrt(-3 * slope) == pytest.approx(rg_atoms, rel=0.05)

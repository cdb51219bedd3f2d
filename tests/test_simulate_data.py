"""The simulator's dataset, detector and beam realism, and its structures (files, assemblies, built-ins)."""

from __future__ import annotations

import gzip
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import gemmi
import h5py
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from lcls_hitfinder.dataset import Dataset
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.simulate.generate import PatternGenerator, simulate_dataset
from lcls_hitfinder.simulate.settings import SimulateSettings
from lcls_hitfinder.simulate.structures import AtomModel, load_structure, procedural, symmetry_operators
from lcls_hitfinder.simulate.volume import BodyVolume


@pytest.fixture(autouse=True)
def _volume_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LCLS_HITFINDER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # not left to the tests of other modules


def _small(**kw: object) -> SimulateSettings:
    base: dict[str, object] = {"structures": ["sphere:8"], "detector": {"shape": (32, 32)}}
    base.update(kw)
    return SimulateSettings.model_validate(base)


@pytest.mark.parametrize("side", [128, 129])  # the beam between two rows, and on one
@pytest.mark.parametrize("gap", [1, 2, 3, 4])
def test_the_gap_is_exactly_gap_px_rows_through_the_beam(side: int, gap: int) -> None:
    from lcls_hitfinder.simulate.geometry import DetectorGeometry

    s = _small(detector={"shape": (side, side), "beamstop_px": 0, "gap_px": gap})
    rows = np.flatnonzero(~DetectorGeometry.from_settings(s.detector, s.beam).mask().all(axis=1))
    centre = (side - 1) / 2
    assert len(rows) == gap and rows.tolist() == list(range(rows[0], rows[0] + gap))
    assert abs(rows.mean() - centre) <= 0.5  # centred on the beam, to half a row


@pytest.mark.parametrize("side", [128, 129])
def test_no_beam_stop_masks_no_pixel_and_dead_lines_must_be_on_the_detector(side: int) -> None:
    from lcls_hitfinder.config import format_validation_error
    from lcls_hitfinder.simulate.geometry import DetectorGeometry

    s = _small(detector={"shape": (side, side), "beamstop_px": 0})
    assert DetectorGeometry.from_settings(s.detector, s.beam).mask().all()  # 129: the beam on a pixel's centre
    with pytest.raises(ValueError) as err:
        _small(detector={"shape": (16, 16), "dead_rows": [3, -1, 16]})
    message = format_validation_error(err.value, "x.toml")  # type: ignore[arg-type]
    assert message == "config error (x.toml): detector: dead_rows [-1, 16] are not on the detector (0 to 15)"


def test_gaussian_sigma_without_its_noise_kind_is_refused() -> None:
    with pytest.raises(ValueError, match=r"gaussian_sigma is added only with noise.kind poisson\+gaussian"):
        _small(noise={"kind": "poisson", "gaussian_sigma": 0.3})


def test_a_damaged_cached_volume_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LCLS_HITFINDER_CACHE", str(tmp_path))
    s = _small(structures=["procedural:3,5,C1"])
    first = PatternGenerator(s, seed=1).generate(4).images
    for damage in (lambda b: b[:1000], lambda b: b""):  # a truncated file, an empty one
        cached = list(tmp_path.rglob("*.npz"))
        assert cached  # the volume was cached where the test damages it
        for path in cached:
            path.write_bytes(damage(path.read_bytes()))
        np.testing.assert_array_equal(PatternGenerator(s, seed=1).generate(4).images, first)


def test_dataset_layout_labels_mask_and_attributes(tmp_path: Path) -> None:
    s = _small(
        structures=["sphere:8", "procedural:6"],
        seed=5,
        chunk=16,
        detector={"shape": (48, 40), "beamstop_px": 3, "gap_px": 2, "dead_rows": [5], "dead_columns": [7]},
        noise={"kind": "poisson+gaussian", "gaussian_sigma": 0.3},
    )
    out = simulate_dataset(s, tmp_path / "d.h5", n=40, progress=False)
    with Dataset(out) as ds:
        assert len(ds) == 40 and ds.shape == (48, 40)
        mask = ds.mask
        assert not mask[23, 19] and not mask[5].any() and not mask[:, 7].any() and not mask[23].any()
        assert mask.sum() > 0.8 * mask.size
        # the beam stop: the disc of radius 3 about the beam centre (23.5, 19.5), and no more
        yy, xx = np.mgrid[:48, :40]
        r2 = (yy - 23.5) ** 2 + (xx - 19.5) ** 2
        assert not mask[r2 <= 9].any()
        assert mask[(r2 > 9) & (r2 <= 25) & (yy != 23) & (yy != 24)].all()  # the next ring, off the gap's rows
        images = ds.images()
        assert np.all(images[:, ~mask] == 0)
        counts = ds.n_particles
        # a blank holds the read noise alone, in photons: sd 0.3 over its good pixels
        assert 0.28 < images[counts == 0][:, mask].std() < 0.32
        assert set(counts) <= {0, 1, 2, 3, 4} and len(set(counts)) >= 4
        names, photons, quats = ds.structure, ds.photons, ds.read(slice(None)).orientations
        assert all(name == "" for name in names[counts == 0])
        assert set(names[counts > 0]) <= {"sphere:8", "procedural:6"}
        assert np.all(photons[counts == 0] == 0) and np.all(photons[counts > 0] > 0)
        norms = np.linalg.norm(quats, axis=2)
        present = np.arange(4)[None, :] < counts[:, None]
        assert np.allclose(norms[present], 1, atol=1e-5) and np.all(norms[~present] == 0)
        positions = ds.positions
        assert positions is not None and np.all(positions[~present] == 0)
        centred = np.array([positions[i, : counts[i]].mean(0) for i in range(40) if counts[i]])
        assert np.allclose(centred, 0, atol=1e-4)
        sphere_pairs = (counts == 2) & (names == "sphere:8")
        gaps = np.linalg.norm(positions[sphere_pairs, 1] - positions[sphere_pairs, 0], axis=1)
        assert sphere_pairs.any() and np.allclose(gaps, 16.0, rtol=1e-4)  # two 8-nm spheres touching
        a = ds.attrs
        assert a["photon_energy_ev"] == 1700.0 and a["distance_m"] == 0.15 and a["pixel_size_m"] == 600e-6
        assert a["beam_center"] == [23.5, 19.5] and a["seed"] == 5 and a["simulator_version"]
        assert a["noise"]["kind"] == "poisson+gaussian" and len(a["fluence_ph_per_um2"]) == 2
        assert a["simulate_settings"]["structures"] == ["sphere:8", "procedural:6"]
    with h5py.File(out) as f:
        assert f["images"].compression == "gzip" and f["images"].chunks is not None


def test_same_dataset_with_one_or_two_workers(tmp_path: Path) -> None:
    s = _small(structures=["procedural:6"], chunk=8, seed=11)
    one = simulate_dataset(s, tmp_path / "one.h5", n=30, workers=1, progress=False)
    two = simulate_dataset(s, tmp_path / "two.h5", n=30, workers=2, progress=False)
    with Dataset(one) as a, Dataset(two) as b:
        assert np.array_equal(a.images(), b.images()) and np.array_equal(a.n_particles, b.n_particles)
    generator = PatternGenerator(s)
    stream = np.concatenate([generator.generate(8).images for _ in range(2)])
    with Dataset(one) as a:
        assert np.array_equal(stream, a.images(slice(0, 16)))


def test_adu_output_gain_offset_and_units(tmp_path: Path) -> None:
    s = _small(noise={"kind": "poisson", "adu_gain": 10.0, "adu_offset": 100.0}, particles={1: 1})
    out = simulate_dataset(s, tmp_path / "adu.h5", n=4, progress=False)
    with Dataset(out) as ds, h5py.File(out) as f:
        assert f["images"].attrs["units"] == "adu"
        photons = (ds.images()[:, ds.mask] - 100.0) / 10.0
        # what show, evaluate's examples and training see: the file's own calibration applied
        np.testing.assert_allclose(ds.photon_images()[:, ds.mask], np.clip(photons, 0, None), atol=1e-4)
    assert np.allclose(photons, np.rint(photons), atol=1e-3) and photons.min() >= 0 and photons.max() > 0


def test_background_flat_and_radial() -> None:
    flat = PatternGenerator(
        _small(particles={0: 1}, noise={"kind": "none"}, background={"kind": "flat", "photons_per_pixel": 0.2})
    )
    batch = flat.chunk(0, 2)
    assert np.allclose(batch.images[:, flat.mask], 0.2) and np.all(batch.photons == 0)
    radial = PatternGenerator(
        _small(particles={0: 1}, noise={"kind": "none"}, background={"kind": "radial", "photons_per_pixel": 1.0})
    )
    image, q = radial.chunk(0, 1).images[0], radial.geometry.q_abs()
    good = radial.mask
    assert np.corrcoef(q[good], image[good])[0, 1] < -0.9


def test_saturation_and_fluence_jitter() -> None:
    clipped = PatternGenerator(_small(particles={1: 1}, detector={"shape": (32, 32), "saturation": 5.0}))
    assert clipped.chunk(0, 4).images.max() == 5.0
    jitter = PatternGenerator(_small(particles={1: 1}, noise={"kind": "none"}, beam={"fluence_jitter": 0.3}))
    photons = np.concatenate([jitter.chunk(k, 200).photons for k in range(5)])
    assert photons.std() / photons.mean() == pytest.approx(0.3, rel=0.15)
    assert photons.mean() == pytest.approx(1e4, rel=0.05)


def test_mixed_species_clusters() -> None:
    g = PatternGenerator(_small(structures=["sphere:8", "sphere:5"], particles={4: 1}, mixed_species=True))
    names = g.chunk(0, 20).structure
    assert any("+" in name for name in names)


def test_a_mixed_cluster_is_lit_at_one_fluence() -> None:
    """With photons_per_pattern each structure has its own fluence (so its singles get the photons asked for),
    but the particles of one shot all see that of its first particle, as with an explicit `fluence`."""
    from lcls_hitfinder.simulate.generate import R_E_NM

    g = PatternGenerator(_small(structures=["sphere:5", "sphere:15"], mixed_species=True))
    assert g.scales[0] / g.scales[1] > 10  # the small sphere needs a far brighter beam for the same photons
    fluence = g.scales[0] / (1e-6 * R_E_NM**2)
    fixed = PatternGenerator(_small(structures=["sphere:5", "sphere:15"], beam={"fluence": fluence}))
    quats = np.zeros((1, 4, 4))
    quats[0, :2, 0] = 1
    positions = np.zeros((1, 4, 3))
    positions[0, 1, 0] = 20.0  # touching: 5 + 15 nm
    args = (np.array([2]), np.array([[0, 1, 0, 0]]), quats, positions, np.ones(1))
    np.testing.assert_allclose(g.expected_intensity(*args), fixed.expected_intensity(*args), rtol=1e-4)


def test_gzipped_pdb_and_biological_assembly(tmp_path: Path, shared_dir: Path) -> None:
    pdb = shared_dir / "data/pdb/2cex.pdb"
    plain = load_structure(str(pdb))
    zipped = tmp_path / "2cex.pdb.gz"
    zipped.write_bytes(gzip.compress(pdb.read_bytes()))
    assert isinstance(plain, AtomModel)
    assert load_structure(str(zipped)).electrons == pytest.approx(plain.electrons)
    st = gemmi.read_structure(str(pdb))
    assembly = gemmi.Assembly("1")
    gen = gemmi.Assembly.Gen()
    gen.chains = [c.name for c in st[0]]
    for shift in (0.0, 60.0):
        op = gemmi.Assembly.Operator()
        op.transform = gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(shift, 0, 0))
        gen.operators.append(op)
    assembly.generators.append(gen)
    st.assemblies.append(assembly)
    st.setup_entities()
    cif = tmp_path / "2cex_dimer.cif"
    st.make_mmcif_document().write_file(str(cif))
    dimer = load_structure(f"{cif}@1")
    assert isinstance(dimer, AtomModel)
    assert dimer.electrons == pytest.approx(2 * plain.electrons)
    assert dimer.rg_nm**2 == pytest.approx(plain.rg_nm**2 + 3.0**2, rel=1e-3)  # copies 6 nm apart
    with pytest.raises(UserError, match="no assembly '7'"):
        load_structure(f"{cif}@7")


def test_bad_structures_are_user_errors(tmp_path: Path, shared_dir: Path) -> None:
    lines = [x for x in (shared_dir / "data/pdb/2cex.pdb").read_text().splitlines() if x.startswith("ATOM")][:5]
    bad = tmp_path / "bad.pdb"
    bad.write_text("\n".join([lines[0][:76] + "XX" + lines[0][78:], *lines[1:], "END"]))
    with pytest.raises(UserError, match="unknown element"):
        load_structure(str(bad))
    shutil.copy(bad, tmp_path / "x.pdb")
    for spec, match in [
        (str(tmp_path / "missing.pdb"), "cannot read"),
        ("sphere:-3", "positive"),
        ("ellipsoid:1,2", "expected 3"),
        ("coreshell:5,4", "smaller"),
        ("procedural:1,10,Q7", "symmetry"),
        ("torus:3", "not one of"),
    ]:
        with pytest.raises(UserError, match=match):
            load_structure(spec)


def test_procedural_family_is_distinct_compact_and_symmetric() -> None:
    models = [procedural(seed) for seed in range(12)]
    diameters = [2 * m.radius_nm for m in models]
    assert min(diameters) > 4.5 and max(diameters) < 23
    assert len({round(m.rg_nm, 3) for m in models}) == 12
    for m in models:
        sphere_rg = math.sqrt(3 / 5) * m.radius_nm
        assert 0.55 * sphere_rg < m.rg_nm < 1.05 * sphere_rg  # compact, not a string of beads
    model = procedural(3, 10.0, "D3")
    beads = model.groups[0].positions
    tree = cKDTree(beads)
    for op in symmetry_operators("D3"):
        assert tree.query(beads @ op.T)[0].max() < 1e-6
    assert procedural(3, 10.0, "D3").key == model.key and procedural(4, 10.0, "D3").key != model.key


def test_uniform_bodies_agree_with_the_sphere() -> None:
    q = torch.from_numpy(np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32))
    sphere = BodyVolume(load_structure("sphere:5"))  # type: ignore[arg-type]
    same = [BodyVolume(load_structure(s)) for s in ("ellipsoid:5,5,5", "coreshell:3,5,1")]  # type: ignore[arg-type]
    for body in same:
        assert torch.allclose(body.amplitude(q).abs(), sphere.amplitude(q).abs(), rtol=1e-4, atol=1e-2)
    prolate = BodyVolume(load_structure("ellipsoid:3,3,9"))  # type: ignore[arg-type]
    along_x, along_z = prolate.amplitude(torch.tensor([[0.5, 0, 0], [0, 0, 0.5]])).abs()
    assert along_z < along_x
    shell = load_structure("coreshell:4,5,0.2")
    assert shell.rg_nm > load_structure("sphere:5").rg_nm


def test_a_pr772_like_capsid_is_built_at_residue_density() -> None:
    """Heavier beads than residues put a granular floor and lattice peaks at high q: up to R = 35 nm each bead
    is one residue (weight 1 in the shell, 0.8 in the core), one per 0.135 nm³ of the icosahedron."""
    capsid = load_structure("capsid:35")
    assert isinstance(capsid, AtomModel)
    weights = capsid.groups[0].weights
    assert weights.max() == pytest.approx(1.0) and weights.min() == pytest.approx(0.8)  # shell, core
    edge = 4 * 35 / np.sqrt(10 + 2 * np.sqrt(5))  # of the icosahedron of circumradius 35 nm
    volume = 5 / 12 * (3 + np.sqrt(5)) * edge**3
    assert len(weights) == pytest.approx(volume / 0.135, rel=0.01)


def test_capsid_is_an_icosahedral_shell_around_a_lighter_core() -> None:
    capsid = load_structure("capsid:10")
    assert isinstance(capsid, AtomModel)
    assert capsid.radius_nm == pytest.approx(10, rel=0.05)
    beads, weights = capsid.groups[0].positions, capsid.groups[0].weights
    r = np.linalg.norm(beads, axis=1)
    assert weights[r > 8.5].mean() > weights[r < 5].mean()
    # Icosahedral: isotropic second moments, and faceted (edge midpoints on the 2-fold x axis at 0.851 R).
    moments = np.linalg.eigvalsh((beads * weights[:, None]).T @ beads)
    assert moments.max() / moments.min() < 1.03
    assert np.abs(beads[:, 0]).max() == pytest.approx(0.851 * capsid.radius_nm, rel=0.04)


def test_show_draws_a_dataset_in_adu_in_photons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lcls_hitfinder import plots
    from lcls_hitfinder.cli import app

    s = _small(noise={"kind": "poisson", "adu_gain": 10.0, "adu_offset": 100.0}, particles={0: 1})
    out = simulate_dataset(s, tmp_path / "adu.h5", n=2, progress=False)
    drawn: list[np.ndarray] = []
    monkeypatch.setattr(plots, "pattern_grid", lambda images, *a, **k: drawn.extend(images))
    result = CliRunner().invoke(app, ["show", str(out), "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert len(drawn) == 2 and all(float(d.max()) == 0.0 for d in drawn)  # blanks: no photon, not the pedestal


def test_show_titles_picked_events_by_the_label_judged_and_their_measured_photons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bank pick` stores a multi-hit judged by eye as 2 particles and the photons it measured: `show` drew a
    4-hit so picked as "2 particles", its photons as if expected before noise."""
    from typer.testing import CliRunner

    from lcls_hitfinder import plots
    from lcls_hitfinder.cli import app
    from lcls_hitfinder.dataset import Dataset, DatasetWriter

    s = _small(particles={1: 1, 2: 1})
    out = simulate_dataset(s, tmp_path / "sim.h5", n=4, progress=False)
    with Dataset(out) as d:
        batch = d.read(slice(0, 4))
        mask = d.mask
    picked = tmp_path / "picked.h5"
    with DatasetWriter(picked, mask.shape, mask, {"picked_from": "h5:run.cxi", "calibration": {}}) as w:
        w.append(batch)
    titles: list[str] = []
    monkeypatch.setattr(plots, "pattern_grid", lambda images, t, *a, **k: titles.extend(t))
    for path in (out, picked):
        result = CliRunner().invoke(app, ["show", str(path), "--out", str(tmp_path / "s.png"), "--n", "4"])
        assert result.exit_code == 0, result.output
    simulated, judged = titles[:4], titles[4:]
    assert all(t.split(" · ")[0] in ("1 particle", "2 particles") for t in simulated), simulated
    assert all(t.split(" · ")[0] in ("single", "multi") and " ph measured" in t for t in judged), judged


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("procedural:1,0", "structure procedural:1,0: sizes must be positive"),  # the spec given, not a part
        ("coreshell:5,10,-1", "structure coreshell:5,10,-1: sizes must be positive, densities not negative"),
        ("ellipsoid:5,inf,3", "structure ellipsoid:5,inf,3: parameters must be finite"),
        ("sphere:1,2", "structure sphere:1,2: expected 1 number, got 2"),
        ("coreshell:5", "structure coreshell:5: expected 2 to 3 numbers, got 1"),
        ("procedural:1,,", "structure procedural:1,,: expected 1 number, got 0"),
        ("sphere:1,,2", "structure sphere:1,,2: parameters must be numbers, comma-separated, none empty"),
    ],
)
def test_bad_structure_numbers_name_the_spec(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        load_structure(spec)


def test_a_hollow_core_shell_is_a_structure() -> None:
    assert load_structure("coreshell:5,10,0").params == (5.0, 10.0, 0.0)  # RHO is a density ratio: 0 is a hollow shell


def test_show_draws_a_cxi_file_of_raw_panels_as_the_service_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames spread over the file, in photons with the config's calibration, through the CXI mask, the two
    panels tiled one above the other; without the calibration the raw ADU are said to be detector units."""
    from typer.testing import CliRunner

    from lcls_hitfinder import plots
    from lcls_hitfinder.cli import app

    photons = np.random.default_rng(3).poisson(0.3, (7, 2, 64, 128)).astype(np.float32)  # sparse, as hits are
    bad = np.zeros((2, 64, 128), np.uint8)
    bad[1, 5, 7] = 1  # CXI: non-zero = bad
    path = tmp_path / "run.cxi"
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = (100 + 10 * photons).astype(np.uint16)
        f["/entry_1/data_1/mask"] = bad
    config = tmp_path / "node.toml"
    config.write_text("[serve.calibration]\ngain = 10.0\noffset = 100.0\n")
    drawn: list[tuple[list[np.ndarray], list[str]]] = []
    monkeypatch.setattr(plots, "pattern_grid", lambda images, titles, *a, **k: drawn.append((images, titles)))
    args = ["show", str(path), "--n", "3", "--out", str(tmp_path / "s.png")]
    result = CliRunner().invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    images, titles = drawn[0]
    expected = photons[[0, 3, 6]].reshape(3, 128, 128)  # panel 0 above panel 1
    expected[:, 64 + 5, 7] = 0.0
    np.testing.assert_allclose(np.stack(images), expected)
    assert titles == [f"frame #{i} · {expected[k].sum():.3g} ph" for k, i in enumerate((0, 3, 6))]
    raw = CliRunner().invoke(app, args)
    assert raw.exit_code == 0, raw.output
    assert "warning: 3 of the 3 frames shown of" in raw.output and "detector units, not photons" in raw.output


def test_show_says_which_cxi_frames_serve_calls_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lcls_hitfinder import plots
    from lcls_hitfinder.cli import app

    photons = np.random.default_rng(4).poisson(0.3, (4, 128, 128)).astype(np.float32)
    photons[2, 10, 10] = np.nan
    path = tmp_path / "photons.cxi"
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = photons
    drawn: list[np.ndarray] = []
    monkeypatch.setattr(plots, "pattern_grid", lambda images, *a, **k: drawn.extend(images))
    result = CliRunner().invoke(app, ["show", str(path), "--first", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert f"warning: 1 of the 4 frames shown of {path} hold NaN or Inf pixels" in result.output
    assert "detector units" not in result.output
    assert drawn[2][10, 10] == 0.0 and np.isfinite(np.stack(drawn)).all()

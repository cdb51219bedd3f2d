"""The real `lcls-hitfinder simulate` and `show` commands in a subprocess: output files and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcls_hitfinder.dataset import Dataset


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LCLS_HITFINDER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "lcls-hitfinder"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_simulate_with_config_and_flags_then_show(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text('[simulate]\nstructures = ["sphere:9"]\nseed = 3\n[simulate.detector]\nshape = [40, 40]\n')
    out = tmp_path / "d.h5"
    done = _run(
        "simulate",
        "--config",
        str(config),
        "--out",
        str(out),
        "--n",
        "12",
        "--particles",
        "1:3,2:1",
        "--photons-per-pattern",
        "2000",
        "--noise",
        "poisson+gaussian",
        "--gaussian-sigma",
        "0.2",
        "--beamstop-px",
        "2",
        cache=tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    (result,) = done.stdout.strip().splitlines()  # the result alone on stdout: progress goes to stderr
    assert result.startswith("wrote 12 patterns") and result.endswith(str(out))
    with Dataset(out) as ds:
        assert len(ds) == 12 and ds.shape == (40, 40) and set(ds.n_particles) <= {1, 2}
        assert ds.attrs["seed"] == 3 and ds.attrs["noise"]["gaussian_sigma"] == 0.2
        assert set(ds.structure) == {"sphere:9"}
    png = tmp_path / "grid.png"
    shown = _run("show", str(out), "--out", str(png), "--n", "6", cache=tmp_path / "cache")
    assert shown.returncode == 0, shown.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--structure", "BAD_ELEMENT"], "unknown element"),
        (["--structure", "/no/such/file.pdb"], "cannot read structure"),
        (["--structure", "UNREADABLE"], "cannot parse structure"),
        (["--structure", "sphere:-5"], "sizes must be positive"),
        (["--pixel-size-m", "-1e-4"], "pixel_size_m"),
        (["--shape", "200000,200000"], "more than this machine"),
        (["--particles", "1,9"], "particle counts must be 0 to 4"),
        (["--noise", "poisson+gaussian"], "gaussian_sigma"),
        (["--structure", "EINSTEINIUM"], "no IT92 scattering factor for element 'Es'"),
        (["--structure", "ZERO_OCCUPANCY"], "holds no scattering matter"),
        (["--structure", "procedural:1,2"], "structure procedural:1,2,D2 holds no scattering matter"),
        (["--structure", "capsid:0.1"], "structure capsid:0.1 holds no scattering matter"),
        (["--particles", "1:1e308,2:1e308"], "particle weights must be >= 0 with a positive, finite sum"),
        (["--seed", "100000000000000000000000"], "seed"),
        (["--photons-per-pattern", "1e21"], "photons_per_pattern"),
        # units slipped: keV for eV, mm for m, µm for m (each wrote a file of another experiment)
        (["--photon-energy-ev", "1.7"], "photon_energy_ev: Input should be greater than or equal to 100"),
        (["--distance-m", "150"], "distance_m: Input should be less than or equal to 100"),
        (["--pixel-size-m", "75"], "pixel_size_m: Input should be less than or equal to 0.01"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(
    tmp_path: Path, shared_dir: Path, args: list[str], message: str
) -> None:
    if "BAD_ELEMENT" in args:
        atoms = [x for x in (shared_dir / "data/pdb/2cex.pdb").read_text().splitlines() if x.startswith("ATOM")][:3]
        bad = tmp_path / "bad.pdb"
        bad.write_text("\n".join([atoms[0][:76] + "Qq" + atoms[0][78:], *atoms[1:], "END"]))
        args = ["--structure", str(bad)]
    if "EINSTEINIUM" in args or "ZERO_OCCUPANCY" in args:
        atoms = [x for x in (shared_dir / "data/pdb/2cex.pdb").read_text().splitlines() if x.startswith("ATOM")][:3]
        if "EINSTEINIUM" in args:
            atoms[0] = atoms[0][:76] + "ES" + atoms[0][78:]
        else:
            atoms = [a[:54] + "  0.00" + a[60:] for a in atoms]
        odd = tmp_path / "odd.pdb"
        odd.write_text("\n".join([*atoms, "END"]))
        args = ["--structure", str(odd)]
    if "UNREADABLE" in args:
        junk = tmp_path / "junk.cif"
        junk.write_text("data_x\nloop_\n_atom_site.id\n'unterminated\n")
        args = ["--structure", str(junk)]
    done = _run("simulate", "--out", str(tmp_path / "x.h5"), "--n", "2", *args, cache=tmp_path / "cache")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "x.h5").exists()


def test_a_fluence_too_bright_to_draw_is_one_error(tmp_path: Path) -> None:
    """Photons a pixel beyond what numpy can draw (a fluence typed with the wrong exponent): an error that says
    what to lower, not numpy's "lam value too large"."""
    args = ["--structure", "sphere:10", "--particles", "1", "--fluence", "1e40", "--noise", "poisson"]
    done = _run("simulate", "--out", str(tmp_path / "x.h5"), "--n", "2", *args, cache=tmp_path / "cache")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("lcls-hitfinder: error:")]
    assert len(errors) == 1 and "photons expected in one pixel, too many to draw" in errors[0], done.stderr
    assert not (tmp_path / "x.h5").exists()


def test_building_a_volume_is_said_with_its_size_once(tmp_path: Path) -> None:
    """The bar sat at 0 for seconds while a volume of up to a gigabyte was built into the cache, unsaid."""
    args = ["simulate", "--structure", "procedural:3", "--n", "2", "--out"]
    first = _run(*args, str(tmp_path / "a.h5"), cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    said = " ".join(first.stderr.split())
    assert "structure procedural:3: building its Fourier volume (" in said
    assert f"MB), cached in {tmp_path / 'cache' / 'volumes'}" in said
    again = _run(*args, str(tmp_path / "b.h5"), cache=tmp_path / "cache")
    assert again.returncode == 0 and "building its Fourier volume" not in again.stderr, again.stderr

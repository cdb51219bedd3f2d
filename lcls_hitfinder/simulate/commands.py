"""CLI subcommands of this stage: `simulate` (write a dataset) and `show` (a grid of patterns as PNG).

Heavy imports (torch, matplotlib) happen inside the commands so `--help` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import label_of_count
from lcls_hitfinder.paths import apart, existing, output_file

if TYPE_CHECKING:
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.frame_file import FrameFile
    from lcls_hitfinder.preprocess import PhotonCalibration


def parse_particles(text: str) -> dict[int, float]:
    """'0,1,2,3,4' (equal weights) or '1:0.6,2:0.4' (weighted), mixed forms allowed."""
    out: dict[int, float] = {}
    for part in text.split(","):
        count, _, weight = part.strip().partition(":")
        try:
            out[int(count)] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--particles {text!r}: expected counts like 0,1,2,3,4 or 1:0.6,2:0.4") from None
    return out


def parse_shape(text: str) -> tuple[int, int]:
    """'H,W' or 'HxW' in pixels."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--shape {text!r}: expected H,W in pixels, e.g. 128,128") from None
    return h, w


def simulate(
    out: Annotated[Path, typer.Option("--out", "-o", help="the HDF5 dataset to write")],
    structure: Annotated[
        list[str] | None,
        typer.Option(
            "--structure",
            "-s",
            help="PDB/mmCIF file (FILE@ASSEMBLY), sphere:R, coreshell:RC,R[,RHO], ellipsoid:A,B,C, capsid:R, "
            "procedural:SEED[,D[,SYM]] (nm); repeat for several",
        ),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="number of patterns")] = None,
    particles: Annotated[
        str | None, typer.Option(help="particle counts to draw, e.g. 0,1,2,3,4 or 1:0.6,2:0.2,3:0.1,4:0.1")
    ] = None,
    photon_energy_ev: Annotated[float | None, typer.Option(help="photon energy, eV")] = None,
    distance_m: Annotated[float | None, typer.Option(help="detector distance, m")] = None,
    pixel_size_m: Annotated[float | None, typer.Option(help="pixel size, m")] = None,
    shape: Annotated[str | None, typer.Option(help="detector pixels H,W")] = None,
    photons_per_pattern: Annotated[
        float | None, typer.Option(help="mean photons of a single hit (sets the fluence per structure)")
    ] = None,
    fluence: Annotated[
        float | None, typer.Option(help="fluence in photons/µm² (instead of photons per pattern)")
    ] = None,
    fluence_jitter: Annotated[float | None, typer.Option(help="relative shot-to-shot fluence spread")] = None,
    noise: Annotated[str | None, typer.Option(help="none, poisson or poisson+gaussian")] = None,
    gaussian_sigma: Annotated[
        float | None, typer.Option(help="Gaussian read noise sd, in photons (ADU with noise.adu_gain)")
    ] = None,
    beamstop_px: Annotated[float | None, typer.Option(help="beam-stop radius, pixels")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    workers: Annotated[int | None, typer.Option(help="parallel processes")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="config file; its \\[simulate] section is the base")
    ] = None,
) -> None:
    """Simulate labelled single-particle diffraction patterns (0-4 particles) into an HDF5 dataset."""

    from lcls_hitfinder.config import load_config
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.simulate.generate import simulate_dataset

    if photons_per_pattern is not None and fluence is not None:
        raise UserError("give --photons-per-pattern or --fluence, not both")
    output_file(out, "dataset", {"--config": config})
    overrides: dict[str, Any] = {
        "simulate.structures": structure or None,
        "simulate.n": n,
        "simulate.particles": parse_particles(particles) if particles else None,
        "simulate.beam.photon_energy_ev": photon_energy_ev,
        "simulate.detector.distance_m": distance_m,
        "simulate.detector.pixel_size_m": pixel_size_m,
        "simulate.detector.shape": parse_shape(shape) if shape else None,
        "simulate.beam.photons_per_pattern": photons_per_pattern,
        "simulate.beam.fluence": fluence,
        "simulate.beam.fluence_jitter": fluence_jitter,
        "simulate.noise.kind": noise,
        "simulate.noise.gaussian_sigma": gaussian_sigma,
        "simulate.detector.beamstop_px": beamstop_px,
        "simulate.seed": seed,
        "simulate.workers": workers,
        "simulate.device": device,
    }
    settings = load_config(config, overrides).simulate
    if photons_per_pattern is not None:
        settings.beam.fluence = None
    simulate_dataset(settings, out)
    with Dataset(out) as ds:
        total, counts = len(ds), {k: int((ds.n_particles == k).sum()) for k in range(5)}
    print(f"wrote {total} patterns ({', '.join(f'{v} x {k}' for k, v in counts.items() if v)} particles) to {out}")


def _spread_over_counts(n_particles: np.ndarray, n: int) -> np.ndarray:
    """Up to n indices taking turns over the particle counts present, ordered by count then index."""
    groups: list[list[int]] = [np.flatnonzero(n_particles == k).tolist() for k in np.unique(n_particles)]
    picks: list[int] = []
    while len(picks) < min(n, len(n_particles)):
        for group in groups:
            if group and len(picks) < n:
                picks.append(group.pop(0))
    return np.array(sorted(picks, key=lambda i: (n_particles[i], i)), dtype=np.int64)


def show(
    data: Annotated[
        list[Path], typer.Argument(help="one or more lcls-hitfinder datasets or CXI files (HDF5), a row group each")
    ],
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: the first DATA with .png)")] = None,
    n: Annotated[int, typer.Option("--n", help="patterns per file")] = 12,
    per_count: Annotated[
        bool,
        typer.Option(
            "--per-count/--first", help="spread the picks over particle counts (CXI: over the file), or the first n"
        ),
    ] = True,
    ncols: Annotated[int | None, typer.Option(min=1, help="columns of the grid (default: n, at most 6)")] = None,
    linear: Annotated[bool, typer.Option("--linear", help="linear colour scale instead of log")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="the service's config: its \\[serve.calibration] turns a CXI file's raw ADU into photons "
            "(a dataset records its own units)",
        ),
    ] = None,
) -> None:
    """Render a labelled grid of patterns (log scale, masked pixels black) to PNG. CXI frames are shown as the
    service sees them: in photons, through their mask, panels tiled."""
    from lcls_hitfinder.config import load_config
    from lcls_hitfinder.frame_file import FrameFile
    from lcls_hitfinder.plots import pattern_grid

    if n < 1:
        raise UserError("--n must be at least 1")
    for path in data:
        existing(path, "dataset")
    target = out or data[0].with_suffix(".png")
    output_file(target, "PNG", {"--config": config}, suffix=".png")
    for path in data:
        apart(target, path, f"--out {target} is the dataset {path}, which it would overwrite")
    calibration = load_config(config).serve.configured_calibration
    images: list[np.ndarray] = []
    titles: list[str] = []
    for path in data:
        with FrameFile(path, str(path)) as frames:
            if frames.dataset is not None:
                picked = _dataset_patterns(frames.dataset, n, per_count)
            else:
                picked = _cxi_patterns(frames, n, per_count, calibration)
        images += picked[0]
        titles += picked[1]
    pattern_grid(images, titles, target, ncols=ncols or min(n, 6), log=not linear)
    print(target)


def _dataset_patterns(ds: Dataset, n: int, per_count: bool) -> tuple[list[np.ndarray], list[str]]:
    """A dataset's patterns in photons, titled with what made them."""
    index = _spread_over_counts(ds.n_particles, n) if per_count else np.arange(min(n, len(ds)))
    structures, photons, counts = ds.structure[index], ds.photons[index], ds.n_particles[index]
    order = np.argsort(index)  # h5py reads increasing indices only
    images = list((ds.photon_images(index[order]) * ds.mask)[np.argsort(order)])
    picked = "picked_from" in ds.attrs  # `bank pick`'s: a label judged by eye (multi stored as 2), photons measured
    titles = []
    for i, k, s, p in zip(index, counts, structures, photons, strict=True):
        what = label_of_count(k).text if picked else f"{k} particle{'s' if k != 1 else ''}"
        titles.append(f"{what} · {p:.2g} ph{' measured' if picked else ''}\n{s or 'blank'} #{i}")
    return images, titles


def _cxi_patterns(
    frames: FrameFile, n: int, spread: bool, calibration: PhotonCalibration | None
) -> tuple[list[np.ndarray], list[str]]:
    """A CXI file's frames in photons through the service's own preprocessing (calibration, mask, panels tiled),
    evenly spread over the file or its first n; said when they look like raw ADU taken as photons, and when they
    hold NaN or Inf pixels (shown dark here, decided `error` by the service)."""
    import torch

    from lcls_hitfinder.preprocess import PEDESTAL_LEFT, Preprocessor, PreprocessSettings, all_finite

    count = min(n, len(frames))
    index = np.unique(np.linspace(0, len(frames) - 1, count).round().astype(int)) if spread else np.arange(count)
    pre = Preprocessor(PreprocessSettings(), frames.mask, frames.shape, calibration)
    raw = torch.from_numpy(np.stack([frames.images(slice(i, i + 1))[0] for i in index]))
    finite = all_finite(raw) if raw.is_floating_point() else torch.ones(len(raw), dtype=torch.bool)
    if not bool(finite.all()):
        typer.echo(
            f"warning: {int((~finite).sum())} of the {len(index)} frames shown of {frames.path} hold NaN or Inf "
            "pixels (shown dark): serve and classify decide such frames `error`",
            err=True,
        )
    photons = torch.nan_to_num(pre.photons(raw), nan=0.0, posinf=0.0, neginf=0.0)
    pedestal = int(pre.pedestal_left(pre.binned(photons)).sum())
    if pedestal:
        typer.echo(
            f"warning: {pedestal} of the {len(index)} frames shown of {frames.path} look like {PEDESTAL_LEFT}: "
            "give the detector's gain and offset in --config's [serve.calibration]",
            err=True,
        )
    titles = [f"frame #{i} · {p:.3g} ph" for i, p in zip(index, photons.sum(dim=(1, 2)).tolist(), strict=True)]
    return list(photons.numpy()), titles


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to `app`."""
    app.command()(simulate)
    app.command()(show)

"""CLI subcommands of the psana side of the service: `xtc2` (a dataset as an XTC2 run) and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.paths import existing, output_dir, output_file


def xtc2(
    data: Annotated[Path, typer.Argument(help="a simulated dataset (lcls-hitfinder simulate)")],
    out: Annotated[Path, typer.Option(help="the XTC2 file to write")],
    det: Annotated[str, typer.Option(help="detector name in the run (read it back with ?det=NAME)")] = "cam",
    exp: Annotated[str, typer.Option(help="experiment name written in the run's runinfo")] = "tstx00001",
    run: Annotated[int, typer.Option(min=0, help="run number written in the run's runinfo")] = 1,
    adu_gain: Annotated[float | None, typer.Option(help="ADU per photon (default 1)")] = None,
    adu_offset: Annotated[float | None, typer.Option(help="pedestal in ADU (default 0)")] = None,
    rate: Annotated[float, typer.Option(min=0.001, help="event rate in Hz: spacing of the timestamps")] = 120.0,
    exp_dir: Annotated[
        Path | None, typer.Option(help="also lay the run out in DIR as psana's exp= mode wants it (smalldata too)")
    ] = None,
) -> None:
    """Write a simulated dataset as an XTC2 run of uint16 ADU with psana's own writer, truth included.

    The dataset's mask goes beside it as psana's pixel_mask constant (RUN.constants.npz for --out RUN.xtc2).
    Serve it with `lcls-hitfinder serve --source 'xtc2:RUN.xtc2?det=NAME&constants=RUN.constants.npz'` (the
    command prints it), or through shared
    memory with psana's shmemServer. With --adu-gain G/--adu-offset O, serve with \\[serve.calibration] gain = G and
    offset = O so the service turns ADU back into photons. With --exp-dir the run also goes where an
    `exp:` source (serial or MPI, `&ranks=N`) finds it, with the smalldata index of psana's smdwriter.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.service.sources.xtc2_writer import (
        TRUTH_DETECTOR,
        constants_path,
        dataset_to_xtc2,
        exp_layout,
        exp_run_file,
    )

    output_file(out, "XTC2 file", {"DATA": data})
    if exp_dir is not None:  # checked before the run is written: a real experiment's run is not replaced
        output_dir(exp_dir, "experiment directory")
        placed = exp_run_file(exp_dir, exp, run)
        if placed.exists() and not (out.exists() and placed.samefile(out)):
            raise UserError(
                f"--exp-dir {exp_dir} holds run {run} of {exp} already ({placed.name}): give another --exp-dir or "
                "--run, or remove it first"
            )
    with Dataset(existing(data, "dataset")) as ds:
        n, recorded = len(ds), ds.calibration
    columns = (TextColumn("writing XTC2"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout: the result lines alone
        task = bar.add_task("events", total=n)
        written = dataset_to_xtc2(
            data, out, det, exp, run, adu_gain, adu_offset, rate, progress=lambda k: bar.update(task, completed=k)
        )
    print(f"{out}: {written} events of {exp} run {run}, detector {det!r}, truth in {TRUTH_DETECTOR!r}")
    constants = f"det={det}&constants={constants_path(out)}"
    gain, offset = (recorded.gain, recorded.offset) if recorded else (adu_gain or 1.0, adu_offset or 0.0)
    in_adu = (gain, offset) != (1.0, 0.0)  # the service must be told how to turn the run's ADU into photons
    print(f"serve it with: lcls-hitfinder serve {'-c FILE ' if in_adu else ''}--source 'xtc2:{out}?{constants}'")
    if in_adu:
        print(f"where FILE holds:\n[serve.calibration]\ngain = {gain:g}\noffset = {offset:g}")
    if exp_dir is not None:
        exp_layout(out, exp_dir, exp, run)
        print(f"or as an experiment run: --source 'exp:{exp}:{run}?dir={exp_dir}&{constants}' (MPI: add &ranks=4)")


def demo(
    n: Annotated[int, typer.Option(min=1, help="events in the simulated run")] = 600,
    rate: Annotated[float, typer.Option(min=1, help="shmemServer replay rate in Hz")] = 120.0,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML or YAML: its \\[simulate] and \\[serve] sections")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="embedder ONNX file (default: the shipped one)")] = None,
    bank: Annotated[
        Path | None, typer.Option(help="reference bank (default: one built from references of the simulated sample)")
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="where the run, logs and decisions go (default: a temp dir)")
    ] = None,
) -> None:
    """Simulate a run, write it as XTC2, replay it through shmemServer and serve it, with a live summary.

    The real path of a beamtime on one machine: psana's writer, psana's shared-memory server, the
    service reading shared memory, and a ZeroMQ subscriber measuring rate, latency, keep fraction and
    accuracy against the simulated truth. Ctrl-C stops everything cleanly.
    """
    from rich.console import Console

    from lcls_hitfinder.bank import ReferenceBank
    from lcls_hitfinder.config import load_config
    from lcls_hitfinder.model_io import read_model_info
    from lcls_hitfinder.service.commands import model_file
    from lcls_hitfinder.service.demo import Demo, run_demo

    settings = load_config(config)
    for path, what in ((model, "model"), (bank, "bank")):
        if path is not None:
            existing(path, what)
    if workdir is not None:
        output_dir(workdir, "work directory")
    model_path = model_file(model or settings.serve.model)  # no model: said now
    bank_path = bank or settings.serve.bank
    info = read_model_info(model_path)  # a file that is no model: said now, not after the simulation
    if bank_path is not None:  # a bank for another model likewise
        ReferenceBank.load(bank_path, expected_model_hash=info.model_hash, expected_embed_dim=info.embed_dim)
    the_demo = Demo(n, rate, workdir, settings, model, bank, Console())
    try:
        tally = run_demo(the_demo)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if the_demo.service_error is not None:
        raise UserError(f"the service failed: {the_demo.service_error}")
    if not tally.decisions:  # e.g. shmemServer could not make its shared memory (a container's small /dev/shm)
        logs = f"{the_demo.workdir / 'serve.log'} and {the_demo.workdir / 'shmemServer.log'}"
        raise UserError(f"no decision came from the service: nothing was served; see {logs}")


def register(app: typer.Typer) -> None:
    """Add the psana subcommands to `app`."""
    app.command()(xtc2)
    app.command()(demo)

"""CLI subcommands of this stage: train, export, bank build, classify, evaluate.

Heavy imports (torch, onnxruntime, matplotlib) happen inside the commands so `--help` stays quick.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lcls_hitfinder import strict_json
from lcls_hitfinder.bank import DEFAULT_K, DEFAULT_PER_CLASS, Method
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import TARGET_PRECISION, Label, labels_of_counts
from lcls_hitfinder.paths import apart, existing, output_dir, output_file

if TYPE_CHECKING:  # annotations only: the commands import them when they run (`--help` stays quick)
    import numpy as np

    from lcls_hitfinder.bank import ReferenceBank
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.embedder import OnnxEmbedder
    from lcls_hitfinder.protocols import Decisions

KINDS = ("twin", "cnn")
bank_app = typer.Typer(help="Reference banks: build one from a few labelled patterns.", no_args_is_help=True)


# flags of one kind of model only: the other records them and ignores them
ONLY_FOR = {
    "twin": ("--embed-dim", "--alpha", "--mining", "--width", "--bank-per-class"),
    "cnn": ("--arch", "--cnn-width"),
}
_OTHER_KIND = {"twin": "cnn", "cnn": "twin"}


def _say_shared(first: Path, second: Path, what: str) -> None:
    """Files held apart by name that share patterns (the same simulation seed twice): said, not refused."""
    from lcls_hitfinder.dataset import shared_patterns, shared_said

    n = shared_patterns(first, second)
    if n:
        typer.echo(shared_said(n, first, second, what), err=True)


def train(
    kind: Annotated[str, typer.Argument(help="twin (the embedder) or cnn (a multi-output CNN baseline)")],
    out: Annotated[Path, typer.Option(help="run directory: run.json, checkpoints, best model")],
    data: Annotated[Path | None, typer.Option(help="training dataset (HDF5); not with --resume")] = None,
    val: Annotated[Path | None, typer.Option(help="validation dataset, never the test set; not with --resume")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="config file; its \\[train] section is the base")
    ] = None,
    embed_dim: Annotated[int | None, typer.Option(help="embedding dimension, 2-128")] = None,
    alpha: Annotated[float | None, typer.Option(help="triplet margin α")] = None,
    mining: Annotated[str | None, typer.Option(help="batch-hard or semi-hard")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="batches per epoch (default: one pass)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="patterns per batch")] = None,
    thumbnail: Annotated[
        int | None,
        typer.Option(help="thumbnail side (default 64): a multiple of unshuffle x 2^(depth + 1), 32 by default"),
    ] = None,
    width: Annotated[int | None, typer.Option(help="embedder width (first-layer channels)")] = None,
    arch: Annotated[str | None, typer.Option(help="cnn: late3..late18, early3..early18, resnet18, vgg16")] = None,
    cnn_width: Annotated[int | None, typer.Option(help="cnn: first-layer channels")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="on-the-fly augmentation")] = None,
    photons: Annotated[
        str | None, typer.Option(help="augmentation photons per single hit 'LO,HI', or 'data' to keep the data's")
    ] = None,
    gaussian_sigma: Annotated[float | None, typer.Option(help="augmentation: largest Gaussian noise, photons")] = None,
    classes: Annotated[str | None, typer.Option(help="count (blank, 1, 2, 3, 4) or hit (blank, single, multi)")] = None,
    per_structure: Annotated[
        bool | None, typer.Option("--per-structure/--no-per-structure", help="classes split by structure too")
    ] = None,
    bank_per_class: Annotated[int | None, typer.Option(help="validation bank: references per class")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (also with --resume)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (also with --resume)")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue the run in --out from its last checkpoint, with its own data and settings "
            "(--epochs extends it; the cosine learning rate is then spread over the new total, so it rises "
            "again: an extended run is not the run it would have been with those epochs from the start)",
        ),
    ] = False,
) -> None:
    """Train a twin embedder (triplet loss) or a CNN baseline; progress bars and per-epoch validation."""
    from lcls_hitfinder.config import load_config
    from lcls_hitfinder.learn.train import CHECKPOINT, Trainer

    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    photon_range: list[float] | str | None = photons
    if photons not in (None, "data"):
        try:
            photon_range = [float(v) for v in photons.split(",")]
        except ValueError:
            photon_range = []
        if len(photon_range) != 2:
            raise UserError(f"--photons must be LO,HI or data, not {photons!r}")
    flags: dict[str, tuple[str, Any]] = {  # each setting flag: the config key it overrides, its value
        "--embed-dim": ("train.embed_dim", embed_dim),
        "--alpha": ("train.alpha", alpha),
        "--mining": ("train.mining", mining),
        "--epochs": ("train.epochs", epochs),
        "--steps-per-epoch": ("train.steps_per_epoch", steps_per_epoch),
        "--batch-size": ("train.batch_size", batch_size),
        "--thumbnail": ("train.preprocess.thumbnail", thumbnail),
        "--width": ("train.width", width),
        "--arch": ("train.cnn.arch", arch),
        "--cnn-width": ("train.cnn.width", cnn_width),
        "--augment": ("train.augment.enabled", augment),
        "--photons": ("train.augment.photons", photon_range),
        "--gaussian-sigma": ("train.augment.gaussian_sigma", gaussian_sigma),
        "--classes": ("train.classes", classes),
        "--per-structure": ("train.per_structure", per_structure),
        "--bank-per-class": ("train.bank_per_class", bank_per_class),
        "--seed": ("train.seed", seed),
        "--device": ("train.device", device),
        "--threads": ("train.threads", threads),
    }
    overrides = dict(flags.values())
    settings = load_config(config, overrides).train  # a bad value is named first, whatever else is wrong
    other = [flag for flag in ONLY_FOR[_OTHER_KIND[kind]] if flags[flag][1] is not None]
    if other:  # it would be recorded in run.json and do nothing
        raise UserError(f"{', '.join(other)}: for `train {_OTHER_KIND[kind]}`, not `train {kind}`")
    machine = {k: v for k, v in (("device", device), ("threads", threads)) if v is not None}
    made = not resume and not out.exists()  # a folder this command makes, and removes if it refuses to train
    if resume:  # the run's own data and settings; a flag that would be ignored is refused instead
        named = {**{flag: v for flag, (_, v) in flags.items()}, "--photons": photons, "--config": config}
        ignored = [flag for flag, v in {**named, "--data": data, "--val": val}.items() if v is not None]
        ignored = [flag for flag in ignored if flag not in ("--epochs", "--device", "--threads")]
        if ignored:
            raise UserError(
                f"--resume continues the run with its own data and settings: leave out {', '.join(ignored)}"
            )
    elif data is None or val is None:
        raise UserError("train needs --data and --val (or --resume for a run in --out)")
    else:
        existing(data, "dataset")
        existing(val, "validation dataset")
        apart(data, val, f"--val {val} is the training data: validation would judge the patterns trained on")
        output_dir(out, "run directory")
    try:
        trainer = Trainer(kind, data, val, out, settings, resume, epochs, machine)  # type: ignore[arg-type]
    except UserError:  # refused before training: a run directory made for it goes again
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    try:
        best = trainer.fit()
    except KeyboardInterrupt:  # each finished epoch is checkpointed: say how to go on
        if (out / CHECKPOINT).exists():
            typer.echo(f"interrupted: `lcls-hitfinder train {kind} --out {out} --resume` continues the run", err=True)
        else:
            typer.echo(f"interrupted in the first epoch: nothing in {out} to resume; train it again", err=True)
        raise typer.Exit(130) from None
    print(strict_json.dumps({"run": str(out), "best": best}, indent=2))


def export(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="a twin training run directory; several make one ensemble model; or one exported model (.onnx) "
            "to make average over --views rotations"
        ),
    ],
    out: Annotated[Path, typer.Option(help="ONNX file to write")],
    views: Annotated[
        int, typer.Option(help="average each embedding over this many 90-degree rotations of the thumbnail: 1, 2 or 4")
    ] = 1,
) -> None:
    """Export a twin run's best weights to ONNX, with preprocessing and training summary in the metadata.

    Several runs export as one ensemble: their embeddings concatenated, so the bank's distance is the
    members' mean squared distance. --views 2 or 4 averages each embedding over the thumbnail's quarter turns
    inside the model, for that many times the inference (docs/RESULTS.md: higher single-hit precision on
    validation sets, not on every test set).
    """
    from lcls_hitfinder.learn.export import export_rotations, export_run
    from lcls_hitfinder.model_io import check_views

    check_views(views)  # before any file is written
    paths = [existing(d, "model" if d.suffix == ".onnx" else "run directory") for d in run_dirs]
    if paths[0].suffix == ".onnx" and paths[0].is_file():
        if len(paths) > 1:
            raise UserError("an exported model is made to average over rotations on its own, not with runs")
        if views == 1:
            raise UserError(f"{paths[0]} is already exported: give --views 2 or 4 to make it average over rotations")
        info, diff = export_rotations(paths[0], views, output_file(out, "model"))
    else:
        info, diff = export_run(paths, output_file(out, "model"), views)
    size = out.stat().st_size / 1e6
    averaged = f", averaged over {info.views} rotations" if info.views > 1 else ""
    print(f"{out}: model {info.model_hash}, embed dim {info.embed_dim}{averaged}, {size:.2f} MB, parity {diff:.1e}")


@bank_app.command("build")
def bank_build(
    model: Annotated[Path, typer.Option(help="embedder ONNX file")],
    data: Annotated[Path, typer.Option(help="labelled patterns to draw references from")],
    out: Annotated[Path, typer.Option(help="bank file to write (HDF5)")],
    per_class: Annotated[int, typer.Option(min=1, help="references per particle count (0-4)")] = DEFAULT_PER_CLASS,
    by_structure: Annotated[
        bool, typer.Option("--by-structure", help="draw --per-class references per structure too")
    ] = False,
    calibrate: Annotated[
        Path | None, typer.Option(help="held-out data for the threshold (default: the non-reference patterns)")
    ] = None,
    target_precision: Annotated[
        float, typer.Option(help="single-hit precision the threshold aims for")
    ] = TARGET_PRECISION,
    k: Annotated[int, typer.Option(min=1, help="nearest references averaged per class")] = DEFAULT_K,
    method: Annotated[Method, typer.Option(help="how a class's distance is taken: knn or prototype")] = "knn",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="seed of the reference draw")] = 0,
    single_fraction: Annotated[
        float | None,
        typer.Option(
            help="share of single hits among the events of a run that the bank judges, those the pre-filter "
            "passes (summary says it): the precision is reckoned for that share (default: the calibration "
            "patterns' own; picked ones come as picked)",
        ),
    ] = None,
) -> None:
    """Build a reference bank and calibrate its threshold for a target single-hit precision."""

    from lcls_hitfinder.learn.infer import build_bank

    if not 0 < target_precision <= 1:
        raise UserError("--target-precision must be in (0, 1]")
    if single_fraction is not None and not 0 < single_fraction < 1:
        raise UserError("--single-fraction must be in (0, 1): the share of single hits among a run's events")
    output_file(out, "bank", {"--model": model, "--data": data, "--calibrate": calibrate})
    if calibrate is not None:
        apart(
            calibrate,
            data,
            f"--calibrate {calibrate} is the file the references come from (they would be "
            "calibrated on); leave it out to calibrate on its other patterns",
        )
        _say_shared(
            existing(data, "dataset"),
            existing(calibrate, "calibration dataset"),
            "the threshold would be set on references",
        )
    bank, report = build_bank(
        existing(model, "model"),
        existing(data, "dataset"),
        per_class,
        by_structure,
        calibrate and existing(calibrate, "calibration dataset"),
        target_precision,
        k,
        method,
        seed,
        single_fraction,
    )
    bank.save(out)
    if bank.picked_with is not None and calibrate is None and single_fraction is None:
        print(
            f"warning: the threshold is calibrated on the picked events left over, {report['single_fraction']:.0%} "
            "of them singles as you picked them; the precision a run sees depends on its own share of singles "
            "(a few % in SPI): give --single-fraction (summary says it of a run) to calibrate for it",
            file=sys.stderr,
        )
    if report["calibration_singles"] < 100:
        print(
            f"warning: the threshold rests on {report['calibration_singles']} single hits; its precision is"
            " rough (give --calibrate with more)",
            file=sys.stderr,
        )
    if report["calibration_singles"] == report["calibration_patterns"]:
        print(
            "warning: the calibration patterns are all single hits: the precision reached says nothing "
            "(give --calibrate with blanks and multi-hits)",
            file=sys.stderr,
        )
    if not report["reached"]:
        print(
            f"warning: no threshold reaches precision {target_precision}; using the most precise one", file=sys.stderr
        )
    classes = labels_of_counts(bank.n_particles)
    sizes = {c: int((classes == c).sum()) for c in (Label.BLANK, Label.SINGLE, Label.MULTI)}
    lacking = [name for name, c in (("blanks", Label.BLANK), ("multi-hits", Label.MULTI)) if not sizes[c]]
    if lacking:  # a pattern of the class it lacks is labelled by the nearest class the bank has
        print(
            f"warning: the references hold no {' and no '.join(lacking)}: such patterns will be labelled as the "
            "nearest kind the bank has (give references of every kind)",
            file=sys.stderr,
        )
    smallest = min(n for n in sizes.values() if n)
    if method == "knn" and k > smallest:
        print(f"warning: --k {k}: a class of {smallest} references averages all of them", file=sys.stderr)
    print(strict_json.dumps({"bank": str(out), **report}, indent=2))


@bank_app.command("pick")
def bank_pick(
    source: Annotated[str, typer.Option(help="the run, named as serve names sources: xtc2:, exp:, h5: ...")],
    picks: Annotated[
        Path,
        typer.Option(help="CSV of the picked events: event (or timestamp), optionally run, n_particles (or label)"),
    ],
    out: Annotated[Path, typer.Option(help="labelled reference file to write, for bank build --data")],
    sample: Annotated[str, typer.Option(help="structure name the picked hits are labelled with")] = "sample",
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="the service's config: its \\[serve.calibration] turns ADU into photons"),
    ] = None,
) -> None:
    """Write events picked from a run, with the particle counts you judged, as references for `bank build`.

    The bank of a new sample from its own first minutes: list the events (the decision log's or `listen
    --json`'s `event` or `timestamp`, labels corrected by eye) and this reads them through serve's own
    source and calibration, until every picked event has come. Live shared memory is refused: its events
    pass once, so those picked from its decision log are gone; read the run's files instead (exp:).
    Events are matched by timestamp where the file has that column and the source's timestamps are the
    events' own (psana's, a CXI file's that records them: a live service's event index is its own count, not
    the run's), else by event; h5: datasets and sim: stamp events when they read them.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from lcls_hitfinder.config import load_config
    from lcls_hitfinder.service.pick import pick_references, read_picks
    from lcls_hitfinder.service.sources import open_source, parse_uri

    settings = load_config(config, {"serve.source": source}).serve
    uri = parse_uri(settings.source)
    apart(Path(uri.target), out, f"--out {out} is the file the events are read from")  # before it is said a dataset
    output_file(out, "reference file", {"--picks": picks, "--config": config})
    existing(picks, "picks file")
    if uri.live:
        raise UserError(
            f"{uri.raw}: live events pass once, so those picked from the decision log are gone: pick them from "
            "the run's files (exp:EXPERIMENT:RUN?dir=...&det=..., xtc2:FILE?det=..., psana1:exp=EXP:run=N?det=...)"
        )
    src = open_source(uri, settings)
    read_picks(picks, timestamps=True)  # a bad CSV said before a psana reader starts (or MPI) to find its run
    src.open()  # then whether its timestamps name the events (an h5: file's say once it is open)
    try:
        wanted = read_picks(picks, src.stamps_events)
        columns = (
            TextColumn("reading {task.fields[uri]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[seen]}"),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("picked", total=len(wanted.counts), uri=source, seen="")
            n = pick_references(
                src,
                wanted,
                settings,
                out,
                sample,
                lambda k, seen: bar.update(task, completed=k, seen=f"{seen} events read"),
            )
    finally:
        src.close()
    print(f"{out}: {n} picked events of {source}")
    print(f"next: lcls-hitfinder bank build --model MODEL.onnx --data {out} --per-class K --out BANK.h5")


def _model_and_bank(model: Path, bank_path: Path) -> tuple[OnnxEmbedder, ReferenceBank]:
    """The embedder and a bank it accepts (built for this model, of its width)."""
    from lcls_hitfinder.bank import ReferenceBank
    from lcls_hitfinder.embedder import OnnxEmbedder

    embedder = OnnxEmbedder(existing(model, "model"), threads=2)
    bank = ReferenceBank.load(
        existing(bank_path, "bank"), expected_model_hash=embedder.model_hash, expected_embed_dim=embedder.embed_dim
    )
    return embedder, bank


def _decide(model: Path, bank_path: Path, data: Path) -> tuple[np.ndarray, Decisions, ReferenceBank, Dataset]:
    """Embeddings, decisions, the bank and the dataset reader (left open) for model + bank on labelled data."""
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.learn.infer import embed_dataset

    embedder, bank = _model_and_bank(model, bank_path)
    dataset = Dataset(existing(data, "dataset"))
    emb = embed_dataset(embedder, dataset)
    return emb, bank.decide(emb), bank, dataset


def _decide_per_sample(
    model: Path, refs: Path, data: Path, per_class: int
) -> tuple[np.ndarray, Decisions, Dataset, str, dict[str, Any]]:
    """Embeddings, per-sample decisions (evaluate.per_sample_decisions), the dataset reader (left open), how
    they were judged and how the references were taken."""
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.embedder import OnnxEmbedder
    from lcls_hitfinder.evaluate import per_sample_decisions, per_sample_protocol
    from lcls_hitfinder.learn.infer import embed_dataset

    embedder = OnnxEmbedder(existing(model, "model"), threads=2)
    with Dataset(existing(refs, "references")) as r:
        ref_emb, ref_n, ref_structure, taken = embed_dataset(embedder, r), r.n_particles, r.structure, r.taken
    dataset = Dataset(existing(data, "dataset"))
    emb = embed_dataset(embedder, dataset)
    dec = per_sample_decisions(ref_emb, ref_n, ref_structure, emb, dataset.structure, embedder.model_hash, per_class)
    return emb, dec, dataset, per_sample_protocol(ref_n, ref_structure, dataset.structure, per_class), taken


def classify(
    model: Annotated[Path, typer.Option(help="embedder ONNX file")],
    bank: Annotated[Path, typer.Option(help="reference bank built for this model")],
    data: Annotated[Path, typer.Option(help="patterns to classify: a dataset or a CXI file (any image size and mask)")],
    out: Annotated[
        Path,
        typer.Option(
            help="CSV to write: index,label,keep,score,distance,event (and timestamp where a CXI file records its "
            "events): `bank pick --picks` reads it"
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="the service's config: its \\[serve.calibration] for raw ADU frames (a dataset in ADU brings its own) "
            "and its \\[serve.prefilter]",
        ),
    ] = None,
) -> None:
    """Classify every pattern of a file offline, as `serve` would on `h5:FILE` (no labels needed)."""
    import numpy as np

    from lcls_hitfinder.config import load_config
    from lcls_hitfinder.dataset import taken_otherwise
    from lcls_hitfinder.frame_file import FrameFile
    from lcls_hitfinder.learn.infer import embed_frames
    from lcls_hitfinder.service.binning import Prefilter
    from lcls_hitfinder.verdicts import Verdicts

    output_file(out, "CSV", {"--model": model, "--bank": bank, "--data": data, "--config": config})
    serve = load_config(config).serve
    calibration = serve.configured_calibration
    embedder, ref_bank = _model_and_bank(model, bank)
    with FrameFile(existing(data, "dataset"), f"dataset {data}") as frames:
        conflict = None if calibration is None else frames.conflicting_units(calibration)
        if conflict:
            typer.echo(f"warning: {conflict}", err=True)
        otherwise = taken_otherwise(ref_bank.taken, frames.taken)
        if otherwise:
            typer.echo(f"warning: {otherwise}", err=True)
        emb, finite, blank = embed_frames(embedder, frames, calibration, prefilter=Prefilter(serve.prefilter))
        recorded = frames.events
    # each pattern's event as `serve --source h5:FILE` names it: the file's own (CXI), else its index
    index = np.arange(len(emb))
    event = index if recorded is None or recorded.event is None else recorded.event
    stamps = [] if recorded is None else [recorded.timestamp]
    v = Verdicts.errors(len(emb))  # decided as serve decides them
    to_model = finite & ~blank
    v.judge(index, finite, blank, ref_bank.decide(emb[to_model]) if to_model.any() else None)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "keep", "score", "distance", "event"] + ["timestamp"] * len(stamps))
        for i in range(len(emb)):
            w.writerow(
                [
                    i,
                    Label(v.label[i]).text,
                    "true" if v.keep[i] else "false",
                    f"{v.score[i]:.6f}",
                    f"{v.distance[i]:.6f}",
                    int(event[i]),
                    *(int(t[i]) for t in stamps),
                ]
            )
    n_errors = int((v.label == Label.ERROR).sum())
    errors = f", {n_errors} errors (NaN, Inf or overflowing pixels)" if n_errors else ""
    dim = f", {int(blank.sum())} blank by the pre-filter" if blank.any() else ""
    print(f"{out}: {len(emb)} patterns, {int(v.keep.sum())} kept as single hits{dim}{errors}")


def evaluate(
    data: Annotated[Path, typer.Option(help="labelled test patterns, never seen in training")],
    report: Annotated[Path, typer.Option(help="directory for metrics.json, metrics.md and plots")],
    model: Annotated[Path | None, typer.Option(help="embedder ONNX file")] = None,
    bank: Annotated[Path | None, typer.Option(help="reference bank built for the model")] = None,
    refs: Annotated[
        Path | None,
        typer.Option(help="instead of --bank: labelled references; each structure is judged by its own bank"),
    ] = None,
    per_class: Annotated[
        int | None,
        typer.Option(min=1, help=f"with --refs: references per particle count and structure ({DEFAULT_PER_CLASS})"),
    ] = None,
    run: Annotated[Path | None, typer.Option(help="instead of model + bank: a cnn baseline run directory")] = None,
    examples: Annotated[int, typer.Option(min=0, help="patterns in the example grid")] = 24,
) -> None:
    """Evaluate model + bank (or a CNN baseline run) on labelled data: metrics, table and plots."""
    if run is None and (model is None or (bank is None) == (refs is None)):
        raise UserError("evaluate needs --model and one of --bank or --refs (or --run for a CNN baseline)")
    if run is not None and (model, bank, refs) != (None, None, None):
        raise UserError("--run evaluates a CNN baseline on its own: leave out --model, --bank and --refs")
    if per_class is not None and refs is None:
        raise UserError("--per-class draws each sample's bank from --refs; a --bank is used as it is")
    if refs is not None:
        apart(refs, data, f"--refs {refs} is the file under test: its references would be judged by themselves")
    existing(data, "dataset")
    made = not report.exists()
    output_dir(report, "report directory")  # once the arguments hold: a refused command leaves no folder
    try:
        if refs is not None:
            _say_shared(existing(refs, "references"), data, "references would judge themselves")
        _evaluate_into(report, data, model, bank, refs, per_class or DEFAULT_PER_CLASS, run, examples)
    except BaseException:
        if made and not any(report.iterdir()):  # refused on reading the model, the bank or the run
            report.rmdir()
        raise


def _evaluate_into(
    report: Path,
    data: Path,
    model: Path | None,
    bank: Path | None,
    refs: Path | None,
    per_class: int,
    run: Path | None,
    examples: int,
) -> None:
    import numpy as np

    from lcls_hitfinder.evaluate import (
        clear_stale,
        hit_metrics,
        markdown_table,
        pairs_called_single_by_axis,
        write_report,
    )

    if run is not None:
        from lcls_hitfinder.learn.baseline import evaluate_cnn

        cnn = evaluate_cnn(existing(run, "run directory"), data)
        (report / "metrics.json").write_text(strict_json.dumps(cnn, indent=2) + "\n")
        (report / "metrics.md").write_text(markdown_table([cnn], list(cnn)))
        clear_stale(report, ("metrics.json", "metrics.md"))
        print(strict_json.dumps(cnn, indent=2))
        return
    assert model is not None
    from lcls_hitfinder.dataset import taken_otherwise

    ref_bank = None
    refs_taken: dict[str, Any] | None
    if refs is not None:
        emb, dec, dataset, protocol, refs_taken = _decide_per_sample(model, refs, data, per_class)
    elif bank is not None:
        emb, dec, ref_bank, dataset = _decide(model, bank, data)
        refs_taken = ref_bank.taken
    with dataset:
        n = dataset.n_particles
        metrics = hit_metrics(n, dec)
        otherwise = taken_otherwise(refs_taken, dataset.taken)
        if otherwise:
            typer.echo(f"warning: {otherwise}", err=True)
            metrics["references_taken_otherwise"] = otherwise
        if ref_bank is None:
            metrics["protocol"] = protocol
        else:
            from lcls_hitfinder.dataset import seen_count

            metrics["patterns_the_bank_was_built_from"] = seen = seen_count(ref_bank.seen, data)
            if seen:
                typer.echo(
                    f"warning: {seen} patterns of {data} are among the bank's references or calibration patterns, "
                    f"pixel for pixel: they judge themselves. Evaluate on data the bank was not built from",
                    err=True,
                )
            metrics["threshold"] = ref_bank.threshold
            # beside the calibrated threshold, the plain nearer-class decision (threshold 0)
            ref_bank.threshold = 0.0
            at_zero = hit_metrics(n, ref_bank.decide(emb))
            for key in ("accuracy", "single_vs_multi_accuracy", "precision", "recall"):
                metrics[f"{key}_at_threshold_0"] = at_zero[key]
        positions = dataset.positions
        pairs = pairs_called_single_by_axis(n, positions, dec.label) if positions is not None else []
        if pairs:
            metrics["pairs_called_single_by_axis"] = pairs
        photons = dataset.photons
        metrics["photons_per_single_hit"] = float(np.median(photons[n == 1])) if (n == 1).any() else float("nan")
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(len(n), size=min(examples, len(n)), replace=False))
        from lcls_hitfinder.model_io import file_hash

        judged = {"model": f"{model} ({file_hash(model)})", "data": str(data)}
        if ref_bank is None:
            judged["references"] = f"{refs}: {metrics['protocol']}"
        else:
            judged["bank"] = f"{bank} (threshold {metrics['threshold']:g})"
        write_report(report, metrics, n, dec, photons, emb, dataset.photon_images(idx), idx, judged)
    tables = ("confusion", "pairs_called_single_by_axis")
    print(strict_json.dumps({k: v for k, v in metrics.items() if k not in tables}, indent=2))
    print(f"report: {report}/metrics.md (tables), metrics.json and plots", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to `app`."""
    app.command()(train)
    app.command()(export)
    app.add_typer(bank_app, name="bank")
    app.command()(classify)
    app.command()(evaluate)

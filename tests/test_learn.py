"""End to end through the CLI on small analytic datasets: train, resume, export (parity), bank build, classify,
evaluate, and the CNN baselines. Patterns: spheres' form factor times the interference of 1-4 touching
copies, so single and multi hits differ as in real data (fringes across each pair axis)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx as onnx_lib
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lcls_hitfinder.bank import BankMismatch, ReferenceBank
from lcls_hitfinder.cli import app
from lcls_hitfinder.dataset import Batch, Dataset, DatasetWriter
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import Label
from lcls_hitfinder.learn import train as train_module
from lcls_hitfinder.model_io import file_hash, read_model_info

runner = CliRunner()


def spheres(n: int, shape: tuple[int, int], seed: int, photons: float = 3000.0, radius: float = 5.0) -> Batch:
    """Noise-free patterns (expected photons) of 0-4 touching spheres of `radius` pixels^-1 units."""
    rng = np.random.default_rng(seed)
    h, w = shape
    qy, qx = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    q = np.hypot(qy, qx) * 2 * np.pi / 160 + 1e-6
    counts = rng.integers(0, 5, n)
    images = np.zeros((n, h, w), np.float32)
    names = np.empty(n, dtype=object)
    positions = np.zeros((n, 4, 3), np.float32)
    for i, c in enumerate(counts):
        r = radius * rng.uniform(0.85, 1.15)
        qr = q * r
        form = (3 * (np.sin(qr) - qr * np.cos(qr)) / qr**3) ** 2
        centres = np.zeros((max(c, 1), 2))
        for k in range(1, c):
            angle = rng.uniform(0, 2 * np.pi)
            centres[k] = centres[rng.integers(0, k)] + 2 * r * np.array([np.cos(angle), np.sin(angle)])
        kq = 2 * np.pi / 160
        phase = np.exp(1j * kq * (qy[None] * centres[:, 0, None, None] + qx[None] * centres[:, 1, None, None]))
        img = form * np.abs(phase.sum(0)) ** 2 if c else np.zeros(shape)
        images[i] = img * (photons / max(form.sum(), 1e-9))
        positions[i, :c, :2] = centres[:c]  # in the detector plane: pairs lie across the beam
        names[i] = "sphere" if c else ""
    return Batch(
        images=images,
        n_particles=counts.astype(np.int8),
        structure=names,
        photons=images.sum((1, 2)).astype(np.float32),
        orientations=np.zeros((n, 4, 4), np.float32),
        positions=positions,
    )


def write(
    path: Path, n: int, seed: int, shape: tuple[int, int] = (48, 48), mask: np.ndarray | None = None, **attrs: Any
) -> Path:
    batch = spheres(n, shape, seed)
    m = np.ones(shape, bool) if mask is None else mask
    with DatasetWriter(path, shape, m, {"seed": seed, "beam_center": [shape[0] / 2, shape[1] / 2], **attrs}) as wr:
        wr.append(batch)
    return path


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


TINY = ["--epochs", "2", "--steps-per-epoch", "15", "--batch-size", "60", "--thumbnail", "32", "--embed-dim", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("learn")
    write(d / "train.h5", 500, 1)
    write(d / "val.h5", 200, 2)
    write(d / "test.h5", 150, 3)
    # another detector: other size, a beam stop and a dead column in the mask
    mask = np.ones((40, 56), bool)
    mask[16:24, 24:32] = False
    mask[:, 5] = False
    write(d / "other.h5", 60, 4, shape=(40, 56), mask=mask)
    return d


@pytest.fixture(scope="module")
def model(data: Path) -> Path:
    invoke("train", "twin", "--data", data / "train.h5", "--val", data / "val.h5", "--out", data / "run", *TINY)
    out = invoke("export", data / "run", "--out", data / "m.onnx")
    assert "parity" in out
    return data / "m.onnx"


def test_training_run_records_history_and_checkpoints(data: Path, model: Path) -> None:
    modes = {p.name: p.stat().st_mode & 0o777 for p in (data / "run").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["checkpoint.safetensors"] == modes["run.json"] == 0o666 & ~umask
    run = json.loads((data / "run" / "run.json").read_text())
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    assert run["settings"]["embed_dim"] == 8 and run["settings"]["preprocess"]["thumbnail"] == 32
    assert {"accuracy", "precision_at_recall_0.9", "val_loss"} <= set(run["best"])


def test_batches_larger_than_the_training_set_are_said(data: Path, tmp_path: Path) -> None:
    args = ["train", "twin", "--data", data / "val.h5", "--val", data / "test.h5", "--out", tmp_path / "r"]
    tiny = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "300", "--thumbnail", "32", "--embed-dim", "8"]
    result = runner.invoke(app, [str(a) for a in [*args, *tiny]])
    assert result.exit_code == 0, result.output
    assert "warning: batches of 300 from 200 training patterns repeat patterns" in " ".join(result.output.split())


def test_export_carries_preprocessing_and_summary(model: Path) -> None:
    info = read_model_info(model)
    assert info.embed_dim == 8 and info.preprocess.thumbnail == 32
    assert info.summary["kind"] == "twin" and info.summary["data"] == "train.h5"
    assert info.summary["best_validation"]["epoch"] in (1, 2)
    # the recipe as trained (TINY: 15 steps of 60 a epoch; the defaults for the rest)
    recipe = {k: info.summary[k] for k in ("steps_per_epoch", "batch_size", "per_structure", "negatives")}
    assert recipe == {"steps_per_epoch": 15, "batch_size": 60, "per_structure": False, "negatives": "all"}


def test_bank_classify_and_evaluate(data: Path, model: Path, tmp_path: Path) -> None:
    bank_path = tmp_path / "bank.h5"
    args = ["bank", "build", "--model", model, "--data", data / "val.h5", "--per-class", "5", "--out", bank_path]
    cli = Path(sys.executable).parent / "lcls-hitfinder"  # a real process: rich writes to a real stdout
    built = subprocess.run([cli, *args], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("{"), built.stdout  # the JSON alone: progress and warnings go to stderr
    report = json.loads(built.stdout)
    assert report["references"] == 25 and report["calibration_patterns"] == 175
    bank = ReferenceBank.load(bank_path, expected_model_hash=file_hash(model))
    assert bank.threshold == report["threshold"] and len(bank.embeddings) == 25

    invoke("classify", "--model", model, "--bank", bank_path, "--data", data / "test.h5", "--out", tmp_path / "p.csv")
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150 and list(rows[0]) == ["index", "label", "keep", "score", "distance", "event"]
    assert all(r["event"] == r["index"] for r in rows)  # serve's event on a dataset: its position
    assert {r["label"] for r in rows} <= {"blank", "single", "multi"}
    assert all((r["keep"] == "true") == (r["label"] == "single") for r in rows)
    # each row's score and distance are the bank's for the torch net on training's own thumbnails of that
    # pattern (the run's preprocessing settings, not the ONNX file's copy); the pre-filter's blanks say -1
    from lcls_hitfinder.learn.train import load_run
    from lcls_hitfinder.preprocess import Preprocessor

    _, settings, net = load_run(data / "run")
    with Dataset(data / "test.h5") as d, torch.no_grad():
        expected = bank.decide(net.eval()(Preprocessor(settings.preprocess, d.mask, d.shape)(d.images())).numpy())
    judged = [i for i, r in enumerate(rows) if float(r["score"]) != -1.0]
    assert len(judged) > 100
    np.testing.assert_allclose([float(rows[i]["score"]) for i in judged], expected.score[judged], atol=1e-4)
    np.testing.assert_allclose([float(rows[i]["distance"]) for i in judged], expected.distance[judged], atol=1e-4)
    assert [rows[i]["label"] for i in judged] == [Label(int(c)).text for c in expected.label[judged]]

    invoke("evaluate", "--model", model, "--bank", bank_path, "--data", data / "test.h5", "--report", tmp_path / "r")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n"] == 150 and metrics["photons_per_single_hit"] == pytest.approx(3000, rel=1e-3)
    assert metrics["accuracy"] > 0.8  # the analytic patterns are easy; a broken pipeline scores ~0.4
    assert metrics["accuracy_at_threshold_0"] > 0.8 and metrics["threshold"] == report["threshold"]
    assert (tmp_path / "r" / "examples.png").exists()
    pairs = metrics["pairs_called_single_by_axis"]  # the analytic pairs all lie across the beam
    with Dataset(data / "test.h5") as d:
        assert sum(r["pairs"] for r in pairs) == int((d.n_particles == 2).sum()) > 0
    assert [r["pairs"] > 0 for r in pairs] == [False] * 5 + [True]
    assert metrics["patterns_the_bank_was_built_from"] == 0

    # the bank's own file under test: every pattern was a reference or calibrated the threshold (blanks of
    # constant pixels aside: every noise-free simulation has them)
    own = ["evaluate", "--model", model, "--bank", bank_path, "--data", data / "val.h5", "--report", tmp_path / "o"]
    judged = subprocess.run([cli, *own], capture_output=True, text=True, timeout=300)
    assert judged.returncode == 0, judged.stderr
    with Dataset(data / "val.h5") as d:
        lit = sum(int(im.min() != im.max()) for im in d.images())
    own_metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert lit > 0 and own_metrics["patterns_the_bank_was_built_from"] == lit
    said = " ".join(judged.stderr.split())
    assert f"warning: {lit} patterns of {data / 'val.h5'} are among the bank's references or calibration" in said


def test_references_taken_otherwise_than_the_data_are_said(data: Path, model: Path, tmp_path: Path) -> None:
    """References simulated at 0.15 m judging data at 0.3 m (or frames of another size) decide nothing they were
    calibrated for; a review measured precision 0.09 at recall 0.04 there, and nothing said so. The bank keeps
    how its references were taken; classify and evaluate say what differs, and the report records it."""
    geometry = {"photon_energy_ev": 1700.0, "pixel_size_m": 6e-4}
    refs = write(tmp_path / "refs.h5", 150, 5, distance_m=0.15, **geometry)
    far = write(tmp_path / "far.h5", 60, 6, distance_m=0.3, **geometry)
    near = write(tmp_path / "near.h5", 60, 7, distance_m=0.152, **geometry)  # within 5%: the same geometry
    bank_path = tmp_path / "bank.h5"
    invoke("bank", "build", "--model", model, "--data", refs, "--per-class", "5", "--out", bank_path)
    bank = ReferenceBank.load(bank_path)
    assert bank.taken == {"frame_shape": [48, 48], "distance_m": 0.15, **geometry, "beam_center": [24.0, 24.0]}

    def said(*args: object) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    out = said("classify", "--model", model, "--bank", bank_path, "--data", far, "--out", tmp_path / "p.csv")
    assert (
        "the bank's references were taken otherwise (q at the frames' edges [0.84, 0.84] nm^-1, these [0.42, 0.42]"
        in out
    )
    assert "distance_m 0.15, these 0.3; photon_energy_ev 1700, these 1700" in out
    # frames of unknown geometry (other.h5 records none, as a live source's): nothing to compare the q with
    out = said(
        "classify", "--model", model, "--bank", bank_path, "--data", data / "other.h5", "--out", tmp_path / "o.csv"
    )
    assert "taken otherwise" not in out
    # references read from a detector (no geometry, as picked ones) against frames of another shape
    detector_bank = tmp_path / "v.h5"
    invoke("bank", "build", "--model", model, "--data", data / "val.h5", "--per-class", "5", "--out", detector_bank)
    out = said(
        "classify", "--model", model, "--bank", detector_bank, "--data", data / "other.h5", "--out", tmp_path / "o.csv"
    )
    assert "(frames of (48, 48), these of (40, 56))" in out
    assert "taken otherwise" not in said(
        "classify", "--model", model, "--bank", bank_path, "--data", near, "--out", tmp_path / "n.csv"
    )
    out = said("evaluate", "--model", model, "--bank", bank_path, "--data", far, "--report", tmp_path / "r")
    assert "taken otherwise" in out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["references_taken_otherwise"].startswith("the bank's references were taken otherwise (q at")
    out = said("evaluate", "--model", model, "--refs", refs, "--data", far, "--report", tmp_path / "s")
    assert "distance_m 0.15, these 0.3" in out
    # frames of another size spanning the same q: the same thumbnails, nothing to say
    same_q = write(
        tmp_path / "same_q.h5", 60, 8, (24, 24), distance_m=0.15, photon_energy_ev=1700.0, pixel_size_m=1.2e-3
    )
    assert "taken otherwise" not in said(
        "classify", "--model", model, "--bank", bank_path, "--data", same_q, "--out", tmp_path / "q.csv"
    )


def test_bank_build_on_picked_events_says_their_share_of_singles_is_not_the_run_s(
    data: Path, model: Path, tmp_path: Path
) -> None:
    """Picked events (twenty of each kind, as the docs suggested) calibrate a threshold for their own share of
    singles: a review's 0.91 at build was 0.62 on the run. bank build says so, and --single-fraction calibrates
    for the run's share."""
    picked = write(tmp_path / "picked.h5", 120, 9, picked_from="h5:run.cxi", calibration={"gain": 1.0})
    build = ["bank", "build", "--model", model, "--data", picked, "--per-class", "5"]
    result = runner.invoke(app, [str(a) for a in [*build, "--out", tmp_path / "a.h5"]])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "the threshold is calibrated on the picked events left over" in said and "--single-fraction" in said
    result = runner.invoke(app, [str(a) for a in [*build, "--out", tmp_path / "b.h5", "--single-fraction", "0.05"]])
    assert result.exit_code == 0, result.output
    assert "picked events left over" not in result.output
    report, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{") :])  # warnings may follow
    assert report["single_fraction"] == 0.05
    assert ReferenceBank.load(tmp_path / "b.h5").threshold >= ReferenceBank.load(tmp_path / "a.h5").threshold


def test_frames_are_embedded_a_few_megabytes_at_a_time_with_the_same_answers(
    data: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """classify read 256 frames at a time, whatever their size (a review: 64 Jungfrau 4M frames took 4.5 GB):
    now as many as fit 256 MiB of float32, here three 48 x 48 frames; the batches' edges change nothing."""
    from lcls_hitfinder.embedder import OnnxEmbedder
    from lcls_hitfinder.learn import infer

    embedder = OnnxEmbedder(model)
    with Dataset(data / "test.h5") as d:
        whole, finite, blank = infer.embed_frames(embedder, d)
        monkeypatch.setattr(infer, "_BATCH_BYTES", 3 * 4 * 48 * 48 + 5)
        threes, finite3, blank3 = infer.embed_frames(embedder, d)
    np.testing.assert_allclose(threes, whole, atol=1e-5)
    assert (finite3 == finite).all() and (blank3 == blank).all() and len(whole) == 150


def test_classify_names_each_pattern_as_serve_does_and_bank_pick_reads_it(
    data: Path, model: Path, tmp_path: Path
) -> None:
    """A classify CSV had no `event` (nor `timestamp`): bank pick refused it. A CXI file's events are those it
    records; its timestamps (psana's) then name them for bank pick."""
    import h5py

    from lcls_hitfinder.protocols import psana_timestamp

    bank_path = tmp_path / "bank.h5"
    invoke("bank", "build", "--model", model, "--data", data / "val.h5", "--per-class", "5", "--out", bank_path)
    with Dataset(data / "test.h5") as d:
        images = d.images(slice(0, 6))
    cxi = tmp_path / "run.cxi"
    seconds = 1_700_000_000 + np.arange(6)
    with h5py.File(cxi, "w") as f:
        f["/entry_1/data_1/data"] = images
        f["/LCLS/machineTime"] = seconds.astype(np.int32)
        f["/LCLS/machineTimeNanoSeconds"] = np.zeros(6, np.int32)
        f["/LCLS/eventNumber"] = np.arange(40, 46)
    invoke("classify", "--model", model, "--bank", bank_path, "--data", cxi, "--out", tmp_path / "p.csv")
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "label", "keep", "score", "distance", "event", "timestamp"]
    assert [int(r["event"]) for r in rows] == list(range(40, 46))
    assert [int(r["timestamp"]) for r in rows] == [psana_timestamp(int(s) * 10**9) for s in seconds]
    picked = [r for r in rows if r["label"] != "error"][:3]
    with (tmp_path / "picks.csv").open("w", newline="") as f:  # the rows a scientist keeps, as written
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
    out = invoke("bank", "pick", "--source", f"h5:{cxi}", "--picks", tmp_path / "picks.csv", "--out", tmp_path / "r.h5")
    assert "3 picked events" in out
    with Dataset(tmp_path / "r.h5") as refs:
        np.testing.assert_allclose(refs.images(), images[[int(r["index"]) for r in picked]])


@pytest.mark.parametrize("target", [0.6, 0.9])
def test_bank_build_sets_the_lowest_threshold_that_reaches_the_target_precision(
    data: Path, model: Path, target: float
) -> None:
    """On the calibration file: the singles kept at the threshold are at least `target` of the kept, and at
    the next lower score they would not be (the threshold keeps as many singles as the target allows)."""
    from lcls_hitfinder.embedder import OnnxEmbedder
    from lcls_hitfinder.learn.infer import build_bank, embed_dataset

    bank, report = build_bank(model, data / "val.h5", per_class=5, calibrate=data / "test.h5", target_precision=target)
    assert report["reached"] and report["target_precision"] == target
    with Dataset(data / "test.h5") as d:
        scores, _ = bank.scores(embed_dataset(OnnxEmbedder(model), d))
        single = d.n_particles == 1

    def precision(threshold: float) -> float:
        kept = scores >= threshold
        return float((kept & single).sum() / kept.sum())

    lower = scores[scores < bank.threshold]
    assert precision(bank.threshold) >= target
    assert precision(bank.threshold) == pytest.approx(report["precision"])
    assert len(lower) and precision(float(lower.max())) < target


def test_bank_build_says_which_file_lacks_singles_to_calibrate_on(data: Path, model: Path, tmp_path: Path) -> None:
    blanks = spheres(10, (48, 48), 5)
    blanks.n_particles[:] = 0
    with DatasetWriter(tmp_path / "blanks.h5", (48, 48), np.ones((48, 48), bool), {"seed": 5}) as wr:
        wr.append(blanks)
    build = ["bank", "build", "--model", str(model), "--data", str(data / "val.h5"), "--out", str(tmp_path / "b.h5")]
    for more, message in [
        (["--per-class", "1000"], f"every single hit of {data / 'val.h5'} became a reference"),
        (["--calibrate", str(tmp_path / "blanks.h5")], f"{tmp_path / 'blanks.h5'} has no single hits to calibrate"),
    ]:
        result = runner.invoke(app, [*build, *more])
        assert isinstance(result.exception, UserError) and message in str(result.exception), result.output


def test_labelled_frames_with_nan_pixels_are_refused_by_their_index(data: Path, model: Path, tmp_path: Path) -> None:
    """bank build, evaluate and bank pick meet a pattern with a NaN pixel: a one-line error that names the file
    and the pattern, not a traceback, a NaN embedding scored as a kept single, or a reference no frame has."""
    batch = spheres(40, (48, 48), 11)
    batch.images[3, 3, 3] = np.nan
    nan = tmp_path / "nan.h5"
    with DatasetWriter(nan, (48, 48), np.ones((48, 48), bool), {"seed": 11}) as wr:
        wr.append(batch)
    bank = tmp_path / "bank.h5"
    invoke("bank", "build", "--model", model, "--data", data / "val.h5", "--per-class", "5", "--out", bank)
    for args in (
        ["bank", "build", "--model", model, "--data", nan, "--per-class", "2", "--out", tmp_path / "b.h5"],
        ["bank", "build", "--model", model, "--data", data / "val.h5", "--calibrate", nan, "--out", tmp_path / "b.h5"],
        ["evaluate", "--model", model, "--bank", bank, "--data", nan, "--report", tmp_path / "rep"],
        ["evaluate", "--model", model, "--refs", data / "val.h5", "--data", nan, "--report", tmp_path / "rep"],
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert isinstance(result.exception, UserError), (args, result.output)
        assert f"{nan}: 1 pattern(s) hold NaN or Inf pixels (index 3)" in str(result.exception)
    assert not (tmp_path / "b.h5").exists() and not (tmp_path / "rep").exists()
    picks = tmp_path / "picks.csv"
    picks.write_text("event,n_particles\n1,1\n3,1\n")
    result = runner.invoke(
        app, ["bank", "pick", "--source", f"h5:{nan}", "--picks", str(picks), "--out", str(tmp_path / "r.h5")]
    )
    assert isinstance(result.exception, UserError), result.output
    assert "event 3 holds NaN or Inf pixels" in str(result.exception)


def test_metrics_are_strict_json_when_a_figure_cannot_be_computed(data: Path, model: Path, tmp_path: Path) -> None:
    """A file with no single hit has no precision at recall 0.9: null in metrics.json and on stdout, not NaN."""
    blanks = spheres(20, (48, 48), 5)
    blanks.images[:] = 0
    blanks.n_particles[:] = 0
    with DatasetWriter(tmp_path / "blanks.h5", (48, 48), np.ones((48, 48), bool), {"seed": 5}) as wr:
        wr.append(blanks)
    bank = tmp_path / "bank.h5"
    invoke("bank", "build", "--model", model, "--data", data / "val.h5", "--per-class", "5", "--out", bank)
    out = invoke(
        "evaluate", "--model", model, "--bank", bank, "--data", tmp_path / "blanks.h5", "--report", tmp_path / "r"
    )

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text(), parse_constant=strict)
    assert metrics["precision_at_recall_0.9"] is None and metrics["n"] == 20
    printed, _ = json.JSONDecoder(parse_constant=strict).raw_decode(out[out.index("{") :])  # then where it went
    assert printed["photons_per_single_hit"] is None


def test_evaluate_with_per_sample_banks_records_the_references_each_drew(
    data: Path, model: Path, tmp_path: Path
) -> None:
    with Dataset(data / "val.h5") as refs:
        keys = [f"{n}{s}" for n, s in zip(refs.n_particles, refs.structure, strict=True)]
    fewest = min(keys.count(k) for k in set(keys))
    for per_class, drawn in (("2", "2"), ("1000", f"up to 1000 (as few as {fewest})")):
        report = tmp_path / per_class
        args = ["--model", model, "--refs", data / "val.h5", "--data", data / "test.h5", "--report", report]
        invoke("evaluate", *args, "--per-class", per_class)
        metrics = json.loads((report / "metrics.json").read_text())
        assert metrics["protocol"] == f"per-sample banks: {drawn} references per count and structure, threshold 0"
        assert metrics["n"] == 150


def test_any_image_size_and_mask(data: Path, model: Path, tmp_path: Path) -> None:
    bank_path = tmp_path / "b.h5"
    invoke("bank", "build", "--model", model, "--data", data / "val.h5", "--per-class", "5", "--out", bank_path)
    invoke("classify", "--model", model, "--bank", bank_path, "--data", data / "other.h5", "--out", tmp_path / "o.csv")
    with open(tmp_path / "o.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(60))
    assert {r["label"] for r in rows} <= {"blank", "single", "multi"}
    judged = [r for r in rows if not (r["label"] == "blank" and float(r["score"]) == -1.0)]  # not pre-filtered
    assert judged and all(np.isfinite(float(r["score"])) and np.isfinite(float(r["distance"])) for r in judged)


def test_bank_build_says_what_its_references_lack(data: Path, model: Path, tmp_path: Path) -> None:
    """References without blanks (their patterns would be labelled as the nearest kind the bank has), and a
    --k above a class's references (it averages them all), are said; a bank of every kind with k = 5 is not."""
    batch = spheres(200, (48, 48), 11)
    hits = batch.n_particles > 0
    with DatasetWriter(tmp_path / "hits.h5", (48, 48), np.ones((48, 48), bool), {"seed": 11}) as wr:
        wr.append(Batch(*(np.asarray(getattr(batch, f.name))[hits] for f in dataclasses.fields(Batch))))
    build = ["bank", "build", "--model", model, "--per-class", "10", "--out", tmp_path / "b.h5"]
    out = invoke(*build, "--data", tmp_path / "hits.h5", "--k", "50")
    assert "warning: the references hold no blanks: such patterns will be labelled as the nearest kind" in out
    assert "warning: --k 50: a class of 10 references averages all of them" in out  # the singles
    out = invoke(*build, "--data", data / "val.h5")
    assert "hold no" not in out and "--k" not in out


def test_bank_of_another_model_is_refused(data: Path, model: Path, tmp_path: Path) -> None:
    other = ReferenceBank(np.zeros((2, 8)), np.array([1, 0]), model_hash="0123456789abcdef")
    other.save(tmp_path / "other.h5")
    args = ["classify", "--model", model, "--bank", tmp_path / "other.h5", "--data", data / "test.h5"]
    result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "x.csv"]])
    assert isinstance(result.exception, BankMismatch)
    args = ["evaluate", "--model", model, "--bank", tmp_path / "other.h5", "--data", data / "test.h5"]
    result = runner.invoke(app, [str(a) for a in [*args, "--report", tmp_path / "rep"]])
    assert isinstance(result.exception, BankMismatch) and not (tmp_path / "rep").exists()  # no empty report left
    args = ["classify", "--model", data / "run", "--bank", tmp_path / "other.h5", "--data", data / "test.h5"]
    result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "x.csv"]])  # the run, not its model
    assert isinstance(result.exception, UserError) and str(result.exception) == (
        f"{data / 'run'} is a training run: export it first (`lcls-hitfinder export {data / 'run'} --out MODEL.onnx`)"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--run", "r", "--model", "m.onnx"], "--run evaluates a CNN baseline on its own"),
        (["--model", "m.onnx", "--bank", "b.h5", "--per-class", "7"], "--per-class draws each sample's bank from"),
    ],
)
def test_evaluate_refuses_options_it_would_ignore(tmp_path: Path, extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["evaluate", "--data", "x.h5", "--report", str(tmp_path / "rep"), *extra])
    assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    "extra",
    [
        "",
        'per_structure = true\nnegatives = "own-structure"\naux_weight = 0.5\n',
        'per_structure = true\nnegatives = "both"\n',
    ],
    ids=["plain", "own-aux", "both"],
)
def test_resume_continues_exactly(data: Path, tmp_path: Path, extra: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[train]\nlr_schedule = "constant"\n{extra}')
    common = ["--data", data / "train.h5", "--val", data / "val.h5", "--config", cfg, *TINY]
    invoke("train", "twin", *common, "--out", tmp_path / "straight")
    invoke("train", "twin", *common, "--out", tmp_path / "resumed", "--epochs", "1")
    invoke("train", "twin", "--out", tmp_path / "resumed", "--resume", "--epochs", "2")
    a = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    assert any(k.startswith("aux.") for k in a) == ("aux_weight" in extra)  # the auxiliary head resumes with the run
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    history = json.loads((tmp_path / "resumed" / "run.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_the_seed_decides_the_run(data: Path, tmp_path: Path) -> None:
    """Seeded: the same --seed trains the same weights, another seed other weights (initialisation, batches,
    augmentation all drawn from it)."""
    common = ["--data", data / "train.h5", "--val", data / "val.h5", "--epochs", "1", *TINY[2:]]
    weights = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        invoke("train", "twin", *common, "--out", tmp_path / name, "--seed", seed)
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert weights["a"].keys() == weights["c"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_a_run_resumes_on_another_machine_and_a_damaged_checkpoint_is_one_line(data: Path, tmp_path: Path) -> None:
    """--device and --threads say where a resumed run runs (a CUDA run goes on on a laptop); a checkpoint
    truncated (a disk filled up) is a one-line error, not a traceback."""
    invoke("train", "twin", "--data", data / "train.h5", "--val", data / "val.h5", "--out", tmp_path / "r", *TINY[:4])
    before = torch.get_num_threads()
    try:
        invoke(
            "train", "twin", "--out", tmp_path / "r", "--resume", "--epochs", "3", "--device", "cpu", "--threads", "2"
        )
        assert torch.get_num_threads() == 2  # trained so, not only recorded (the trainer sets torch's threads)
    finally:
        torch.set_num_threads(before)  # not for the tests after this one
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert len(run["history"]) == 3 and run["settings"]["threads"] == 2 and run["settings"]["device"] == "cpu"
    checkpoint = tmp_path / "r" / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    for args in (["train", "twin", "--out", tmp_path / "r", "--resume", "--epochs", "4"], ["export", tmp_path / "r"]):
        result = runner.invoke(
            app, [str(a) for a in [*args, *(["--out", tmp_path / "m.onnx"] if "export" in args else [])]]
        )
        assert isinstance(result.exception, UserError), result.output
        assert f"cannot read {checkpoint}" in str(result.exception)


class Stopped(Exception):
    """A kill, at a chosen point of saving an epoch."""


def test_a_run_stopped_between_its_files_resumes_exactly(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the checkpoint of epoch 2 was written and before run.json: the resumed run trains epoch 3,
    not epoch 2 once more, and ends as an uninterrupted one does."""
    common = ["--data", data / "train.h5", "--val", data / "val.h5", "--epochs", "3", *TINY[2:]]
    invoke("train", "twin", *common, "--out", tmp_path / "straight")
    write_run = train_module.write_run
    calls = []

    def stop_at_epoch_2(run_dir: Path, run: dict[str, object]) -> None:
        calls.append(run_dir)
        if len(calls) == 2:
            raise Stopped
        write_run(run_dir, run)

    monkeypatch.setattr(train_module, "write_run", stop_at_epoch_2)
    result = runner.invoke(app, [str(a) for a in ["train", "twin", *common, "--out", tmp_path / "stopped"]])
    assert isinstance(result.exception, Stopped)
    assert len(json.loads((tmp_path / "stopped" / "run.json").read_text())["history"]) == 1  # behind its checkpoint
    monkeypatch.setattr(train_module, "write_run", write_run)
    invoke("train", "twin", "--out", tmp_path / "stopped", "--resume")
    a = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "checkpoint.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    history = json.loads((tmp_path / "stopped" / "run.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_a_run_stopped_before_copying_out_its_best_weights_exports_and_resumes_them(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 2 is the best (validation scores 0.1, 0.9, 0.5, set here) and the run stops after its checkpoint,
    before model.safetensors is replaced: export ships epoch 2 (from the checkpoint), and the resumed run's
    model.safetensors holds epoch 2 though epoch 3 does not replace it."""
    validate = train_module.Trainer.validate

    def scored(self: train_module.Trainer) -> dict[str, object]:
        return {**validate(self), "selection": [0.1, 0.9, 0.5][len(self.run["history"])]}

    save_weights = train_module.save_weights

    def stop_at_best_of_epoch_2(net: torch.nn.Module, path: Path, *args: object, **kwargs: object) -> None:
        if path.name == "model.safetensors" and kwargs.get("metadata") == {"epoch": "2"}:
            raise Stopped
        save_weights(net, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module.Trainer, "validate", scored)
    monkeypatch.setattr(train_module, "save_weights", stop_at_best_of_epoch_2)
    run = tmp_path / "r"
    args = ["train", "twin", "--data", data / "train.h5", "--val", data / "val.h5", "--out", run, "--epochs", "3"]
    result = runner.invoke(app, [str(a) for a in [*args, *TINY[2:]]])
    assert isinstance(result.exception, Stopped)
    monkeypatch.setattr(train_module, "save_weights", save_weights)
    epoch_2 = {k: v for k, v in load_file(str(run / "checkpoint.safetensors")).items() if k.startswith("model.")}
    epoch_1 = load_file(str(run / "model.safetensors"))
    assert any(not torch.equal(epoch_1[k], epoch_2[k]) for k in epoch_2)

    def exported() -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in train_module.load_run(run)[2].state_dict().items()}

    for key, value in exported().items():
        torch.testing.assert_close(value, epoch_2[key], msg=key)
    invoke("train", "twin", "--out", run, "--resume")
    assert [h["epoch"] for h in json.loads((run / "run.json").read_text())["history"]] == [1, 2, 3]
    for key, value in load_file(str(run / "model.safetensors")).items():
        torch.testing.assert_close(value, epoch_2[key], msg=key)
    for key, value in exported().items():
        torch.testing.assert_close(value, epoch_2[key], msg=key)


def test_runs_without_a_checkpoint_or_of_an_older_version_export_and_are_not_overwritten(
    data: Path, model: Path, tmp_path: Path
) -> None:
    """A finished run whose checkpoint (the optimiser's moments) was deleted to save space exports from run.json
    and its best weights, and a new run refuses its folder; a run of an older version (no record in the
    checkpoint, no epoch on the best weights) exports and resumes from run.json."""
    invoke("export", data / "run", "--out", tmp_path / "m.onnx")
    kept = tmp_path / "kept"
    shutil.copytree(data / "run", kept)
    (kept / "checkpoint.safetensors").unlink()
    invoke("export", kept, "--out", tmp_path / "kept.onnx")
    assert file_hash(tmp_path / "kept.onnx") == file_hash(tmp_path / "m.onnx")
    best = (kept / "model.safetensors").read_bytes()
    args = ["train", "twin", "--data", data / "train.h5", "--val", data / "val.h5", "--out", kept, *TINY]
    result = runner.invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, UserError) and "already holds a run" in str(result.exception), result.output
    assert (kept / "model.safetensors").read_bytes() == best
    old = tmp_path / "old"
    shutil.copytree(data / "run", old)
    for name in ("checkpoint.safetensors", "model.safetensors"):  # as an older version wrote them: no metadata
        save_file(load_file(str(old / name)), str(old / name))
    invoke("export", old, "--out", tmp_path / "old.onnx")
    assert file_hash(tmp_path / "old.onnx") == file_hash(tmp_path / "m.onnx")
    invoke("train", "twin", "--out", old, "--resume", "--epochs", "3")
    assert len(json.loads((old / "run.json").read_text())["history"]) == 3


def test_data_that_cannot_teach_or_judge_is_refused(data: Path, model: Path, tmp_path: Path) -> None:
    """Training on one kind of pattern (no negative for any anchor), validating on the training file, an
    ensemble of one run twice, and a bank of singles alone (its scores weigh singles against nothing)."""
    batch = spheres(120, (48, 48), 9)
    only = batch.n_particles == 1
    singles = tmp_path / "singles.h5"
    with DatasetWriter(singles, (48, 48), np.ones((48, 48), bool), {"seed": 9}) as wr:
        wr.append(
            replace(
                batch,
                **{
                    f: getattr(batch, f)[only]
                    for f in ("images", "n_particles", "structure", "photons", "orientations", "positions")
                },
            )
        )
    no_singles = tmp_path / "no_singles.h5"
    with DatasetWriter(no_singles, (48, 48), np.ones((48, 48), bool), {"seed": 9}) as wr:
        wr.append(Batch(*(np.asarray(getattr(batch, f.name))[~only] for f in dataclasses.fields(Batch))))
    train = ["train", "twin", "--val", str(data / "val.h5"), *map(str, TINY[:4])]
    for args, message in [
        (
            ["train", "twin", "--data", str(data / "train.h5"), "--val", str(no_singles), "--out", str(tmp_path / "d")],
            f"{no_singles} holds no single hits: validation judges how singles are told apart",
        ),
        ([*train, "--data", str(singles), "--out", str(tmp_path / "a")], "holds one kind of pattern only"),
        ([*train, "--data", str(data / "val.h5"), "--out", str(tmp_path / "b")], "is the training data"),
        (
            ["train", "twin", "--data", str(data / "train.h5"), "--val", str(singles), "--out", str(tmp_path / "c")],
            f"{singles} holds single hits only: validation needs blanks or multi-hits",
        ),
        (
            ["export", str(data / "run"), str(data / "run") + "/", "--out", str(tmp_path / "e.onnx")],
            "must be different runs",
        ),
        (
            ["bank", "build", "--model", str(model), "--data", str(singles), "--out", str(tmp_path / "k.h5")],
            f"references from {singles}: a bank needs blank or multi-hit references beside",
        ),
    ]:
        result = runner.invoke(app, args)
        assert isinstance(result.exception, UserError) and message in str(result.exception), (args, result.output)
    for name in "abcd":
        assert not (tmp_path / name).exists()  # no empty run folder left behind


@pytest.mark.parametrize(
    ("kind", "flags", "message"),
    [
        ("twin", ["--arch", "vgg16"], "--arch: for `train cnn`, not `train twin`"),
        ("cnn", ["--embed-dim", "8", "--alpha", "0.5"], "--embed-dim, --alpha: for `train twin`, not `train cnn`"),
    ],
)
def test_flags_of_the_other_kind_of_model_are_refused(
    data: Path, tmp_path: Path, kind: str, flags: list[str], message: str
) -> None:
    """They would be recorded in run.json and do nothing; refused before a run directory is made."""
    args = ["train", kind, "--data", data / "train.h5", "--val", data / "val.h5", "--out", tmp_path / "r", *flags]
    result = runner.invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, UserError) and str(result.exception) == message, result.output
    assert not (tmp_path / "r").exists()


def test_ctrl_c_while_training_says_how_to_go_on_and_that_goes_on(data: Path, tmp_path: Path) -> None:
    """SIGINT once the first epoch is checkpointed (the real command): exit 130 and one line naming the resume
    command, which then finishes the run."""
    cli = str(Path(sys.executable).parent / "lcls-hitfinder")
    run, epochs = tmp_path / "r", ["--epochs", "40", *TINY[2:]]
    args = [cli, "train", "twin", "--data", str(data / "train.h5"), "--val", str(data / "val.h5"), "--out", str(run)]
    proc = subprocess.Popen([*args, *epochs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a deadline against hanging, never a speed requirement
        while not (run / "run.json").exists():  # written after the first epoch's checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"interrupted: `lcls-hitfinder train twin --out {run} --resume` continues the run" in err
    trained = json.loads((run / "run.json").read_text())["history"]
    assert 1 <= len(trained) < 40
    done = subprocess.run(
        [cli, "train", "twin", "--out", str(run), "--resume", "--epochs", str(len(trained) + 1)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and len(json.loads((run / "run.json").read_text())["history"]) == len(trained) + 1


def test_resume_refuses_data_that_changed_or_went(data: Path, tmp_path: Path) -> None:
    """A resumed run reads its data from the paths it recorded: a file replaced there since (other patterns)
    is refused, as is one that is gone, by name, rather than trained on or failing in h5py."""
    for name in ("train.h5", "val.h5"):
        shutil.copy(data / name, tmp_path / name)
    invoke(
        "train", "twin", "--data", tmp_path / "train.h5", "--val", tmp_path / "val.h5", "--out", tmp_path / "r", *TINY
    )
    resume = ["train", "twin", "--out", str(tmp_path / "r"), "--resume", "--epochs", "3"]
    shutil.copy(data / "test.h5", tmp_path / "train.h5")
    result = runner.invoke(app, resume)
    assert isinstance(result.exception, UserError) and str(result.exception) == (
        f"{tmp_path / 'train.h5'} is not the file the run in {tmp_path / 'r'} was trained on: its patterns changed"
    )
    shutil.copy(data / "train.h5", tmp_path / "train.h5")
    (tmp_path / "val.h5").rename(tmp_path / "moved.h5")
    result = runner.invoke(app, resume)
    assert isinstance(result.exception, UserError) and str(result.exception) == (
        f"the run in {tmp_path / 'r'} was trained on {tmp_path / 'val.h5'}, which is not there: put it back"
    )
    (tmp_path / "moved.h5").rename(tmp_path / "val.h5")
    assert runner.invoke(app, resume).exit_code == 0  # its own files again: it goes on


def test_resume_refuses_what_it_would_ignore(data: Path, tmp_path: Path) -> None:
    """A resumed run keeps its own data and settings: a flag that would be ignored, another kind, or no epoch
    left to train is an error, not a silent no-op."""
    invoke("train", "twin", "--data", data / "train.h5", "--val", data / "val.h5", "--out", tmp_path / "r", *TINY[:4])
    for args, message in [
        (["twin", "--batch-size", "32", "--data", "d.h5"], "leave out --batch-size, --data"),
        (["cnn"], "holds a twin run, not a cnn one"),
        (["twin", "--epochs", "2"], "has trained 2 epochs already: --epochs N with N > 2 extends it"),
    ]:
        result = runner.invoke(app, ["train", args[0], "--out", str(tmp_path / "r"), "--resume", *args[1:]])
        assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
    few_singles = tmp_path / "few.h5"  # 30 patterns, about 6 singles: the validation bank draws them all
    batch = spheres(30, (48, 48), 7)
    assert 0 < (batch.n_particles == 1).sum() <= 10
    with DatasetWriter(few_singles, (48, 48), np.ones((48, 48), bool), {"seed": 7}) as wr:
        wr.append(batch)
    args = ["train", "twin", "--data", str(data / "train.h5"), "--val", str(few_singles), "--out", str(tmp_path / "n")]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    assert "has no single hits beside the 10 per class its validation bank draws" in str(result.exception)
    assert not (tmp_path / "n" / "run.json").exists()  # refused before an epoch was spent
    invoke(*args, *TINY[:4], "--bank-per-class", "2")  # with a smaller bank some singles are left: it trains

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} in run.json is not JSON")

    history = json.loads((tmp_path / "n" / "run.json").read_text(), parse_constant=strict)["history"]
    assert all(h["selection"] is not None for h in history)


def test_cnn_baseline_trains_and_evaluates(data: Path, tmp_path: Path) -> None:
    args = ["--data", data / "train.h5", "--val", data / "val.h5", "--out", tmp_path / "cnn"]
    invoke("train", "cnn", *args, "--arch", "early3", "--cnn-width", "4", *TINY[:6], "--thumbnail", "32")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "examples.png").write_bytes(b"a twin's, from an earlier evaluation in this directory")
    invoke("evaluate", "--run", tmp_path / "cnn", "--data", data / "test.h5", "--report", tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["metrics.json", "metrics.md"]  # no stale plot
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["arch"] == "early3" and m["n"] == 150
    history = json.loads((tmp_path / "cnn" / "run.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it learned
    assert m["count_accuracy"] > 0.3  # above chance (0.2: counts 0-4 in equal shares); seeded, so not a flake
    adu = tmp_path / "adu.h5"  # the same patterns in ADU: judged in photons, as the CNN was trained
    with Dataset(data / "test.h5") as d:
        batch, shape, mask = d.read(slice(None)), d.shape, d.mask
        noise = {"noise": {"adu_gain": 4.0, "adu_offset": 20.0}}
        with DatasetWriter(adu, d.shape, d.mask, noise, units="adu") as wr:
            wr.append(replace(batch, images=batch.images * 4.0 + 20.0))
    out = invoke("evaluate", "--run", tmp_path / "cnn", "--data", adu, "--report", tmp_path / "rep_adu")
    assert json.loads((tmp_path / "rep_adu" / "metrics.json").read_text())["count_accuracy"] == m["count_accuracy"]
    assert "warning" not in out
    unseen = tmp_path / "unseen.h5"  # structures the CNN never saw: its structure head cannot be right
    with DatasetWriter(unseen, shape, mask, {}) as wr:
        wr.append(replace(batch, structure=np.where(batch.n_particles > 0, "capsid:9", "").astype(object)))
    out = invoke("evaluate", "--run", tmp_path / "cnn", "--data", unseen, "--report", tmp_path / "rep_unseen")
    assert f"warning: none of {unseen}'s structures is one the CNN was trained on" in " ".join(out.split())
    result = runner.invoke(app, ["export", str(tmp_path / "cnn"), "--out", str(tmp_path / "x.onnx")])
    assert isinstance(result.exception, UserError) and "only twin" in str(result.exception)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "siamese", "--data", "a", "--val", "b", "--out", "c"], "kind must be"),
        (["train", "twin", "--data", "/nonexistent.h5", "--val", "b", "--out", "c"], "does not exist"),
        (["train", "twin", "--data", "a", "--val", "b", "--out", "c", "--embed-dim", "300"], "embed_dim"),
        (["train", "twin", "--out", "/nonexistent", "--resume"], "nothing to resume"),
        (["train", "twin", "--out", "c"], "train needs --data and --val (or --resume for a run in --out)"),
        (["export", "/nonexistent", "--out", "x.onnx"], "does not exist"),
        (["evaluate", "--data", "x.h5", "--report", "r"], "needs --model and one of --bank or --refs"),
        (["train", "twin", "--data", "a", "--val", "b", "--out", "c", "--seed", "-1"], "train.seed"),
        (["train", "twin", "--data", "a", "--val", "b", "--out", "c", "--photons", "100"], "--photons must be LO,HI"),
        (["export", "missing.onnx", "--views", "2", "--out", "x.onnx"], "model missing.onnx does not exist"),
        (
            ["evaluate", "--model", "m.onnx", "--refs", "./t.h5", "--data", "t.h5", "--report", "r"],
            "--refs t.h5 is the file under test",  # ./t.h5 and t.h5: one file
        ),
        (
            ["bank", "build", "--model", "m.onnx", "--data", "r.h5", "--calibrate", "r.h5", "--out", "b.h5"],
            "--calibrate r.h5 is the file the references come from",
        ),
    ],
)
def test_bad_input_is_a_user_error(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the relative paths above: nothing may land in the repository
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError) and message in str(result.exception)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("fault", ["parity", "stopped"])
def test_a_refused_or_stopped_export_leaves_the_model_at_out_as_it_was(
    data: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Parity refused, or the export stopped between writing the plain model and its rotation-averaging
    form: the model already at --out (the one a service serves) is untouched and no temporary file stays."""
    from lcls_hitfinder.learn import export

    out = tmp_path / "served.onnx"
    invoke("export", data / "run", "--out", out, "--views", "2")
    before = out.read_bytes()
    if fault == "parity":
        monkeypatch.setattr(export, "parity", lambda *args: 1.0)
    else:

        def stop(*args: object) -> None:
            raise Stopped

        monkeypatch.setattr(export, "with_rotations", stop)
    for args in (["export", data / "run"], ["export", model]):
        result = runner.invoke(app, [str(a) for a in [*args, "--out", out, "--views", "4"]])
        expected = UserError if fault == "parity" else Stopped
        assert isinstance(result.exception, expected), result.output
        assert out.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["served.onnx"]


def test_onnx_matches_torch_on_real_thumbnails(data: Path, model: Path) -> None:
    from lcls_hitfinder.dataset import Dataset
    from lcls_hitfinder.learn.export import PARITY_TOLERANCE, parity
    from lcls_hitfinder.learn.train import load_run
    from lcls_hitfinder.preprocess import Preprocessor

    _, settings, net = load_run(data / "run")
    with Dataset(data / "test.h5") as d:
        thumbs = Preprocessor(settings.preprocess, d.mask, d.shape)(d.images(slice(0, 64))).numpy()
    assert parity(net, model, thumbs) <= PARITY_TOLERANCE
    # and measured here, not by export's own check: a batch size the export never traced (dynamic axis)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"thumbnail": thumbs[:37]})[0]
    with torch.no_grad():
        torch_out = net.eval()(torch.from_numpy(thumbs[:37])).numpy()
    assert onnx_out.shape == torch_out.shape and np.abs(onnx_out - torch_out).max() <= 1e-4


def test_space_to_depth_embedder_trains_and_exports_with_parity(data: Path, tmp_path: Path) -> None:
    """`unshuffle = 2`: 2 x 2 pixel blocks become 4 channels before the first conv; it exports (parity checked
    by export itself) and says so in the model's training summary."""
    from lcls_hitfinder.learn.nets import SpaceToDepth

    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(SpaceToDepth(2)(x), torch.nn.functional.pixel_unshuffle(x, 2))
    cfg = tmp_path / "u.toml"
    cfg.write_text("[train]\nunshuffle = 2\ndepth = 3\n")
    run, onnx = tmp_path / "run", tmp_path / "u.onnx"
    invoke("train", "twin", "--config", cfg, "--data", data / "train.h5", "--val", data / "val.h5", "--out", run, *TINY)
    invoke("export", run, "--out", onnx)
    info = read_model_info(onnx)
    assert info.summary["unshuffle"] == 2 and info.preprocess.thumbnail == 32
    cfg.write_text("[train]\nunshuffle = 2\ndepth = 3\nradial_rings = 8\nconvs = 2\n")  # rings and 2 convs a block
    run = tmp_path / "radial"
    invoke("train", "twin", "--config", cfg, "--data", data / "train.h5", "--val", data / "val.h5", "--out", run, *TINY)
    invoke("export", run, "--out", onnx)
    summary = read_model_info(onnx).summary
    assert summary["radial_rings"] == 8 and summary["convs"] == 2
    convs = [n for n in onnx_lib.load(str(onnx)).graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 + 3 * 2  # space to depth, then 3 blocks of 2
    cfg.write_text("[train]\nunshuffle = 4\n")  # 4 * 2^5 = 128 does not divide the 32-pixel thumbnail
    result = runner.invoke(
        app,
        [
            "train",
            "twin",
            "--config",
            str(cfg),
            "--data",
            str(data / "train.h5"),
            "--val",
            str(data / "val.h5"),
            "--out",
            str(tmp_path / "bad"),
            *TINY,
        ],
    )
    assert isinstance(result.exception, UserError) and "multiple of unshuffle * 2^(depth + 1) = 128" in str(
        result.exception
    )


def test_several_runs_export_as_one_ensemble_whose_distance_is_the_members_mean(
    data: Path, model: Path, tmp_path: Path
) -> None:
    """The ensemble's embedding is its members' concatenated, so under the RMS distance its squared distance
    is the mean of theirs: a bank built with it decides on the ensemble's mean distance."""
    import onnxruntime as ort

    from lcls_hitfinder.bank import pairwise_distance
    from lcls_hitfinder.model_io import INPUT_NAME
    from lcls_hitfinder.preprocess import Preprocessor

    train = ["train", "twin", "--data", data / "train.h5", "--val", data / "val.h5"]
    invoke(*train, "--out", tmp_path / "s2", *TINY, "--seed", "2")
    invoke("export", tmp_path / "s2", "--out", tmp_path / "s2.onnx")
    invoke("export", data / "run", tmp_path / "s2", "--out", tmp_path / "ens.onnx")
    info = read_model_info(tmp_path / "ens.onnx")
    assert info.embed_dim == 16 and info.summary["ensemble"] == 2
    assert [m["seed"] for m in info.summary["members"]] == [0, 2]

    with Dataset(data / "test.h5") as d:
        thumbs = Preprocessor(info.preprocess, d.mask, d.shape)(d.images(slice(0, 40))).numpy()

    def embed(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT_NAME: thumbs})[0]

    a, b, ens = embed(model), embed(tmp_path / "s2.onnx"), embed(tmp_path / "ens.onnx")
    np.testing.assert_allclose(ens, np.concatenate([a, b], axis=1), atol=1e-5)
    mean_sq = (pairwise_distance(a[:20], a[20:]) ** 2 + pairwise_distance(b[:20], b[20:]) ** 2) / 2
    np.testing.assert_allclose(pairwise_distance(ens[:20], ens[20:]) ** 2, mean_sq, rtol=1e-4, atol=1e-6)

    cfg = tmp_path / "sqrt.toml"
    cfg.write_text('[train.preprocess]\ntransform = "sqrt"\n')
    invoke(*train, "--config", cfg, "--out", tmp_path / "sqrt", *TINY)
    args = ["export", str(data / "run"), str(tmp_path / "sqrt"), "--out", str(tmp_path / "x.onnx")]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError) and "must share their preprocessing" in str(result.exception)
    assert not (tmp_path / "x.onnx").exists()
    invoke(*train, "--out", tmp_path / "d4", *TINY[:-2], "--embed-dim", "4")  # 4 against the others' 8
    result = runner.invoke(app, ["export", str(data / "run"), str(tmp_path / "d4"), "--out", str(tmp_path / "y.onnx")])
    assert isinstance(result.exception, UserError) and "must have one embedding dimension" in str(result.exception)
    assert not (tmp_path / "y.onnx").exists()


def test_export_averages_over_quarter_turns_inside_the_model(data: Path, model: Path, tmp_path: Path) -> None:
    """--views 2 embeds a thumbnail as the mean of the plain model's embeddings of it and of its quarter turn
    (numpy's rot90), made from the run or from the exported model alike; --views 4 is invariant to a quarter
    turn, which the plain model is not."""
    from lcls_hitfinder.model_io import INPUT_NAME
    from lcls_hitfinder.preprocess import Preprocessor

    with Dataset(data / "test.h5") as d:
        thumbs = Preprocessor(read_model_info(model).preprocess, d.mask, d.shape)(d.images(slice(0, 24))).numpy()
    turned = np.ascontiguousarray(np.rot90(thumbs, 1, axes=(2, 3)))

    def embed(path: Path, x: np.ndarray) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]

    invoke("export", data / "run", "--views", "2", "--out", tmp_path / "run2.onnx")
    out = invoke("export", model, "--views", "2", "--out", tmp_path / "m2.onnx")
    assert "averaged over 2 rotations" in out
    expected = (embed(model, thumbs) + embed(model, turned)) / 2
    for averaged in (tmp_path / "run2.onnx", tmp_path / "m2.onnx"):
        np.testing.assert_allclose(embed(averaged, thumbs), expected, atol=1e-5)
        info = read_model_info(averaged)
        assert info.views == 2 and info.summary["kind"] == "twin" and info.embed_dim == 8
        assert info.model_hash != file_hash(model)  # a bank of the plain model refuses it
    invoke("export", model, "--views", "4", "--out", tmp_path / "m4.onnx")
    np.testing.assert_allclose(embed(tmp_path / "m4.onnx", thumbs), embed(tmp_path / "m4.onnx", turned), atol=1e-5)
    assert np.abs(embed(model, thumbs) - embed(model, turned)).max() > 1e-3

    for args, message in [
        (["--views", "3", "--out", tmp_path / "x.onnx"], "views must be one of 1, 2, 4, not 3"),
        (["--out", tmp_path / "x.onnx"], "is already exported: give --views 2 or 4"),
        (["--views", "2", "--out", model], "is the model itself"),
    ]:
        result = runner.invoke(app, [str(a) for a in ["export", model, *args]])
        assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
    args = ["export", str(tmp_path / "m2.onnx"), "--views", "2", "--out", str(tmp_path / "x.onnx")]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError) and "already averages over 2 rotations" in str(result.exception)
    result = runner.invoke(app, ["export", str(data / "run"), "--views", "3", "--out", str(tmp_path / "y.onnx")])
    assert isinstance(result.exception, UserError) and not (tmp_path / "y.onnx").exists()
    assert not (tmp_path / "x.onnx").exists()


def test_settings_and_masks_that_cannot_work_are_refused() -> None:
    from lcls_hitfinder.evaluate import hit_metrics
    from lcls_hitfinder.learn.settings import TrainSettings
    from lcls_hitfinder.preprocess import Preprocessor, PreprocessSettings
    from lcls_hitfinder.protocols import Decisions

    assert TrainSettings.model_validate({"augment": {"photons": "data"}}).augment.photons is None  # TOML: no null
    with pytest.raises(UserError, match="the mask marks every pixel bad"):
        Preprocessor(PreprocessSettings(thumbnail=32), np.zeros((48, 48), bool), (48, 48))
    none_kept = Decisions(
        label=np.array([Label.MULTI] * 3),
        keep=np.zeros(3, bool),
        score=np.array([-0.5, -0.2, -0.1]),
        distance=np.ones(3),
        n_particles=np.array([2, 2, 2]),
    )
    m = hit_metrics(np.array([1, 2, 2]), none_kept)
    assert np.isnan(m["precision"]) and m["recall"] == 0.0  # nothing kept: precision undefined, not 0


def test_cuda_is_used_when_present_and_refused_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    from lcls_hitfinder.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match=r"^train\.device is cuda but torch sees no CUDA device$"):
        resolve_device("cuda", "train.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA mocked: only the choice is tested
    assert resolve_device("auto").type == "cuda" and resolve_device("cpu").type == "cpu"


def test_training_says_when_validation_shares_patterns_with_training(data: Path, tmp_path: Path) -> None:
    """A validation file simulated with the training file's seed: validation would judge what was trained on."""
    short = ["--epochs", "1", "--steps-per-epoch", "2", *TINY[4:]]
    same = write(tmp_path / "val_same_seed.h5", 100, 1)
    said = f"patterns of {same} are also in {data / 'train.h5'}, pixel for pixel (validation would judge"
    assert said in invoke("train", "twin", "--data", data / "train.h5", "--val", same, "--out", tmp_path / "a", *short)
    apart = ["--data", data / "train.h5", "--val", data / "val.h5", "--out", tmp_path / "b", *short]
    assert "pixel for pixel" not in invoke("train", "twin", *apart)

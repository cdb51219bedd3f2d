"""The service end to end with real parts: exported ONNX models in onnxruntime, HDF5 sources, ZeroMQ
PUB/SUB sockets over TCP, decision logs, and `lcls-hitfinder serve` itself in a subprocess."""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import pytest
import torch
import zmq
from prometheus_client import generate_latest
from threadpoolctl import threadpool_info, threadpool_limits
from tiny_model import free_port, log_rows
from typer.testing import CliRunner

from lcls_hitfinder import embedder as embedder_module
from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.cli import app
from lcls_hitfinder.dataset import Batch, Dataset, DatasetWriter
from lcls_hitfinder.embedder import OnnxEmbedder
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.frame_file import FrameFile
from lcls_hitfinder.labels import Label, label_of_count
from lcls_hitfinder.learn.nets import TwinEmbedder
from lcls_hitfinder.learn.train import load_patterns
from lcls_hitfinder.model_io import export_onnx
from lcls_hitfinder.preprocess import PhotonCalibration, Preprocessor, PreprocessSettings
from lcls_hitfinder.protocols import EventId, Frame, RunEnd
from lcls_hitfinder.service import pipeline as pipeline_module
from lcls_hitfinder.service.bank_reload import ReloadingBank
from lcls_hitfinder.service.binning import ReaderBinning
from lcls_hitfinder.service.client import DecisionClient
from lcls_hitfinder.service.decision_log import read_decision_log
from lcls_hitfinder.service.log_writer import ChildLog
from lcls_hitfinder.service.messages import DECISION, FIELDS, HEARTBEAT, RUN, SCHEMA_VERSION
from lcls_hitfinder.service.metrics import ServiceMetrics
from lcls_hitfinder.service.pipeline import Pipeline
from lcls_hitfinder.service.publish import ZmqPublisher
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import open_source
from lcls_hitfinder.service.sources.h5 import recorded_calibration
from lcls_hitfinder.verdicts import OVERFLOW

REPO = Path(__file__).resolve().parents[1]
LCLS_HITFINDER = [str(Path(sys.executable).parent / "lcls-hitfinder")]
SIDE = 64
WAIT_S = 60.0  # a deadline against hanging, never a speed requirement


def _patterns(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Blank-ish noise, one bright ring (single) or two (multi): different enough for a tiny model."""
    counts = rng.integers(0, 3, n)
    y, x = np.mgrid[:SIDE, :SIDE] - SIDE / 2
    r = np.hypot(y, x)
    images = rng.poisson(0.2, (n, SIDE, SIDE)).astype(np.float32)
    for i, c in enumerate(counts):
        for k in range(c):
            images[i] += rng.poisson(30 * np.exp(-((r - 8 - 12 * k) ** 2) / 8))
    return images, counts


def _write_dataset(path: Path, images: np.ndarray, counts: np.ndarray) -> Path:
    n = len(images)
    with DatasetWriter(path, (SIDE, SIDE), np.ones((SIDE, SIDE), bool), {"seed": 0}) as w:
        w.append(
            Batch(
                images,
                counts.astype(np.int8),
                np.full(n, "test", object),
                images.sum((1, 2)),
                np.zeros((n, 4, 4), np.float32),
                np.zeros((n, 4, 3), np.float32),
            )
        )
    return path


@dataclass
class Fixtures:
    model: Path
    bank: Path
    data: Path
    other_model: Path


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    """A tiny exported embedder, a bank built from its embeddings of labelled patterns, and test data."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("service")
    info = export_onnx(TwinEmbedder(8, 4, 2), PreprocessSettings(thumbnail=16), d / "model.onnx")
    other = export_onnx(TwinEmbedder(8, 4, 3), PreprocessSettings(thumbnail=16), d / "other.onnx")
    rng = np.random.default_rng(0)
    ref_images, ref_counts = _patterns(rng, 60)
    pre = Preprocessor(info.preprocess, None, (SIDE, SIDE))
    emb = OnnxEmbedder(info.path).embed(pre(ref_images))
    ReferenceBank(emb, ref_counts, info.model_hash, k=3).save(d / "bank.h5")
    images, counts = _patterns(rng, 40)
    return Fixtures(info.path, d / "bank.h5", _write_dataset(d / "data.h5", images, counts), other.path)


def _settings(tmp_path: Path, **kw: Any) -> ServeSettings:
    base: dict[str, Any] = {
        "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.2},
        "metrics": {"port": None},
        "prefilter": {"kind": "none"},
        "batch": {"max_size": 8, "max_wait_ms": 2},
        "log_dir": tmp_path / "logs",
        "bank_poll_s": 0.1,
    }
    base.update(kw)
    return ServeSettings.model_validate(base)


class ListSource:
    """A source of given frames, in memory: for frames no file format can hold (mixed shapes, dtypes).

    Each frame is lent as a psana reader lends its ring slots: `released` counts the hand-backs per event,
    and with `scribble` a released frame's pixels are overwritten (NaN, or the dtype's maximum), as the
    reader's next frame would overwrite its slot.
    """

    def __init__(self, arrays: list[np.ndarray], scribble: bool = False, runs: list[int] | None = None) -> None:
        self.uri = "list:"
        self.runs = runs or [7] * len(arrays)  # each frame's run
        self.frame_shape: tuple[int, ...] | None = None
        self.mask: np.ndarray | None = None
        self.restarts = 0
        self.reader_processes = 0
        self.stamps_events = False
        self.arrays = arrays
        self.scribble = scribble
        self.released: Counter[int] = Counter()

    def open(self) -> None:
        pass

    def _release(self, i: int) -> None:
        self.released[i] += 1
        a = self.arrays[i]
        if self.scribble and a.dtype.kind in "uif":
            a[...] = np.nan if a.dtype.kind == "f" else np.iinfo(a.dtype).max

    def frames(self) -> Iterator[Frame | None]:
        for i, a in enumerate(self.arrays):
            release = functools.partial(self._release, i)
            yield Frame(EventId("mem", self.runs[i], i, 0), a, time.perf_counter_ns(), None, on_release=release)

    def close(self) -> None:
        pass


@dataclass
class Running:
    pipeline: Pipeline
    publisher: ZmqPublisher
    metrics: ServiceMetrics
    bank: ReloadingBank


def _start(settings: ServeSettings, source: Any, model: Path, bank: Path) -> Running:
    publisher = ZmqPublisher(settings.publish.endpoint, settings.publish.sndhwm)
    metrics = ServiceMetrics()
    embedder = OnnxEmbedder(model)
    reloading = ReloadingBank(bank, embedder, metrics)
    source.open()
    pipeline = Pipeline(settings, source, embedder, reloading, publisher, metrics)
    return Running(pipeline, publisher, metrics, reloading)


def _collect_run(client: DecisionClient) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decisions up to the run end message."""
    decisions: list[dict[str, Any]] = []
    for topic, payload in client.messages():
        if topic == DECISION:
            decisions.append(payload)
        elif topic == RUN and payload["phase"] == "end":
            return decisions, payload
    raise AssertionError(f"no run end within {WAIT_S} s; got {len(decisions)} decisions")


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _serve_one_run(
    fx: Fixtures, settings: ServeSettings, source: Any = None
) -> tuple[list[dict[str, Any]], dict[str, Any], Running]:
    """The decisions and the run end message of serving `source` (default `settings.source`) to its end, with
    a subscriber."""
    r = _start(settings, source or open_source(settings.source, settings), fx.model, fx.bank)
    with DecisionClient(r.publisher.endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client:
        assert r.publisher.wait_for_subscriber(WAIT_S)
        r.pipeline.start()
        decisions, end = _collect_run(client)
        assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert client.gaps == []
    return decisions, end, r


def test_subscriber_gets_every_decision_equal_to_offline_classify(fx: Fixtures, tmp_path: Path) -> None:
    decisions, end, _ = _serve_one_run(fx, _settings(tmp_path, source=f"h5:{fx.data}"))

    with Dataset(fx.data) as d:
        n, truth = len(d), d.n_particles
    assert [m["seq"] for m in decisions] == list(range(n))
    assert [m["event"] for m in decisions] == list(range(n))
    assert [m["truth_n_particles"] for m in decisions] == truth.tolist()
    assert end["events"] == n and sum(end["counts"].values()) == n  # and no gap (_serve_one_run)

    # the same frames through `classify` (training's preprocessing + the same embedder + bank), offline
    offline = _classify(fx, fx.data, tmp_path / "classify.csv")
    assert [m["label"] for m in decisions] == [row["label"] for row in offline]
    np.testing.assert_allclose([m["score"] for m in decisions], [float(r["score"]) for r in offline], atol=1e-4)
    assert len({m["label"] for m in decisions}) > 1, "a test where every label is the same proves little"


def test_a_subscriber_tells_a_restarted_service_by_its_instance(fx: Fixtures, tmp_path: Path) -> None:
    """Two services one after the other on one endpoint, as systemd restarts one: a subscriber that stays
    connected (and reading: ZeroMQ reconnects a SUB socket, and subscribes again, only while it is used) follows
    both, every message of each carries that service's own instance, and the second is counted as a restart
    with nothing lost (the log of each run names its instance too)."""
    publish = {"endpoint": f"tcp://127.0.0.1:{free_port()}", "heartbeat_s": 0.2}
    settings = _settings(tmp_path, source=f"h5:{fx.data}", publish=publish)
    services: list[Running] = []
    with DecisionClient(settings.publish.endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client:
        heard: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        reading = threading.Thread(target=lambda: heard.extend(_collect_run(client) for _ in range(2)))
        reading.start()
        for _ in range(2):
            r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
            assert r.publisher.wait_for_subscriber(WAIT_S)
            r.pipeline.start()
            assert r.pipeline.wait(WAIT_S)
            _wait_until(lambda: len(heard) == len(services) + 1, "the run's end at the subscriber")
            r.publisher.close()
            services.append(r)
        reading.join(WAIT_S)
    for r, (decisions, end) in zip(services, heard, strict=True):
        assert {m["instance"] for m in decisions} == {end["instance"]} == {r.pipeline.instance}
        assert len(decisions) == end["events"] > 0
        assert read_decision_log(r.pipeline.logs[0])[1]["instance"] == r.pipeline.instance
    assert services[0].pipeline.instance != services[1].pipeline.instance
    assert client.tracker.restarts == 1 and client.gaps == []


def _classify(fx: Fixtures, data: Path, out: Path, *more: str) -> list[dict[str, str]]:
    args = ["classify", "--model", str(fx.model), "--bank", str(fx.bank), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *more])
    assert result.exit_code == 0, result.output
    with out.open() as f:
        return list(csv.DictReader(f))


def test_a_cxi_file_of_raw_adu_is_classified_offline_as_serve_decides_it(fx: Fixtures, tmp_path: Path) -> None:
    """No labels, raw uint16 ADU, a CXI mask: `classify --config` with the service's calibration gives the
    service's answers on `h5:` (one reader, one preprocessing, the file's mask)."""
    gain, offset = 2.0, 10.0
    with Dataset(fx.data) as d:
        photons = d.images()
    assert (photons == np.round(photons)).all()  # whole photons: the ADU hold them exactly
    bad = np.zeros(photons.shape[1:], np.uint16)
    bad[:, 20:24] = 1  # a dead stripe (CXI: non-zero = bad)
    cxi, unmasked = tmp_path / "run.cxi", tmp_path / "unmasked.cxi"
    for path in (cxi, unmasked):
        with h5py.File(path, "w") as f:
            f["/entry_1/data_1/data"] = np.round(photons * gain + offset).astype(np.uint16)
            if path == cxi:
                f["/entry_1/instrument_1/detector_1/mask"] = bad
    config = tmp_path / "serve.toml"
    config.write_text(f"[serve.calibration]\ngain = {gain}\noffset = {offset}\n")
    settings = _settings(tmp_path, source=f"h5:{cxi}", calibration={"gain": gain, "offset": offset})
    decisions, _, _ = _serve_one_run(fx, settings)
    offline = _classify(fx, cxi, tmp_path / "cxi.csv", "--config", str(config))
    without_mask = _classify(fx, unmasked, tmp_path / "unmasked.csv", "--config", str(config))
    labels = [d["label"] for d in decisions]
    assert labels == [row["label"] for row in offline]
    scores = [d["score"] for d in decisions]
    np.testing.assert_allclose(scores, [float(r["score"]) for r in offline], atol=1e-4)
    assert np.abs(np.array(scores) - [float(r["score"]) for r in without_mask]).max() > 1e-3  # the mask counted
    assert len(set(labels)) > 1 and {d["truth_n_particles"] for d in decisions} == {None}


def test_a_calibration_that_contradicts_the_file_and_a_cxi_mask_of_good_pixels_are_said(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's config (gain 10, offset 100) used on a dataset that records photons: `classify` and `serve` on
    `h5:` apply it, as asked, and say that it contradicts the file. A CXI mask that flags most pixels bad (a
    psana pixel_mask, 1 = good, given as CXI's non-zero = bad) is said when the file is opened."""
    config = tmp_path / "serve.toml"
    config.write_text("[serve.calibration]\ngain = 10\noffset = 100\n")
    said = f"{fx.data} records its images in photons; the configured [serve.calibration] (gain 10, offset 100)"
    classify = ["classify", "--model", fx.model, "--bank", fx.bank, "--data", fx.data, "--out", tmp_path / "c.csv"]
    for more, expected in ((["--config", config], True), ([], False)):
        result = CliRunner().invoke(app, [str(a) for a in [*classify, *more]])
        assert result.exit_code == 0 and (f"warning: {said}" in result.output) == expected, result.output
    settings = _settings(tmp_path, source=f"h5:{fx.data}", calibration={"gain": 10, "offset": 100})
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.service.sources.h5"):
        source = open_source(settings.source, settings)
        assert recorded_calibration(settings, source) is settings  # not opened (a stop while starting): unchecked
        assert caplog.messages == []
        source.open()
        assert recorded_calibration(settings, source) is settings
        source.close()
    assert any(m.startswith(said) for m in caplog.messages), caplog.messages

    good = np.ones((SIDE, SIDE), np.uint8)
    good[:, 20:24] = 0  # psana's convention: 1 = good
    with h5py.File(tmp_path / "run.cxi", "w") as f:
        f["/entry_1/data_1/data"] = np.zeros((2, SIDE, SIDE), np.uint16)
        f["/entry_1/data_1/mask"] = good
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.frame_file"), FrameFile(tmp_path / "run.cxi", "x"):
        pass
    assert any("marks 94% of the pixels bad" in m for m in caplog.messages), caplog.messages
    good[...] = 0  # a CXI mask, 0 = good
    with h5py.File(tmp_path / "run.cxi", "r+") as f:
        f["/entry_1/data_1/mask"][...] = good
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.frame_file"), FrameFile(tmp_path / "run.cxi", "x"):
        pass
    assert caplog.messages == []


def test_files_held_apart_by_name_that_share_patterns_are_said(fx: Fixtures, tmp_path: Path) -> None:
    """Two files simulated with the same seed share their first patterns: `evaluate --refs` and `bank build
    --calibrate` say how many (pixel for pixel), and say nothing of files that share none."""
    images, counts = _patterns(np.random.default_rng(5), 40)
    images[[0, 30]] = 0.0  # blanks of a noise-free simulation, alike in every file: no sign of a shared seed
    refs = _write_dataset(tmp_path / "refs.h5", images[:25], counts[:25])
    data = _write_dataset(tmp_path / "data.h5", images[15:], counts[15:])
    said = f"warning: 10 patterns of {data} are also in {refs}, pixel for pixel"
    evaluate = ["evaluate", "--model", fx.model, "--refs", refs, "--data", data, "--report", tmp_path / "r"]
    build = ["bank", "build", "--model", fx.model, "--data", refs, "--calibrate", data, "--out", tmp_path / "b.h5"]
    for args in (evaluate, build):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0 and said in result.output, result.output
    apart = _write_dataset(tmp_path / "apart.h5", images[25:], counts[25:])
    result = CliRunner().invoke(app, [str(a) for a in [*evaluate[:5], "--data", apart, "--report", tmp_path / "s"]])
    assert result.exit_code == 0 and "pixel for pixel" not in result.output, result.output


def test_frames_with_nan_or_inf_are_errors_offline_as_in_serve(fx: Fixtures, tmp_path: Path) -> None:
    with Dataset(fx.data) as d:
        frames = d.images()
    frames[3, 5, 7] = np.nan
    frames[4] = np.inf
    cxi = tmp_path / "run.cxi"
    with h5py.File(cxi, "w") as f:
        f["/entry_1/data_1/data"] = frames
    decisions, _, _ = _serve_one_run(fx, _settings(tmp_path, source=f"h5:{cxi}"))
    offline = _classify(fx, cxi, tmp_path / "cxi.csv")
    labels = [d["label"] for d in decisions]
    assert labels == [row["label"] for row in offline]
    assert [i for i, label in enumerate(labels) if label == "error"] == [3, 4]
    assert offline[3]["keep"] == "false" and offline[3]["score"] == "nan"


def test_a_bank_of_references_picked_with_another_calibration_is_said(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """References picked from raw frames with one [serve.calibration] are in photons of that calibration: the
    bank built from them records it, and a service converting with another says so (at start and at each
    bank taken), since every decision would be off with nothing else to show it."""
    with Dataset(fx.data) as d:
        frames, counts = d.images(), d.n_particles
    cxi = tmp_path / "run.cxi"
    with h5py.File(cxi, "w") as f:
        f["/entry_1/data_1/data"] = (frames * 10.0 + 100.0).round().astype(np.uint16)
    node = tmp_path / "node.toml"
    node.write_text("[serve.calibration]\ngain = 10.0\noffset = 100.0\n")
    picks = tmp_path / "picks.csv"
    picks.write_text("event,n_particles\n" + "".join(f"{i},{int(c)}\n" for i, c in enumerate(counts[:40])))
    refs, bank = tmp_path / "refs.h5", tmp_path / "bank.h5"
    for args in (
        ["bank", "pick", "--source", f"h5:{cxi}", "--picks", picks, "--config", node, "--out", refs],
        ["bank", "build", "--model", fx.model, "--data", refs, "--per-class", "2", "--out", bank],
    ):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    assert ReferenceBank.load(bank).picked_with == {"gain": 10.0, "offset": 100.0, "threshold": 0.0}
    assert ReferenceBank.load(fx.bank).picked_with is None  # simulated references
    reloading = ReloadingBank(bank, OnnxEmbedder(fx.model), ServiceMetrics())
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.service.bank_reload"):
        reloading.serve_with(PhotonCalibration(gain=10.0, offset=100.0))
        assert caplog.messages == []
        reloading.serve_with(PhotonCalibration())
        said = "picked with [serve.calibration] gain 10, offset 100, threshold 0; this service converts with gain 1"
        assert len(caplog.messages) == 1 and said in caplog.messages[0]
        caplog.clear()
        picked = shutil.copyfile(bank, tmp_path / "picked.h5")
        os.replace(shutil.copyfile(fx.bank, tmp_path / "next.h5"), bank)  # simulated references: nothing to say
        assert reloading.reload() and caplog.messages == []
        os.replace(picked, bank)  # the picked ones again, taken while serving
        assert reloading.reload() and len(caplog.messages) == 1 and said in caplog.messages[0]
    serve = [*LCLS_HITFINDER, "serve", "--model", str(fx.model), "--bank", str(bank), "--metrics-port", "0"]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for config, warned in ((node, False), (None, True)):  # the run's frames as picked, then with no calibration
        more = ["--source", f"h5:{cxi}", "--publish", endpoint, *(["--config", str(config)] if config else [])]
        proc = subprocess.run([*serve, *more], capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (said in proc.stderr) == warned, proc.stderr


def test_a_dataset_in_adu_is_decoded_with_its_own_gain_everywhere(fx: Fixtures, tmp_path: Path) -> None:
    """A dataset simulated in ADU records its gain and offset: `classify`, `evaluate`, training and `serve` on
    `h5:` decode it with them and answer as on the same patterns in photons, with no calibration configured."""
    gain, offset = 2.0, 10.0
    adu = tmp_path / "adu.h5"
    with (
        Dataset(fx.data) as d,
        DatasetWriter(adu, d.shape, d.mask, {"noise": {"adu_gain": gain, "adu_offset": offset}}, units="adu") as w,
    ):
        batch = d.read(slice(None))
        w.append(replace(batch, images=batch.images * gain + offset))
    photons = _classify(fx, fx.data, tmp_path / "photons.csv")
    assert len({row["label"] for row in photons}) > 1
    decoded = _classify(fx, adu, tmp_path / "adu.csv")
    assert [r["label"] for r in decoded] == [r["label"] for r in photons]
    np.testing.assert_allclose([float(r["score"]) for r in decoded], [float(r["score"]) for r in photons], atol=1e-4)

    reports = {}
    for name, path in (("photons", fx.data), ("adu", adu)):
        args = ["evaluate", "--model", fx.model, "--bank", fx.bank, "--data", path, "--report", tmp_path / name]
        assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
        reports[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert reports["adu"]["accuracy"] == reports["photons"]["accuracy"]
    np.testing.assert_allclose(load_patterns(adu).images, load_patterns(fx.data).images, atol=1e-4)
    (tmp_path / "picks.csv").write_text("event,n_particles\n2,1\n7,0\n")
    args = ["bank", "pick", "--source", f"h5:{adu}", "--picks", tmp_path / "picks.csv", "--out", tmp_path / "refs.h5"]
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    with Dataset(tmp_path / "refs.h5") as picked, Dataset(fx.data) as d:
        np.testing.assert_allclose(picked.images(), d.images()[[2, 7]], atol=1e-4)
    same = ["bank", "pick", "--source", f"h5:{adu}", "--picks", str(tmp_path / "picks.csv"), "--out", str(adu)]
    result = CliRunner().invoke(app, same)
    assert isinstance(result.exception, UserError) and "is the file the events are read from" in str(result.exception)
    (tmp_path / "picks.csv").write_text("timestamp,n_particles\n2,1\n")
    result = CliRunner().invoke(app, [str(a) for a in args])  # an h5: file's stamps are the time of reading
    assert isinstance(result.exception, UserError) and "pick them by event" in str(result.exception)

    command = [*LCLS_HITFINDER, "serve", "--model", str(fx.model), "--bank", str(fx.bank), "--metrics-port", "0"]
    endpoint, logs = f"tcp://127.0.0.1:{free_port()}", tmp_path / "logs"
    more = [
        "--source",
        f"h5:{adu}",
        "--publish",
        endpoint,
        "--log-dir",
        str(logs),
        "--config",
        str(tmp_path / "c.toml"),
    ]
    (tmp_path / "c.toml").write_text('[serve.prefilter]\nkind = "none"\n')
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.run([*command, *more], capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "holds ADU" in proc.stderr, proc.stdout + proc.stderr  # the log, on stderr
    assert proc.stdout == ""
    # not a terminal (journald, a file): one line per record, however long, with its level and time
    (line,) = [x for x in proc.stderr.splitlines() if "holds ADU" in x]
    assert str(adu) in line and " INFO " in line
    (log_file,) = logs.rglob("*.h5")
    columns, _ = read_decision_log(log_file)
    assert list(columns["label"]) == [r["label"] for r in photons]


def _served_unheard(fx: Fixtures, settings: ServeSettings) -> tuple[Running, dict[str, Any], dict[str, Any]]:
    """Serve settings.source to its end with no subscriber; the one run's log, read back."""
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    assert r.publisher.subscriptions == 0
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    (path,) = r.pipeline.logs
    return r, *read_decision_log(path)


@pytest.mark.parametrize(("frame_shape", "said"), [([8, SIDE, SIDE // 8], True), ([SIDE, SIDE], False)])
def test_a_bank_of_references_read_as_frames_of_another_shape_is_said(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture, frame_shape: list[int], said: bool
) -> None:
    """References picked as a panel stack and served as psana's assembled image (or the other way round) are
    other patterns to the bank: serve says so when it meets the frames, once per shape."""
    bank = ReferenceBank.load(fx.bank)
    bank.taken = {"frame_shape": frame_shape}
    bank.save(tmp_path / "bank.h5")
    settings = _settings(tmp_path, source=f"h5:{fx.data}", bank=tmp_path / "bank.h5")
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.service.pipeline"):
        r = _start(settings, open_source(settings.source, settings), fx.model, tmp_path / "bank.h5")
        r.pipeline.start()
        assert r.pipeline.wait(WAIT_S)
        r.publisher.close()
    warned = [m for m in caplog.messages if "taken otherwise" in m]
    expected = f"frames of {tuple(frame_shape)}, these of ({SIDE}, {SIDE})"
    assert (len(warned) == 1 and expected in warned[0]) if said else warned == [], caplog.messages


def test_the_queue_holds_a_gigabyte_of_frames_at_most(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve.queue_size (256) frames of a 4-megapixel detector from h5: took 4.6 GB (a review). A source that
    states its frames' shape gets a queue of QUEUE_BYTES of them at most (here made 20 frames' worth), never
    fewer than QUEUE_MIN_FRAMES, and decides every frame all the same; a psana source, whose frames wait in its
    ring, states none and keeps serve.queue_size."""
    from lcls_hitfinder.service import pipeline

    monkeypatch.setattr(pipeline, "QUEUE_BYTES", 20 * 4 * SIDE * SIDE)
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=3")
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    assert r.pipeline._frames.maxsize == 20
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert r.pipeline.total.events == 3 * 40
    monkeypatch.setattr(pipeline, "QUEUE_BYTES", 1)
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    assert r.pipeline._frames.maxsize == pipeline.QUEUE_MIN_FRAMES
    r.pipeline.source.close()
    r.publisher.close()
    r = _start(settings, ListSource([np.zeros((SIDE, SIDE), np.float32)]), fx.model, fx.bank)
    assert r.pipeline._frames.maxsize == settings.queue_size
    r.publisher.close()


def test_decision_log_holds_every_decision_without_subscribers(fx: Fixtures, tmp_path: Path) -> None:
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=3&run=12&experiment=xpptest")
    r, columns, attrs = _served_unheard(fx, settings)
    assert attrs["complete"] and attrs["events"] == 120 and attrs["ended"] == "source_end"
    assert columns["seq"].tolist() == list(range(120))
    assert columns["event"].tolist() == list(range(120))
    assert set(columns["experiment"]) == {"xpptest"} and set(columns["run"].tolist()) == {12}
    # what it holds is each event's decision: classify's on the same frames (3 passes over the file), scores too
    (tmp_path / "c.toml").write_text('[serve.prefilter]\nkind = "none"\n')  # as the service here
    rows = _classify(fx, fx.data, tmp_path / "p.csv", "--config", str(tmp_path / "c.toml"))
    assert columns["label"].tolist() == [row["label"] for row in rows] * 3 and len(set(columns["label"])) > 1
    np.testing.assert_allclose(columns["score"], [float(row["score"]) for row in rows] * 3, atol=1e-4)
    assert (columns["latency_us"] >= 0).all()
    exported = generate_latest(r.metrics.registry).decode()
    events = sum(
        r.metrics.events.labels(label=x.text, decision=d)._value.get() for x in Label for d in ("keep", "veto")
    )
    assert events == 120
    assert 'hitfinder_stage_duration_seconds_count{stage="infer"}' in exported
    assert 'hitfinder_build_info{device="cpu",' in exported  # where it preprocesses, beside the provider


def test_summary_of_a_runs_log_gives_its_numbers_a_csv_to_pick_from_and_a_picture(fx: Fixtures, tmp_path: Path) -> None:
    """`lcls-hitfinder summary LOG`: the run's counts, keep fraction and agreement with the truth as the log
    has them; the CSV's rows, labels corrected and cut to the sure ones, are picks `bank pick` reads."""
    from lcls_hitfinder.service.log_summary import summarise
    from lcls_hitfinder.service.pick import read_picks

    settings = _settings(tmp_path, source=f"h5:{fx.data}?run=12&experiment=xpptest")
    r, columns, _ = _served_unheard(fx, settings)
    (log_file,) = r.pipeline.logs
    out = tmp_path / "sum"
    args = ["summary", log_file, "--csv", out / "run.csv", "--plot", out / "run.png"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    labels = columns["label"].tolist()
    counts = ", ".join(f"{x.text} {labels.count(x.text)}" for x in Label)
    kept = int(np.sum(columns["decision"] == "keep"))
    assert (
        f"xpptest:12: {len(labels)} decisions, log complete: a file or simulation read to its end (source_end)"
        in result.output
    )
    assert f"labels: {counts}; kept {kept} ({100 * kept / len(labels):.1f}%)" in result.output
    truth = [label_of_count(int(t)).text for t in columns["truth_n_particles"]]
    agree = sum(t == x for t, x in zip(truth, labels, strict=True))
    assert f"agrees with the truth: {100 * agree / len(labels):.1f}% of {len(labels)} events" in result.output
    assert (out / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "run.csv").read_text().splitlines()
    assert rows[0] == "run,event,timestamp,label,score" and len(rows) == len(labels) + 1
    (tmp_path / "picks.csv").write_text("\n".join([rows[0], *rows[1:4]]) + "\n")  # three rows kept
    picks = read_picks(tmp_path / "picks.csv", timestamps=False)  # a dataset's h5: stamps events when read
    assert picks.key == "event" and set(picks.counts) == {(12, 0), (12, 1), (12, 2)}
    assert read_picks(tmp_path / "picks.csv", timestamps=True).key == "timestamp"  # psana's: the events' own
    with h5py.File(log_file, "r+") as f:  # as a run still being written has it
        f.attrs["complete"] = False
    still = CliRunner().invoke(app, ["summary", str(log_file)])
    assert f"{len(labels)} decisions, log still being written, or its service died" in still.output
    not_a_log = CliRunner().invoke(app, ["summary", str(fx.model)])  # a UserError: one line, exit 2 from main
    assert isinstance(not_a_log.exception, UserError) and "is not a decision log" in str(not_a_log.exception)
    folder = CliRunner().invoke(app, ["summary", str(settings.log_dir)])  # the log folder, not a log
    assert isinstance(folder.exception, UserError) and str(folder.exception) == (
        f"{settings.log_dir} is a folder: give runs' decision logs (the newest of its 1: {log_file}; or "
        f"{settings.log_dir}/*.h5)"
    )
    both = CliRunner().invoke(app, ["summary", str(log_file), str(log_file), "--csv", str(out / "both.csv")])
    assert both.exit_code == 0 and both.output.count(f"xpptest:12: {len(labels)} decisions") == 2, both.output
    assert len((out / "both.csv").read_text().splitlines()) == 2 * len(labels) + 1  # every run's events
    one_picture = CliRunner().invoke(app, ["summary", str(log_file), str(log_file), "--plot", str(out / "b.png")])
    assert str(one_picture.exception) == "--plot pictures one run: give one log, not 2"
    p50, p99 = np.percentile(columns["latency_us"], [50, 99]) / 1e3
    assert f"latency p50 {p50:.2f} ms, p99 {p99:.2f} ms" in result.output
    assert "gap(s) in seq" not in result.output
    lost = np.r_[0:5, 7:20, 25 : len(labels)]  # the rows of a log that lost events 5-6 and 20-24
    lines = summarise({k: v[lost] for k, v in columns.items()}, read_decision_log(log_file)[1]).lines()
    assert "2 gap(s) in seq: the log lost decisions (see the service's log)" in lines


def test_a_run_cut_short_by_max_events_says_so(fx: Fixtures, tmp_path: Path) -> None:
    """The log is complete (closed with its totals) either way; `ended` tells a whole run from a cut one."""
    _, columns, attrs = _served_unheard(fx, _settings(tmp_path, source=f"h5:{fx.data}?repeat=0", max_events=7))
    assert attrs["complete"] and attrs["events"] == 7 and attrs["ended"] == "max_events"
    assert columns["seq"].tolist() == list(range(7))


@pytest.mark.parametrize(
    "failure",
    [
        "CUDA error: an illegal memory access was encountered",  # torch
        "[ONNXRuntimeError] : 1 : FAIL : CUBLAS failure 13: CUBLAS_STATUS_EXECUTION_FAILED ; GPU=0",
        "[ONNXRuntimeError] : 1 : FAIL : CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR ; GPU=0",
        "CUDA driver error: an illegal instruction was encountered",  # torch's driver API
        "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",  # torch
        "[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT EP execution context enqueue failed.",
    ],
)
def test_a_failed_gpu_stops_the_service_with_an_error(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A CUDA runtime error (simulated: no GPU here) leaves the device context unusable, so every later batch
    would fail too: the batch becomes error decisions, and the service stops with the error (to be restarted)
    instead of deciding `error` for ever. Another failure of one batch stays that batch's."""
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=0")
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    embed, calls = r.pipeline.embedder.embed, []

    def failing(thumbnails: Any) -> np.ndarray:
        calls.append(len(thumbnails))
        if len(calls) == 2:
            raise ValueError("one odd batch")
        if len(calls) == 4:
            raise RuntimeError(failure)
        return embed(thumbnails)

    monkeypatch.setattr(r.pipeline.embedder, "embed", failing)
    r.pipeline.start()
    try:
        assert r.pipeline.wait(WAIT_S)  # a source without end: only the failed GPU ends it
    finally:
        r.pipeline.stop()
        r.pipeline.wait(WAIT_S)
        r.publisher.close()
    assert isinstance(r.pipeline.error, RuntimeError) and str(r.pipeline.error) == failure
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    reasons = [str(x) for x in columns["reason"] if str(x).startswith("internal")]
    assert any("ValueError: one odd batch" in x for x in reasons) and any(failure in x for x in reasons)
    assert attrs["complete"] and columns["seq"].tolist() == list(range(len(columns["seq"])))


def test_running_out_of_gpu_memory_is_not_taken_for_a_broken_gpu() -> None:
    """The next batch may fit: that one batch is errors, and the service goes on."""
    from lcls_hitfinder.service.pipeline import _GPU_FAILED

    assert not _GPU_FAILED.search("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total)")
    assert not _GPU_FAILED.search("one odd batch: a CUDA tensor was expected")


def test_a_dead_publisher_stops_the_service_with_an_error(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher's thread ends (here: made to fail on a subscription): no message would go out again while
    the metrics count decisions, so the service stops with an error (systemd restarts it); the log has all."""
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=0&rate=200")
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)

    def broken(message: bytes) -> None:
        raise RuntimeError("the publisher's thread fails")

    monkeypatch.setattr(r.publisher, "_subscription", broken)
    r.pipeline.start()
    client = DecisionClient(r.publisher.endpoint, (DECISION,), timeout_s=1)  # its subscription ends the thread
    try:
        assert r.pipeline.wait(WAIT_S)  # a source without end: only the dead publisher ends it
    finally:
        client.close()
        r.pipeline.stop()
        r.pipeline.wait(WAIT_S)
        r.publisher.close()
    assert isinstance(r.pipeline.error, RuntimeError) and "publisher" in str(r.pipeline.error)
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    assert attrs["complete"] and len(columns["seq"]) > 0


def test_picking_an_event_without_the_detector_is_one_line(tmp_path: Path) -> None:
    """psana hands such an event over empty: a reference cannot be made of it (it was a traceback)."""
    from lcls_hitfinder.service.pick import pick_references, read_picks

    (tmp_path / "p.csv").write_text("event,label\n0,single\n")
    picks = read_picks(tmp_path / "p.csv", timestamps=False)
    source = ListSource([np.zeros(0, np.uint16)])
    source.open()
    with pytest.raises(UserError, match=r"^event 0 holds no data of the detector: pick another event$"):
        pick_references(source, picks, ServeSettings(), tmp_path / "r.h5", "x")
    assert source.released == Counter([0]) and not (tmp_path / "r.h5").exists()


def test_bad_frames_get_error_decisions_and_the_service_goes_on(fx: Fixtures, tmp_path: Path) -> None:
    good = np.random.default_rng(1).poisson(3.0, (SIDE, SIDE)).astype(np.float32)
    nan = good.copy()
    nan[3, 4] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    huge = good.copy()
    huge[:8, :8] = 3e38  # finite, but the bins' sums are not: a thumbnail of Inf, an embedding of NaN
    missing = np.zeros(0, np.uint16)  # how a psana reader hands over an event without the detector
    frames = [
        missing,  # first: before the service knows the frames' shape
        good,
        nan,
        np.zeros((SIDE, SIDE + 1), np.float32),  # wrong shape
        good.astype(np.uint16),  # another dtype, same shape: fine
        np.zeros((SIDE, SIDE), complex),  # not an image
        inf,
        good,
        missing,
        huge,
    ]
    settings = _settings(tmp_path, batch={"max_size": 4, "max_wait_ms": 50})
    source = ListSource(frames)
    r = _start(settings, source, fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert r.pipeline.error is None
    assert source.released == Counter(range(len(frames)))  # every frame handed back once, the bad ones too
    columns, _ = read_decision_log(r.pipeline.logs[0])
    labels = columns["label"].tolist()
    reasons = [str(x) for x in columns["reason"]]
    errors = (0, 2, 3, 5, 6, 8, 9)
    assert [labels[i] for i in errors] == ["error"] * 7
    kinds = ["shape", "nonfinite", "shape", "dtype", "nonfinite", "shape", "nonfinite"]
    assert [reasons[i].split(":")[0] for i in errors] == kinds
    assert reasons[9] == OVERFLOW and columns["decision"][9] == "veto"
    assert reasons[0] == reasons[8] == "shape: the detector is missing from this event"
    assert reasons[3] == f"shape: ({SIDE}, {SIDE + 1}), expected ({SIDE}, {SIDE})"
    assert "error" not in (labels[1], labels[4], labels[7])
    assert labels[1] == labels[4] == labels[7]  # the same pattern, whatever its dtype, whatever the batch
    assert columns["seq"].tolist() == list(range(len(frames)))
    assert r.metrics.frame_errors.labels(reason="nonfinite")._value.get() == 3
    assert r.metrics.frame_errors.labels(reason="shape")._value.get() == 3


def test_each_run_may_bring_frames_of_its_own_shape(fx: Fixtures, tmp_path: Path) -> None:
    """A detector setting changed between runs (binning, a region of interest): the next run's frames are
    decided, not refused as the first run's shape; within a run another shape is still an error. Run 8
    holds run 7's patterns upsampled 2 x 2 (each photon count shared among four pixels), which bin to the same
    thumbnails: the same labels and scores."""
    rng = np.random.default_rng(3)
    patterns = [rng.poisson(lam, (SIDE, SIDE)).astype(np.float32) for lam in (0.5, 2.0, 3.0, 6.0)]
    upsampled = [np.kron(p, np.full((2, 2), 0.25, np.float32)) for p in patterns]
    others = [rng.poisson(2.0, shape).astype(np.float32) for shape in [(SIDE, 2 * SIDE), (2 * SIDE, SIDE), (32, 32)]]
    frames = [*patterns, *upsampled, patterns[0], *others]
    runs = [7] * 4 + [8] * 5 + [9, 10, 11]  # five shapes in all: the service keeps the preprocessing of four
    settings = _settings(tmp_path, batch={"max_size": 3, "max_wait_ms": 50})
    r = _start(settings, ListSource(frames, runs=runs), fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert r.pipeline.error is None
    (first, _), (second, _) = (read_decision_log(path) for path in r.pipeline.logs[:2])
    assert "error" not in first["label"].tolist() and first["label"].tolist() == second["label"][:4].tolist()
    np.testing.assert_allclose(second["score"][:4], first["score"], atol=1e-4)
    assert second["label"][4] == "error"
    assert second["reason"][4] == f"shape: ({SIDE}, {SIDE}), expected ({2 * SIDE}, {2 * SIDE})"
    assert all("error" not in read_decision_log(path)[0]["label"].tolist() for path in r.pipeline.logs[2:])
    assert list(r.pipeline._pres) == [(2 * SIDE, 2 * SIDE), (SIDE, 2 * SIDE), (2 * SIDE, SIDE), (32, 32)]


def test_an_offset_taken_off_calibrated_frames_is_said_for_each_run_and_offline(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames in photons (psana's data=calib) served with the raw data's offset are decided blank, every one:
    the service says so once for each such run, by its first frame; raw frames with their pedestal are not
    said. `classify` says it of such a file."""
    rng = np.random.default_rng(5)
    images, _ = _patterns(rng, 4)
    raw = [(p * 10 + 100 + rng.normal(0, 3, p.shape)).astype(np.float32) for p in images]
    frames = [*images, *raw, *images]
    runs = [7] * 4 + [8] * 4 + [9] * 4
    settings = _settings(tmp_path, batch={"max_size": 3, "max_wait_ms": 50}, calibration={"gain": 10, "offset": 100})
    r = _start(settings, ListSource(frames, runs=runs), fx.model, fx.bank)
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.service.pipeline"):
        r.pipeline.start()
        assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    said = [m for m in caplog.messages if "taken off twice" in m]
    assert [m.split(" looks like")[0] for m in said] == ["run mem:7", "run mem:9"], caplog.messages
    config = tmp_path / "serve.toml"
    config.write_text("[serve.calibration]\ngain = 10\noffset = 100\n")
    classify = ["classify", "--model", fx.model, "--bank", fx.bank, "--data", fx.data, "--out", tmp_path / "c.csv"]
    result = CliRunner().invoke(app, [str(a) for a in [*classify, "--config", config]])
    assert result.exit_code == 0 and "taken off twice" in " ".join(result.output.split()), result.output


def test_raw_adu_without_calibration_is_said_for_each_run_offline_and_when_picked(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames of raw ADU with their pedestal, served with no calibration, are decided (nearly all vetoed) with
    nothing to show why: the service says so once for each such run, looking at its first finite frame (run
    9's first is NaN); runs in photons are not said. `classify` (and `bank build`, `evaluate`: the same
    embedding) and `bank pick` say it of a file in ADU that records no calibration."""
    rng = np.random.default_rng(4)
    images, _ = _patterns(rng, 4)
    adu = [(p * 10 + 100).astype(np.uint16) for p in images]
    nan_first = np.full((SIDE, SIDE), np.nan, np.float32)
    frames = [*adu, *images, nan_first, *(a.astype(np.float32) for a in adu)]
    runs = [7] * 4 + [8] * 4 + [9] * 5
    r = _start(
        _settings(tmp_path, batch={"max_size": 3, "max_wait_ms": 50}), ListSource(frames, runs=runs), fx.model, fx.bank
    )
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.service.pipeline"):
        r.pipeline.start()
        assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    said = [m for m in caplog.messages if "pedestal" in m]
    assert [m.split(" looks like")[0] for m in said] == ["run mem:7", "run mem:9"], said
    assert "gain 1, offset 0" in said[0]

    data = _write_dataset(tmp_path / "adu.h5", np.stack(adu).astype(np.float32), np.zeros(4, np.int64))
    for path, said in ((data, "4 of 4 patterns"), (fx.data, None)):
        args = ["classify", "--model", fx.model, "--bank", fx.bank, "--data", path, "--out", tmp_path / "c.csv"]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0 and ("pedestal" in result.output) == (said is not None), result.output
        assert said is None or said in result.output
    (tmp_path / "picks.csv").write_text("event,n_particles\n1,0\n2,0\n")
    args = ["bank", "pick", "--source", f"h5:{data}", "--picks", tmp_path / "picks.csv", "--out", tmp_path / "r.h5"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcls_hitfinder.service.pick"):
        assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    assert any(m.startswith("2 of 2 picked events") and "pedestal" in m for m in caplog.messages), caplog.messages


def test_a_failed_batch_is_errors_and_counted_as_errors_only(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model failing on a batch: every frame of it an `internal` error decision, and no counter says
    otherwise (the pre-filter had called the blank frames blank before the model failed)."""
    bright = np.random.default_rng(5).poisson(3.0, (SIDE, SIDE)).astype(np.float32)
    frames = [np.zeros((SIDE, SIDE), np.float32), bright, np.zeros((SIDE, SIDE), np.float32), bright.copy()]

    def broken(self: OnnxEmbedder, thumbnails: Any) -> np.ndarray:
        raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(OnnxEmbedder, "embed", broken)
    batch = {"max_size": 4, "max_wait_ms": 1000}  # one batch of the four (the source ends before 1 s)
    settings = _settings(tmp_path, prefilter={"kind": "lit_pixels", "min_lit_pixels": 20}, batch=batch)
    r = _start(settings, ListSource(frames), fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    columns, _ = read_decision_log(r.pipeline.logs[0])
    assert columns["label"].tolist() == ["error"] * 4
    assert {str(x) for x in columns["reason"]} == {"internal: RuntimeError: the GPU fell off the bus"}
    assert r.metrics.frame_errors.labels(reason="internal")._value.get() == 4
    assert r.metrics.prefilter_blank._value.get() == 0


def test_bank_reloads_when_its_file_changes_and_refuses_a_foreign_one(fx: Fixtures, tmp_path: Path) -> None:
    bank_path = tmp_path / "bank.h5"
    bank = ReferenceBank.load(fx.bank)
    bank.save(bank_path)
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=0&rate=500", log_dir=None)
    r = _start(settings, open_source(settings.source, settings), fx.model, bank_path)
    with DecisionClient(r.publisher.endpoint, (DECISION,), timeout_s=WAIT_S) as client:
        assert r.publisher.wait_for_subscriber(WAIT_S)
        r.pipeline.start()
        stream = iter(client)
        assert any(d["decision"] == "veto" for d in (next(stream) for _ in range(40)))

        bank.threshold = -2.0  # every score is >= -1: every frame a keep
        bank.save(tmp_path / "new.h5")
        os.replace(tmp_path / "new.h5", bank_path)
        _wait_until(lambda: r.bank.bank.threshold == -2.0, "the new bank")
        seq_after = r.pipeline.next_seq
        later = [d for d in (next(stream) for _ in range(seq_after + 40)) if d["seq"] > seq_after + 8]
        assert later and all(d["decision"] == "keep" for d in later)

        foreign = ReferenceBank(bank.embeddings, bank.n_particles, "another-model", threshold=5.0)
        foreign.save(tmp_path / "foreign.h5")
        os.replace(tmp_path / "foreign.h5", bank_path)
        refused = r.metrics.bank_reloads.labels(result="refused")
        _wait_until(lambda: refused._value.get() == 1, "the refusal")
        assert r.bank.bank.threshold == -2.0 and r.bank.bank.model_hash != "another-model"
        not_a_bank = tmp_path / "not_a_bank.h5"  # the loaded model's hash, but a threshold that is no number
        bank.save(not_a_bank)
        with h5py.File(not_a_bank, "r+") as f:
            f.attrs["threshold"] = "high"
        os.replace(not_a_bank, bank_path)
        _wait_until(lambda: refused._value.get() == 2, "the refusal of a file that is not a bank")
        wide = ReferenceBank(np.hstack([bank.embeddings, bank.embeddings[:, :1]]), bank.n_particles, bank.model_hash)
        wide.save(tmp_path / "wide.h5")  # the loaded model's hash, embeddings one wider than it makes
        os.replace(tmp_path / "wide.h5", bank_path)
        _wait_until(lambda: refused._value.get() == 3, "the refusal of embeddings of another width")
        r.pipeline.request_bank_reload()  # SIGHUP's path: refused again (the monitor lives on), the service goes on
        _wait_until(lambda: refused._value.get() == 4, "the refusal on request")
        n = r.pipeline.next_seq
        d = next(stream)
        while d["seq"] <= n + 20:  # the old bank still decides: every frame a keep, none an error
            assert d["decision"] == "keep", d
            d = next(stream)
        r.pipeline.stop()
        assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert r.metrics.bank_reloads.labels(result="ok")._value.get() == 1
    assert r.pipeline.error is None


def test_a_bank_behind_a_symlink_is_swapped_by_moving_the_link(fx: Fixtures, tmp_path: Path) -> None:
    """`ln -sfn b.h5 current.h5`: the service had resolved the link at start and watched the old target."""
    bank = ReferenceBank.load(fx.bank)
    bank.save(tmp_path / "a.h5")
    bank.threshold = -2.0
    bank.save(tmp_path / "b.h5")
    (tmp_path / "current.h5").symlink_to("a.h5")
    reloading = ReloadingBank(tmp_path / "current.h5", OnnxEmbedder(fx.model), ServiceMetrics())
    assert reloading.path == tmp_path / "current.h5" and reloading.bank.threshold != -2.0
    (tmp_path / "next.h5").symlink_to("b.h5")
    os.replace(tmp_path / "next.h5", tmp_path / "current.h5")  # what `ln -sfn` does
    assert reloading.check() and reloading.bank.threshold == -2.0


def test_a_bank_reload_that_fails_in_any_way_keeps_the_old_bank(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a UserError was refused: anything else (here h5py's RuntimeError, as for a file being written)
    escaped to the monitor's loop, uncounted and unsaid as a refusal."""
    bank = ReloadingBank(fx.bank, OnnxEmbedder(fx.model), metrics := ServiceMetrics())
    before = bank.bank

    def broken(*_: object, **__: object) -> ReferenceBank:
        raise RuntimeError("Can't read data (inflate() failed)")

    monkeypatch.setattr(ReferenceBank, "load", broken)
    assert bank.reload() is False and bank.bank is before
    assert metrics.bank_reloads.labels(result="refused")._value.get() == 1


def _scrape(port: int) -> str:
    """The service's /metrics text ("" while it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


class StopsAfter(ListSource):
    """Stops the service, as SIGTERM does, while handing over its `n`-th frame (the one in hand is still read):
    frames arrive faster than they are decided, so some are in flight when it stops."""

    def __init__(self, arrays: list[np.ndarray], n: int) -> None:
        super().__init__(arrays)
        self.n = n
        self.pipeline: Pipeline | None = None

    def frames(self) -> Iterator[Frame | None]:
        for i, frame in enumerate(super().frames()):
            if i + 1 == self.n:
                assert self.pipeline is not None
                self.pipeline.stop()
            yield frame


def test_stop_drains_every_frame_read(fx: Fixtures, tmp_path: Path) -> None:
    """Every frame read before the stop is decided and logged, and none after it is read."""
    frames = list(np.random.default_rng(7).poisson(1.0, (100, SIDE, SIDE)).astype(np.uint16))
    source = StopsAfter(frames, 40)
    r = _start(_settings(tmp_path, batch={"max_size": 2, "max_wait_ms": 2}), source, fx.model, fx.bank)
    source.pipeline = r.pipeline
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    assert source.released == Counter(range(40))  # each frame read handed back once, none read after the stop
    assert columns["event"].tolist() == list(range(40)) and attrs["events"] == 40 and attrs["complete"]
    assert attrs["ended"] == "stopped"


def _serve_command(fx: Fixtures, tmp_path: Path, source: str, endpoint: str, metrics_port: int = 0) -> list[str]:
    """`lcls-hitfinder serve` with a config file: logs in tmp_path, free ports, waiting for a subscriber."""
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""[serve]
source = "{source}"
log_dir = "{tmp_path / "logs"}"
[serve.publish]
endpoint = "{endpoint}"
wait_for_subscriber_s = 60
heartbeat_s = 0.2
[serve.metrics]
port = {metrics_port or free_port()}
"""
    )
    return [*LCLS_HITFINDER, "serve", "--config", str(config), "--model", str(fx.model), "--bank", str(fx.bank)]


def _systemd_socket(name: str) -> tuple[socket.socket, dict[str, str]]:
    """A datagram socket in the abstract namespace where systemd's NOTIFY_SOCKET would be, and the environment
    that names it to a service."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"\0{name}-{os.getpid()}-{time.monotonic_ns()}")
    sock.settimeout(0)
    return sock, {**os.environ, "NOTIFY_SOCKET": "@" + sock.getsockname()[1:].decode()}


def _notified(sock: socket.socket) -> list[str]:
    """What the service told systemd, a datagram each (sent before it exited)."""
    said = []
    with contextlib.suppress(BlockingIOError):
        while True:
            said.append(sock.recv(4096).decode())
    return said


def test_serve_drains_and_closes_the_run_on_sigterm(fx: Fixtures, tmp_path: Path) -> None:
    """The real command: SIGHUP reloads the bank; SIGTERM stops reading, and every event read is decided,
    published and logged. Under systemd (`Type=notify`) it says when it serves and when it stops."""
    endpoint, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    source = f"h5:{fx.data}?repeat=0&rate=200&experiment=cxitest&run=3"
    command = _serve_command(fx, tmp_path, source, endpoint, metrics_port)
    config = tmp_path / "serve.toml"  # a status line each heartbeat (0.2 s): the first before the SIGHUP below
    config.write_text(config.read_text().replace("[serve]\n", "[serve]\nstatus_s = 0.1\n", 1))
    systemd, env = _systemd_socket("lhf-notify")
    with systemd, DecisionClient(endpoint, (DECISION, RUN, HEARTBEAT), timeout_s=WAIT_S) as client:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        try:
            decisions: list[dict[str, Any]] = []
            heartbeats = 0
            messages = client.messages()
            for topic, payload in messages:
                decisions += [payload] if topic == DECISION else []
                heartbeats += topic == HEARTBEAT
                if len(decisions) >= 30 and heartbeats:
                    break
            proc.send_signal(signal.SIGHUP)
            reloaded, deadline = 'hitfinder_bank_reloads_total{result="ok"} 1.0', time.monotonic() + WAIT_S
            for topic, payload in messages:  # keep reading (no gap for the SUB's queue) until the reload counts
                decisions += [payload] if topic == DECISION else []
                if len(decisions) % 20 == 0 and (reloaded in _scrape(metrics_port) or time.monotonic() > deadline):
                    break
            proc.send_signal(signal.SIGTERM)
            end: dict[str, Any] = {}
            for topic, payload in messages:
                if topic == DECISION:
                    decisions.append(payload)
                elif topic == RUN and payload["phase"] == "end":
                    end = payload
                    break
            output, _ = proc.communicate(timeout=WAIT_S)
        finally:
            proc.kill()
        notified = _notified(systemd)
    assert proc.returncode == 0, output
    ready, *rest = notified  # status lines go on while it drains: STOPPING=1 among them, once
    assert ready == f"READY=1\nSTATUS=serving {source}" and rest.count("STOPPING=1") == 1, notified
    status = [s for s in rest if s != "STOPPING=1"]
    # (one may come before the first event: "0 Hz, 0 events")
    assert status and all(re.fullmatch(r"STATUS=\d+ Hz, \d+ events(, .*)?", s) for s in status), notified
    assert end, output
    assert [d["seq"] for d in decisions] == list(range(len(decisions)))
    assert end["events"] == len(decisions) and end["experiment"] == "cxitest" and end["run"] == 3
    columns, attrs = read_decision_log(end["log"])
    assert attrs["complete"] and columns["seq"].tolist() == list(range(len(decisions)))
    assert end["ended"] == attrs["ended"] == "stopped"
    assert "bank reloaded from" in output and "SIGTERM" in output


def test_a_reload_while_the_config_loads_is_kept_for_serving(fx: Fixtures, tmp_path: Path) -> None:
    """`systemctl reload` (SIGHUP) in serve's first second, while it loads its config: by default it ended the
    process (exit 129, nothing logged; systemd does not restart that); now the bank is reloaded once serving."""
    hup_in_load_config = """
import os, signal, sys
import lcls_hitfinder.config as config
from lcls_hitfinder.cli import main
load = config.load_config
def load_config(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)
    return load(*args, **kwargs)
config.load_config = load_config
sys.argv[0] = "lcls-hitfinder"
main()
"""
    # 40 events at 20 Hz: the run lasts longer than the monitor takes to its first round, which reloads
    command = _serve_command(fx, tmp_path, f"h5:{fx.data}?rate=20", f"tcp://127.0.0.1:{free_port()}")
    command = [sys.executable, "-c", hup_in_load_config, *command[1:]]
    config = tmp_path / "serve.toml"
    config.write_text(config.read_text().replace("wait_for_subscriber_s = 60", "wait_for_subscriber_s = 0"))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path)
    assert proc.returncode == 0 and "bank reloaded from" in proc.stderr, (proc.returncode, proc.stderr)
    (log_file,) = (tmp_path / "logs").rglob("*.h5")
    assert read_decision_log(log_file)[1]["events"] == 40


def test_signals_while_starting_are_kept_for_serving_and_a_second_stop_quits(fx: Fixtures, tmp_path: Path) -> None:
    """serve's signal handling (its `_Signals`) with real signals: while starting a SIGHUP is noted (by default it
    ends the process) and a SIGTERM stops at the next step, a second one quits at once; once serving, the
    SIGHUP noted before reloads the bank, and a SIGTERM drains."""
    from lcls_hitfinder.service.commands import _Signals

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {s: signal.getsignal(s) for s in handled}
    try:
        signals = _Signals()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_asked.is_set()
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
        signals = _Signals()  # another start-up, which serves
        os.kill(os.getpid(), signal.SIGHUP)
        settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=0&rate=200")
        r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
        signals.serving(r.pipeline)
        r.pipeline.start()
        try:
            reloads = r.metrics.bank_reloads.labels(result="ok")
            deadline = time.monotonic() + WAIT_S
            while reloads._value.get() < 1:
                assert time.monotonic() < deadline, "the SIGHUP noted while starting did not reload the bank"
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            assert r.pipeline.stopping and r.pipeline.wait(WAIT_S)
            assert reloads._value.get() == 1 and signals.stop_asked.is_set()
        finally:
            r.pipeline.stop()
            r.pipeline.wait(WAIT_S)
            r.publisher.close()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_sigterm_while_waiting_for_a_subscriber_reads_nothing(fx: Fixtures, tmp_path: Path) -> None:
    """Stopped before it served: no event read, no run begun, no log written, a clean exit."""
    command = _serve_command(fx, tmp_path, f"h5:{fx.data}?repeat=0", f"tcp://127.0.0.1:{free_port()}")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        lines = []
        while not any("waiting up to" in line for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)  # it exited before waiting
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "stopped before serving" in output
    assert not list((tmp_path / "logs").glob("*.h5"))


@contextlib.contextmanager
def _signals_of_serve(r: Running) -> Iterator[Any]:
    """serve's signal handling (its `_Signals`, real signals) for `r`'s pipeline; this process's handlers
    come back, and the pipeline is stopped and its publisher closed, however the test ends."""
    from lcls_hitfinder.service.commands import _Signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signals = _Signals()
        signals.serving(r.pipeline)
        yield signals
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        r.pipeline.stop()
        r.pipeline.wait(WAIT_S)
        r.publisher.close()


def test_a_second_sigterm_cuts_the_drain_short_and_the_log_still_holds_what_was_published(
    fx: Fixtures, tmp_path: Path
) -> None:
    """It raised KeyboardInterrupt in serve's main thread and returned while the worker went on publishing: the
    interpreter's exit then shut the worker's pool under it (decisions `internal` errors, published but never
    logged) and ended in SIGABRT. Now the batch in hand is finished, the frames still queued are dropped
    (counted), and the run is closed. The worker is held (at the lock it takes after publishing a batch) while
    the signals come, so that a full queue is waiting whatever the machine's speed."""
    settings = _settings(tmp_path, source=f"h5:{fx.data}?memory=1&repeat=0", queue_size=64)
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    with (
        _signals_of_serve(r) as signals,
        DecisionClient(r.publisher.endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client,
    ):
        assert r.publisher.wait_for_subscriber(WAIT_S)
        with r.pipeline._tally_lock:
            r.pipeline.start()
            _wait_until(lambda: r.pipeline._frames.full(), "a full queue")
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread: each before the next line
            assert r.pipeline.stopping and signals.interrupted
        messages = _until_run_ends(client, 1)
        assert r.pipeline.wait(WAIT_S) and r.pipeline.cut_short  # serve then exits 130
        with pytest.raises(KeyboardInterrupt, match="third SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    end = messages[-1][1]
    published = [p["seq"] for t, p in messages if t == DECISION]
    assert end["ended"] == "stopped" and end["dropped"] >= 64 - settings.batch.max_size, end
    assert r.metrics.dropped.labels(reason="interrupted")._value.get() == end["dropped"]
    columns, attrs = read_decision_log(end["log"])
    assert attrs["complete"] and columns["seq"].tolist() == published == list(range(end["events"]))
    assert "error" not in columns["label"].tolist()
    from lcls_hitfinder.service.log_summary import summarise

    said = summarise(columns, attrs).lines()  # `summary` of that log says the run was cut, and what it lost
    assert said[0].endswith("log complete: cut short by a signal (stopped)"), said
    assert f"{end['dropped']} events read but never decided" in said[1], said


def test_the_first_sigterm_after_the_pipeline_stopped_itself_is_a_first(fx: Fixtures, tmp_path: Path) -> None:
    """A pipeline that stopped on its own (a dead publisher, a GPU failure) made the operator's first
    `systemctl stop` count as a second one: the drain was cut short."""
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=0")
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    with _signals_of_serve(r) as signals:
        r.pipeline.stop()  # as the pipeline does itself
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_asked.is_set() and not signals.interrupted
        r.pipeline.start()  # stopped already: it ends at once, nothing read
        assert r.pipeline.wait(WAIT_S)
        os.kill(os.getpid(), signal.SIGTERM)  # a second, once the drain had ended: it cuts nothing short
        assert signals.interrupted and not r.pipeline.cut_short  # serve exits 0, not 130


def test_listen_prints_decisions_and_reports_gaps(fx: Fixtures, tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        source=f"h5:{fx.data}?repeat=0&rate=300",
        log_dir=None,
        prefilter={"kind": "photons", "min_photons": 1e12},  # all blank before the model: distance NaN
    )
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    r.pipeline.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while r.pipeline.next_seq < 10 and time.monotonic() < deadline:  # so that listen joins late
            time.sleep(0.01)
        proc = subprocess.run(
            [*LCLS_HITFINDER, "listen", r.publisher.endpoint, "--topic", "decision", "--json", "--count", "25"],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
    finally:
        r.pipeline.stop()
        r.pipeline.wait(WAIT_S)
        r.publisher.close()
    assert proc.returncode == 0, proc.stderr
    import json

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    lines = [json.loads(line, parse_constant=strict) for line in proc.stdout.splitlines()]
    assert len(lines) == 25 and all(m["topic"] == "decision" for m in lines)
    assert all(m["label"] == "blank" and m["reason"] == "prefilter" and m["distance"] is None for m in lines)
    assert all(m["score"] == -1.0 and m["n_particles"] == 0 for m in lines)  # as docs/messages.md says
    seqs = [m["seq"] for m in lines]
    assert seqs == list(range(seqs[0], seqs[0] + 25))
    assert seqs[0] >= 10 and f"25 decisions, 0 gap(s), 0 missing, joined at seq {seqs[0]}" in proc.stderr
    assert f"joined at seq {seqs[0]}: the decisions before it went out before" in proc.stderr


def _gpu_providers_that_fail(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A build that claims TensorRT and CUDA but cannot start them (on a GPU machine too); the provider lists
    the embedder tried, in order."""
    monkeypatch.setattr(
        embedder_module.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    session, tried = embedder_module.ort.InferenceSession, []

    def cpu_only(path: str, options: Any, providers: list[tuple[str, dict[str, Any]]], **kwargs: Any) -> Any:
        # onnxruntime's own fallback off: it would retry without the providers' options, and say nothing here
        assert kwargs == {"enable_fallback": 0}
        tried.append([name for name, _ in providers])
        if providers[0][0] != "CPUExecutionProvider":
            raise RuntimeError(f"{providers[0][0]} cannot start here")
        return session(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(embedder_module.ort, "InferenceSession", cpu_only)
    return tried


def test_provider_fallback_ends_on_the_cpu(fx: Fixtures, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A build that claims TensorRT and CUDA but cannot run them still serves, on the CPU, and says so; also
    where TensorRT's engine cache folder cannot be made (it stopped the start-up)."""
    tried = _gpu_providers_that_fail(monkeypatch)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # no folder can be made below a file
    emb = OnnxEmbedder(fx.model)
    assert emb.provider == "CPUExecutionProvider" and not emb.on_gpu
    assert tried == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    out = emb.embed(np.zeros((3, 1, 16, 16), np.float32))
    assert out.shape == (3, 8) and np.isfinite(out).all()


def test_more_thumbnails_than_a_batch_are_embedded_in_batches(fx: Fixtures, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT's engine takes batches up to `max_batch` only; offline commands embed 256 at a time."""
    emb = OnnxEmbedder(fx.model, max_batch=8)
    thumbs = np.random.default_rng(3).normal(size=(21, 1, 16, 16)).astype(np.float32)
    whole = emb.embed(thumbs[:8])
    sizes: list[int] = []
    run = emb.session.run

    def counted(names: Any, feeds: dict[str, np.ndarray]) -> Any:
        sizes.append(len(next(iter(feeds.values()))))
        return run(names, feeds)

    monkeypatch.setattr(emb.session, "run", counted)
    out = emb.embed(thumbs)
    assert sizes == [8, 8, 5] and out.shape == (21, 8)
    np.testing.assert_allclose(out[:8], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "ftp:run7"], "unknown scheme 'ftp'"),
        (["--source", "h5:/nonexistent/run7.h5"], "no such file"),
        (["--source", "sim:?rate=fast"], "rate='fast' is not a valid float"),
        (["--log-dir", str(REPO / "README.md")], "decision log directory"),  # a file: no run could be logged
        (["--log-dir", "/proc/self"], "cannot write decision log directory in /proc/self"),  # no file goes there
        (["--log-dir", "~/taken"], "home/taken is a file, not a directory"),  # checked where it is written: $HOME
        (["--bank", "/nonexistent/bank.h5"], "bank /nonexistent/bank.h5 does not exist"),
        pytest.param(
            ["--device", "cuda", "--source", "sim:?rate=50&n=30"],  # was refused after the simulator had started
            "serve.device is cuda but torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none"),
        ),
    ],
)
def test_serve_refuses_a_bad_source_in_one_line(fx: Fixtures, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "taken").write_text("")
    proc = subprocess.run(
        [*LCLS_HITFINDER, "serve", "--model", str(fx.model), "--bank", str(fx.bank), "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200", "HOME": str(tmp_path / "home")},
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lcls-hitfinder: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "decisions").exists()  # the default log folder is made only for a service that starts
    assert not (tmp_path / "~").exists()
    assert "publishing on" not in proc.stderr  # refused before binding


def test_a_log_write_that_fails_in_hdf5_is_said_and_the_writer_leaves_without_crashing(tmp_path: Path) -> None:
    """A write that fails where the room check could not foresee it (an I/O error on a network file system;
    here the file size limit with the check's margins set to nothing): h5py would free the failed file into a
    segmentation fault. The writer says HDF5's failure and leaves at once, exit code 0. The test plays the
    service's side of the writer's socket."""
    script = (
        "import resource, sys\n"
        "from multiprocessing.connection import Connection\n"
        "from lcls_hitfinder.service import decision_log, log_writer\n"
        "decision_log._HEADROOM = decision_log._ROW_BYTES = 0  # blind: HDF5 meets the limit itself\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))\n"
        "log_writer._write_logs(Connection(int(sys.argv[1])), 0.01)\n"
    )
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = theirs.fileno()
        writer = subprocess.Popen([sys.executable, "-c", script, str(fd)], pass_fds=(fd,), cwd=tmp_path)
        conn = Connection(os.dup(ours.fileno()))
    try:
        conn.send(("open", 1, tmp_path, "x", 1, {"experiment": "x", "run": 1}))
        assert conn.poll(WAIT_S) and conn.recv()[:2] == ("opened", 1)
        conn.send(("append", log_rows(4096, "x" * 64)))  # 1.6 MB of rows: past the limit at the first flush
        assert conn.poll(WAIT_S)
        said = conn.recv()
        assert writer.wait(WAIT_S) == 0
    finally:
        writer.kill()
        conn.close()
    assert said[:2] == ("failed", 1) and "no room to go on" not in said[2], said  # HDF5's own, not the check's
    assert "\n" not in said[2]  # one line in the service's log


def test_a_log_writer_that_takes_nothing_is_killed_and_never_holds_up_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush stuck on a network file system that stopped answering (here the writer stopped with SIGSTOP):
    the service's appends go on (a sender thread blocks in the socket, not the service) until the writer has
    not flushed for PATIENCE_S (and a flush period); then it is killed and the log said lost. The next run's
    log gets a new writer at once (a killed writer takes milliseconds to be reaped)."""
    from lcls_hitfinder.service import log_writer

    writer = log_writer.LogWriter()
    try:
        log = writer.open(tmp_path, "x", 1, {"experiment": "x", "run": 1})
        monkeypatch.setattr(log_writer, "PATIENCE_S", 0.5)  # once started: a cold start may take longer
        pid = writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        rows = log_rows(4096, "x" * 64)  # 1.6 MB pickled: the socket's buffer is full after the first
        with pytest.raises(OSError, match=r"^the decision log's writer has not flushed for \d+ s \(a file system"):
            for _ in range(int(100 * WAIT_S)):
                log.append(rows)
                time.sleep(0.01)
        log.abandon()
        monkeypatch.undo()  # the new writer's cold start gets its patience back
        again = writer.open(tmp_path, "x", 2, {"experiment": "x", "run": 2})
        assert writer.pid != pid
        again.append(log_rows(3))
        again.close({"events": 3})
        columns, attrs = read_decision_log(again.path)
        assert attrs["complete"] and len(columns["seq"]) == 3
        _wait_until(lambda: _ended(pid), "the stopped writer's end")  # killed, even stopped
    finally:
        writer.stop()


def test_a_log_writer_without_its_sender_thread_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to be had (the shortage that stops processes too): the writer just started is killed, and the
    next start begins afresh."""
    from lcls_hitfinder.service import log_writer

    started: list[int] = []
    real_start = threading.Thread.start

    def no_thread(self: threading.Thread) -> None:
        if self.name == "log-sender" and not started:
            started.append(1)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    children_before = set(_writers_of(os.getpid()))
    writer = log_writer.LogWriter()
    with pytest.raises(RuntimeError, match="can't start new thread"):
        writer.start()
    assert writer.pid is None
    _wait_until(lambda: set(_writers_of(os.getpid())) == children_before or _all_ended(os.getpid()), "no writer")
    writer.start()
    try:
        assert writer.pid is not None and writer.pid not in children_before
    finally:
        writer.stop()


def test_a_log_writer_killed_by_a_signal_without_a_name_is_said_so(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real-time signal has no name in Python's Signals: it was a ValueError that ended the pipeline without
    its run end message. Killed mid-run, so that the service finds the writer dead and says how."""
    images = list(np.random.default_rng(10).poisson(2.0, (10, SIDE, SIDE)).astype(np.float32))
    signum = int(signal.SIGRTMIN) + 5

    def kill() -> None:
        _wait_until(lambda: len(r.pipeline.logs) == 1, "the run's log")
        _kill_the_writer(r, signum)

    r = _start(_settings(tmp_path), PausingSource(images, 5, kill), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 1)
    assert [p["seq"] for t, p in messages if t == DECISION] == list(range(10)) and r.pipeline.error is None
    assert messages[-1][1]["log"] is None
    assert f"the decision log's writer process died, killed by signal {signum})" in caplog.text, caplog.text


def _kill_the_writer(r: Running, signum: int = signal.SIGKILL) -> None:
    pid = r.pipeline._log_writer.pid
    assert pid is not None
    os.kill(pid, signum)  # as h5py's crash freeing a failed file would end it (SIGSEGV, with no core dump)


def test_a_log_writer_that_dies_mid_run_costs_that_log_not_the_service(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """HDF5 runs in the writer process: whatever kills it costs the run's log, never the decisions. What was
    flushed before stays readable."""
    images = list(np.random.default_rng(6).poisson(2.0, (10, SIDE, SIDE)).astype(np.float32))

    def crash() -> None:  # once the first frames are on disk
        _wait_until(
            lambda: len(r.pipeline.logs) == 1 and read_decision_log(r.pipeline.logs[0])[0]["seq"].size == 5, "5 rows"
        )
        _kill_the_writer(r)

    r = _start(_settings(tmp_path), PausingSource(images, 5, crash), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 1)
    assert [p["seq"] for t, p in messages if t == DECISION] == list(range(10)) and r.pipeline.error is None
    assert messages[-1][1]["log"] is None
    assert r.metrics.decision_log_failures._value.get() == 1 and r.metrics.decision_log_lost._value.get() == 1
    said = "failed (the decision log's writer process died, killed by SIGKILL); this run goes on without it"
    assert said in caplog.text
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    assert not attrs["complete"] and columns["seq"].tolist() == list(range(5))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_log_writer_outlives_signals_meant_for_the_service(fx: Fixtures, tmp_path: Path, signum: int) -> None:
    """A terminal's Ctrl-C, a `pkill` or systemd's default KillMode signal the whole process group: the service
    drains and closes the run's log in order, so the writer must still be there to close it."""
    images = list(np.random.default_rng(7).poisson(2.0, (10, SIDE, SIDE)).astype(np.float32))

    def signal_the_writer() -> None:
        _wait_until(lambda: len(r.pipeline.logs) == 1, "the run's log")
        pid = r.pipeline._log_writer.pid
        assert pid is not None
        os.kill(pid, signum)

    r = _start(_settings(tmp_path), PausingSource(images, 5, signal_the_writer), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 1)
    assert [p["seq"] for t, p in messages if t == DECISION] == list(range(10))
    columns, attrs = read_decision_log(messages[-1][1]["log"])
    assert attrs["complete"] and columns["seq"].tolist() == list(range(10))
    assert r.metrics.decision_log_failures._value.get() == 0


def test_a_log_writer_that_does_not_answer_at_a_runs_end_costs_that_log(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer stopped (SIGSTOP) mid-run, as on a hung file system: every decision still goes out, the run
    ends after PATIENCE_S, and its log is said lost."""
    from lcls_hitfinder.service import log_writer

    images = list(np.random.default_rng(8).poisson(2.0, (10, SIDE, SIDE)).astype(np.float32))

    def hang() -> None:
        _wait_until(lambda: len(r.pipeline.logs) == 1, "the run's log")
        monkeypatch.setattr(log_writer, "PATIENCE_S", 0.5)  # once started: a cold start may take longer
        pid = r.pipeline._log_writer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)

    r = _start(_settings(tmp_path), PausingSource(images, 5, hang), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 1)
    assert [p["seq"] for t, p in messages if t == DECISION] == list(range(10)) and r.pipeline.error is None
    assert messages[-1][1]["log"] is None and r.metrics.decision_log_failures._value.get() == 1
    said = r"failed \(the decision log's writer (did not answer in 0\.5 s|has not flushed for \d+ s) \(a file system"
    assert re.search(said, caplog.text), caplog.text


def test_a_log_writer_that_cannot_start_with_the_service_starts_at_the_first_run(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No process to be had at the service's start (EAGAIN): said, and the service serves (it ended there)."""
    from lcls_hitfinder.service.log_writer import LogWriter

    start, tries = LogWriter.start, []

    def fails_once(self: LogWriter) -> None:
        tries.append(1)
        if len(tries) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        start(self)

    monkeypatch.setattr(LogWriter, "start", fails_once)
    images = list(np.random.default_rng(9).poisson(2.0, (5, SIDE, SIDE)).astype(np.float32))
    r = _start(_settings(tmp_path), ListSource(images), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 1)
    assert [p["seq"] for t, p in messages if t == DECISION] == list(range(5))
    assert "the decision log's writer could not start ([Errno 11] Resource temporarily unavailable)" in caplog.text
    columns, attrs = read_decision_log(messages[-1][1]["log"])
    assert attrs["complete"] and columns["seq"].tolist() == list(range(5))


def _writers_of(pid: int) -> list[int]:
    """The decision log writers that are children of process `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"lcls_hitfinder.service.log_writer" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
    return found


def _all_ended(pid: int) -> bool:
    """Every decision log writer child of `pid` has ended."""
    return all(_ended(w) for w in _writers_of(pid))


def _ended(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped yet (a container's init may never)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_service_killed_outright_leaves_its_log_flushed_and_no_writer_behind(fx: Fixtures, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, systemd's last resort): the writer sees its socket close, flushes what it was
    sent and leaves; the log holds a prefix of the run's decisions, incomplete."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    command = _serve_command(fx, tmp_path, f"h5:{fx.data}?repeat=0&rate=100", endpoint)
    with DecisionClient(endpoint, (DECISION,), timeout_s=WAIT_S) as client:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            seen = [payload["seq"] for _, payload in itertools.islice(client.messages(), 40)]
            writers = _writers_of(proc.pid)
            proc.kill()
            proc.wait(WAIT_S)
        finally:
            proc.kill()
    assert seen == list(range(40)) and len(writers) == 1
    _wait_until(lambda: _ended(writers[0]), "the writer's exit")
    (log_file,) = (tmp_path / "logs").iterdir()
    columns, attrs = read_decision_log(log_file)
    assert not attrs["complete"] and columns["seq"].tolist() == list(range(len(columns["seq"])))
    assert len(columns["seq"]) >= 25  # flushed at its end (not a second before); the last SEND_S in the service lost


def test_a_log_writer_that_died_between_runs_is_started_again(fx: Fixtures, tmp_path: Path) -> None:
    r, decisions, ends = _serve_two_runs(fx, tmp_path, _kill_the_writer)
    assert [d["seq"] for d in decisions] == list(range(10))
    assert [(e["run"], e["events"]) for e in ends] == [(1, 5), (2, 5)] and len(r.pipeline.logs) == 2
    for path, first in zip(r.pipeline.logs, (0, 5), strict=True):
        columns, attrs = read_decision_log(path)
        assert attrs["complete"] and columns["seq"].tolist() == list(range(first, first + 5))
    assert r.metrics.decision_log_failures._value.get() == 0  # no log was lost


def test_serve_says_the_bank_it_uses_and_warns_of_its_defaults(fx: Fixtures, tmp_path: Path) -> None:
    """Nothing said which bank decided, nor that the shipped generic one (poor on a sample's own patterns) or
    the simulated stream were serving by default."""
    quiet = ["--metrics-port", "off", "--log-dir", "false"]
    proc = subprocess.run(
        [*LCLS_HITFINDER, "serve", "--model", str(fx.model), "--publish", f"tcp://127.0.0.1:{free_port()}", *quiet],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
    )
    assert "no source given (--source, serve.source): serving the simulated stream sim:?rate=120" in proc.stderr
    assert "no bank given (--bank, serve.bank): the shipped generic bank judges these patterns" in proc.stderr
    assert proc.returncode == 2  # the shipped bank is not of this test's model: refused, after saying so
    mine = ["--model", str(fx.model), "--bank", str(fx.bank), "--source", "sim:?rate=0&n=3"]
    proc = subprocess.run(
        [*LCLS_HITFINDER, "serve", *mine, *quiet, "--publish", f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr
    bank = ReferenceBank.load(fx.bank)
    assert f"bank {fx.bank.resolve()}: {len(bank.embeddings)} references (" in proc.stderr
    assert f"threshold {bank.threshold:g}, model {bank.model_hash}" in proc.stderr


def test_serve_switches_the_decision_log_and_metrics_off_from_the_command_line(fx: Fixtures, tmp_path: Path) -> None:
    """As false does in the config file (a folder named "false" used to be made)."""
    files = ["--model", str(fx.model), "--bank", str(fx.bank), "--publish", f"tcp://127.0.0.1:{free_port()}"]
    off = ["--log-dir", "false", "--metrics-port", "off", "--source", "sim:?rate=0&n=5"]
    proc = subprocess.run(
        [*LCLS_HITFINDER, "serve", *files, *off],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "5 decisions" in proc.stderr and "logs: none" in proc.stderr and "metrics on" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
    device = "cuda" if torch.cuda.is_available() else "cpu"  # serve.device auto
    assert f"; preprocessing on {device})" in " ".join(proc.stderr.split()), proc.stderr  # said beside the provider


def test_a_log_that_reaches_the_file_size_limit_costs_the_log_not_the_service(fx: Fixtures, tmp_path: Path) -> None:
    """A write that fails in HDF5 (a full disk: ENOSPC; a file size limit: EFBIG, as here, where no disk can be
    filled) left h5py's handles to free into a segmentation fault. The log stops before HDF5 fails, and says
    so; the run goes on without it and ends."""
    import resource

    def small_files() -> None:  # in the service's process only
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    files = ["--model", str(fx.model), "--bank", str(fx.bank), "--publish", f"tcp://127.0.0.1:{free_port()}"]
    proc = subprocess.run(
        [*LCLS_HITFINDER, "serve", *files, "--metrics-port", "off", "--source", "sim:?rate=0&n=300"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=tmp_path,
        preexec_fn=small_files,
    )
    assert proc.returncode == 0, proc.stderr
    assert "300 decisions" in proc.stderr, proc.stderr
    said = re.search(r"decision log (\S+) failed \(no room to go on: the file size limit \(256 KiB\)", proc.stderr)
    assert said and "goes on without it" in proc.stderr, proc.stderr
    columns, attrs = read_decision_log(said[1])  # what was flushed stays readable
    assert not attrs["complete"] and len(columns["seq"]) == 0


@pytest.mark.parametrize(
    ("layout", "query", "message"),
    [
        ("group", "?data=/entry_1", "/entry_1 in {path} is a group, not the frames' dataset"),
        ("group", "?mask=/entry_1", "mask /entry_1 in {path} is a group, not a dataset"),
        ("zero_pixels", "", "frames must be (N, H, W) or (N, P, H, W) with pixels, got (5, 0, 16)"),
        ("no_frames", "", "{path} holds no frames"),
        ("dataset", "?data=/x&mask=/y", "{path} is a dataset file; data= and mask= are for CXI files only"),
        ("dataset", "?data=", "data= is empty"),
        ("directory", "", "{path} is a directory; give an HDF5 file"),
    ],
)
def test_an_h5_source_that_cannot_be_served_is_one_line_at_start(
    fx: Fixtures, tmp_path: Path, layout: str, query: str, message: str
) -> None:
    path = tmp_path / ("d" if layout == "directory" else "f.h5")
    if layout == "directory":
        path.mkdir()
    elif layout == "dataset":
        shutil.copy(fx.data, path)
    else:
        with h5py.File(path, "w") as f:
            frames = {"zero_pixels": (5, 0, 16), "no_frames": (0, 16, 16)}.get(layout, (3, 16, 16))
            f.create_dataset("/entry_1/data_1/data", data=np.zeros(frames, np.uint16))
    with pytest.raises(UserError) as err:
        open_source(f"h5:{path}{query}", _settings(tmp_path)).open()
    assert str(err.value).endswith(message.format(path=path)), str(err.value)


def test_simulated_stream_carries_its_truth_to_the_decisions(fx: Fixtures, tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text("[simulate.detector]\nshape = [64, 64]\n")
    settings = _settings(tmp_path, source=f"sim:?rate=0&n=30&config={config}", prefilter={"kind": "lit_pixels"})
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    assert attrs["events"] == 30 and (attrs["experiment"], attrs["run"]) == ("sim", 1)
    truth = columns["truth_n_particles"]
    alone = open_source(settings.source, settings)  # the same stream read on its own: the truth of each event
    alone.open()
    expected = {f.event.event: f.truth_n_particles for f in alone.frames() if isinstance(f, Frame)}
    alone.close()
    assert truth.tolist() == [expected[e] for e in columns["event"].tolist()]
    exported = generate_latest(r.metrics.registry).decode().splitlines()
    true_labels = [label_of_count(int(n)).text for n in truth]
    for t in set(true_labels):  # both children of each true class, so a class never labelled right reads 0
        right = sum(x == t and label == t for x, label in zip(true_labels, columns["label"], strict=True))
        assert f'hitfinder_truth_events_total{{agree="yes",truth="{t}"}} {float(right)}' in exported
        assert any(line.startswith(f'hitfinder_truth_events_total{{agree="no",truth="{t}"}} ') for line in exported)
    agree = r.metrics.truth_events
    counted = sum(agree.labels(truth=t.text, agree=a)._value.get() for t in Label for a in ("yes", "no"))
    assert counted == 30 == r.pipeline.total.truth_known


def test_io_binding_gives_the_same_embeddings(fx: Fixtures) -> None:
    """The GPU path binds torch memory to the session by pointer; the same binding on CPU tensors must agree."""
    emb = OnnxEmbedder(fx.model)
    thumbs = torch.randn(5, 1, 16, 16)
    bound = emb._embed_bound(thumbs)
    np.testing.assert_allclose(bound, emb.embed(thumbs.numpy()), rtol=1e-5, atol=1e-6)
    assert bound.shape == (5, emb.embed_dim)


class StallingSource(ListSource):
    """One frame, then idle ticks while its (pretend) reader is restarted twice, then, once `resume` is set,
    one more frame."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        self.resume = threading.Event()

    def frames(self) -> Iterator[Frame | None]:
        frames = super().frames()
        yield next(frames)
        for tick in range(12):
            time.sleep(0.05)
            self.restarts = 1 if tick < 6 else 2
            yield None
        while not self.resume.wait(0.05):
            yield None
        yield from frames


def test_heartbeats_and_restart_counts_go_on_while_the_source_is_idle(fx: Fixtures, tmp_path: Path) -> None:
    panels = np.random.default_rng(2).poisson(2.0, (2, 4, 16, 16)).astype(np.uint16)  # panel stacks (P, H, W)
    settings = _settings(tmp_path, log_dir=None)
    source = StallingSource(list(panels))
    r = _start(settings, source, fx.model, fx.bank)
    with DecisionClient(r.publisher.endpoint, (DECISION, HEARTBEAT), timeout_s=WAIT_S) as client:
        assert r.publisher.wait_for_subscriber(WAIT_S)
        r.pipeline.start()
        decisions, beats = [], []
        for topic, payload in client.messages():
            (decisions if topic == DECISION else beats).append(payload)
            if sum(b["next_seq"] == 1 and b["source_restarts"] == 2 for b in beats) >= 2:
                source.resume.set()  # heartbeats went on through the stall: let the second frame come
            if len(decisions) == 2:
                break
        assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    idle_beats = [b for b in beats if b["next_seq"] == 1]  # between the two frames
    assert sum(b["source_restarts"] == 2 for b in idle_beats) >= 2 and all(b["run_open"] for b in idle_beats)
    assert [d["label"] != "error" for d in decisions] == [True, True]
    assert r.metrics.source_restarts._value.get() == 2


class RunThenIdleSource(ListSource):
    """Frames of one run, its RunEnd, then nothing but idle ticks: live data between two runs."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        self.closed = threading.Event()

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        yield from super().frames()
        yield RunEnd("mem", 7)
        while not self.closed.wait(0.05):
            yield None

    def close(self) -> None:
        self.closed.set()


def test_a_run_end_closes_the_run_while_the_source_waits_for_the_next(fx: Fixtures, tmp_path: Path) -> None:
    images = np.random.default_rng(3).poisson(2.0, (5, SIDE, SIDE)).astype(np.float32)
    source = RunThenIdleSource(list(images))
    r = _start(_settings(tmp_path), source, fx.model, fx.bank)
    with DecisionClient(r.publisher.endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client:
        assert r.publisher.wait_for_subscriber(WAIT_S)
        r.pipeline.start()
        decisions, end = _collect_run(client)
    assert not r.pipeline.wait(0)  # the source is still open, waiting for the next run
    assert [d["seq"] for d in decisions] == list(range(5)) and end["events"] == 5
    assert r.metrics.run_open._value.get() == 0
    columns, attrs = read_decision_log(r.pipeline.logs[0])  # closed at the run end, not at the service's
    assert attrs["complete"] and columns["seq"].tolist() == list(range(5))
    source.close()
    r.pipeline.stop()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()


class TwoRunSource(ListSource):
    """Run 1 of the frames, then `between()` (the disk changes under the service), then run 2 of them."""

    def __init__(self, arrays: list[np.ndarray], between: Callable[[], None]) -> None:
        super().__init__(arrays)
        self.between = between

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        for run in (1, 2):
            for frame in super().frames():
                yield replace(frame, event=replace(frame.event, run=run))
            yield RunEnd("mem", run)
            if run == 1:
                self.between()


class PausingSource(ListSource):
    """The frames of one run, `pause()` called after the first `at` of them (the disk changes mid-run)."""

    def __init__(self, arrays: list[np.ndarray], at: int, pause: Callable[[], None]) -> None:
        super().__init__(arrays)
        self.at, self.pause = at, pause

    def frames(self) -> Iterator[Frame | RunEnd | None]:
        for i, frame in enumerate(super().frames()):
            if i == self.at:
                self.pause()
            yield frame


def test_a_log_folder_removed_mid_run_is_said_then_and_not_listed(fx: Fixtures, tmp_path: Path) -> None:
    """Its rows went on into a removed file until the run's end; the service's summary then listed the lost
    log as one written."""
    images = list(np.random.default_rng(5).poisson(2.0, (10, SIDE, SIDE)).astype(np.float32))
    logs = tmp_path / "logs"

    def clean_up() -> None:  # once the first frames are on disk
        _wait_until(
            lambda: len(r.pipeline.logs) == 1 and read_decision_log(r.pipeline.logs[0])[0]["seq"].size == 5, "5 rows"
        )
        shutil.rmtree(logs)

    r = _start(_settings(tmp_path), PausingSource(images, 5, clean_up), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 1)
    assert [p["seq"] for t, p in messages if t == DECISION] == list(range(10))
    assert messages[-1][1]["log"] is None and r.pipeline.logs == [] and r.pipeline.error is None
    assert r.metrics.decision_log_failures._value.get() == 1 and r.metrics.decision_log_lost._value.get() == 1


def _until_run_ends(client: DecisionClient, runs: int) -> list[tuple[str, dict[str, Any]]]:
    """Messages up to the `runs`-th run end message."""
    messages = []
    for topic, payload in client.messages():
        messages.append((topic, payload))
        runs -= topic == RUN and payload["phase"] == "end"
        if not runs:
            return messages
    raise AssertionError(f"no end of every run within {WAIT_S} s")


def _served_until_runs_end(r: Running, runs: int) -> list[tuple[str, dict[str, Any]]]:
    """Start `r` with a subscriber on decisions and runs; its messages up to the `runs`-th run end, once the
    pipeline has ended and its publisher is closed."""
    with DecisionClient(r.publisher.endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client:
        assert r.publisher.wait_for_subscriber(WAIT_S)
        r.pipeline.start()
        messages = _until_run_ends(client, runs)
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    return messages


def _serve_two_runs(
    fx: Fixtures, tmp_path: Path, between: Callable[[Running], None]
) -> tuple[Running, list[dict[str, Any]], list[dict[str, Any]]]:
    """The decisions and the run end messages of two runs of 5 frames, `between` called between them."""
    images = np.random.default_rng(4).poisson(2.0, (5, SIDE, SIDE)).astype(np.float32)

    def after_run_1() -> None:  # the reader runs ahead of the worker: wait until run 1 is closed
        m = r.metrics
        _wait_until(lambda: m.run_number._value.get() == 1 and m.run_open._value.get() == 0, "run 1's end")
        between(r)

    r = _start(_settings(tmp_path), TwoRunSource(list(images), after_run_1), fx.model, fx.bank)
    messages = _served_until_runs_end(r, 2)
    decisions = [p for topic, p in messages if topic == DECISION]
    return r, decisions, [p for topic, p in messages if topic == RUN and p["phase"] == "end"]


def test_a_log_folder_that_fails_between_runs_costs_the_log_not_the_decisions(fx: Fixtures, tmp_path: Path) -> None:
    logs = tmp_path / "logs"

    def disk_gone(_: Running) -> None:  # the folder replaced by a file: the next run's log cannot be created
        logs.rename(tmp_path / "old_logs")
        logs.write_text("")

    r, decisions, ends = _serve_two_runs(fx, tmp_path, disk_gone)
    assert [d["seq"] for d in decisions] == list(range(10)) and {d["label"] for d in decisions} != {"error"}
    assert [(e["run"], e["events"]) for e in ends] == [(1, 5), (2, 5)]
    assert r.metrics.decision_log_lost._value.get() == 1  # lost until a run's log is created again
    assert ends[1]["log"] is None and len(r.pipeline.logs) == 1 and r.pipeline.error is None
    assert r.metrics.decision_log_failures._value.get() == 1
    columns, attrs = read_decision_log(tmp_path / "old_logs" / Path(r.pipeline.logs[0]).name)
    assert attrs["complete"] and columns["seq"].tolist() == list(range(5))


def test_any_failure_of_the_log_costs_the_log_not_the_decisions(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only OSError (h5py raises ValueError for a string it cannot encode; here the writer meets columns
    it has no column for, a KeyError): the run goes on without its log, and the service still ends (the
    log's close at the end must not hang `wait`)."""
    append = ChildLog.append

    def broken(self: ChildLog, columns: Mapping[str, np.ndarray]) -> None:
        append(self, {"seq": columns["seq"]})

    def break_the_log(_: Running) -> None:
        monkeypatch.setattr(ChildLog, "append", broken)

    r, decisions, ends = _serve_two_runs(fx, tmp_path, break_the_log)
    assert [d["seq"] for d in decisions] == list(range(10))
    assert [(e["run"], e["events"], e["log"] is None) for e in ends] == [(1, 5, False), (2, 5, True)]
    assert r.pipeline.error is None and r.metrics.decision_log_failures._value.get() == 1
    assert r.metrics.decision_log_lost._value.get() == 1


def test_a_log_folder_that_becomes_a_symlink_loop_costs_the_log_not_the_decisions(fx: Fixtures, tmp_path: Path) -> None:
    """Naming the next run's log fails too (pathlib's RuntimeError on the loop), not only creating it."""
    logs = tmp_path / "logs"

    def looped(_: Running) -> None:
        logs.rename(tmp_path / "old_logs")
        logs.symlink_to(logs)

    r, decisions, ends = _serve_two_runs(fx, tmp_path, looped)
    assert [d["seq"] for d in decisions] == list(range(10))
    assert [(e["run"], e["events"], e["log"] is None) for e in ends] == [(1, 5, False), (2, 5, True)]
    assert r.pipeline.error is None and r.metrics.decision_log_lost._value.get() == 1


def test_a_decision_log_lost_is_said_until_a_runs_log_is_created_again(fx: Fixtures, tmp_path: Path) -> None:
    """The folder unwritable for run 1 (a file where it should be), freed before run 2: lost, then not."""
    logs = tmp_path / "logs"
    logs.write_text("")
    lost = []

    def disk_freed(running: Running) -> None:
        lost.append(running.metrics.decision_log_lost._value.get())
        logs.unlink()
        logs.mkdir()

    r, decisions, ends = _serve_two_runs(fx, tmp_path, disk_freed)
    assert [(e["run"], e["log"] is None) for e in ends] == [(1, True), (2, False)] and len(decisions) == 10
    assert lost == [1.0] and r.metrics.decision_log_lost._value.get() == 0


def test_a_heartbeat_never_counts_decisions_not_yet_published(fx: Fixtures, tmp_path: Path) -> None:
    """`next_seq` and the counts of a heartbeat are those of the decisions published before it, whenever it
    comes: here one comes after each decision message, mid-batch, the moment most likely to catch them apart."""
    settings = _settings(tmp_path, source=f"h5:{fx.data}?repeat=2", batch={"max_size": 8, "max_wait_ms": 50})
    r = _start(settings, open_source(settings.source, settings), fx.model, fx.bank)
    publish = r.publisher.publish

    def publish_then_beat(topic: str, payload: dict[str, Any]) -> None:
        publish(topic, payload)
        if topic == DECISION:
            r.pipeline._heartbeat(0.0)

    r.publisher.publish = publish_then_beat  # type: ignore[method-assign]
    with DecisionClient(r.publisher.endpoint, (DECISION, HEARTBEAT, RUN), timeout_s=WAIT_S) as client:
        assert r.publisher.wait_for_subscriber(WAIT_S)
        r.pipeline.start()
        messages = _until_run_ends(client, 1)
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    published, beats = 0, 0
    for topic, payload in messages:
        if topic == DECISION:
            published = payload["seq"] + 1
        elif topic == HEARTBEAT:
            beats += 1
            assert payload["next_seq"] <= published and sum(payload["counts"].values()) == payload["next_seq"]
    assert published == 80 and beats >= 80


def test_the_pipeline_never_reads_a_frame_after_releasing_it(fx: Fixtures, tmp_path: Path) -> None:
    """A released slot is the reader's to overwrite at once: scribbling over released frames changes nothing."""
    with Dataset(fx.data) as d:
        images = d.images()
    results = []
    for scribble in (False, True):
        source = ListSource([im.copy() for im in images], scribble=scribble)
        r = _start(_settings(tmp_path / str(scribble)), source, fx.model, fx.bank)
        r.pipeline.start()
        assert r.pipeline.wait(WAIT_S)
        r.publisher.close()
        columns, _ = read_decision_log(r.pipeline.logs[0])
        results.append((columns["label"].tolist(), columns["score"]))
        if scribble:  # the scribbling happened: those pixels are NaN now
            assert all(np.isnan(a).all() for a in source.arrays)
    (labels, scores), (labels_scribbled, scores_scribbled) = results
    assert "error" not in labels and len(set(labels)) > 1
    assert labels_scribbled == labels
    np.testing.assert_array_equal(scores_scribbled, scores)


@pytest.mark.parametrize("prefilter", ["lit_pixels", "photons", "none"])
@pytest.mark.parametrize("detector", ["image", "panels", "calibrated"])
def test_frame_by_frame_binning_equals_the_batch_path_and_training(
    fx: Fixtures, tmp_path: Path, prefilter: str, detector: str
) -> None:
    """The CPU bins each frame in a cache-sized buffer; a GPU bins the batch at once; a psana reader bins its
    frames itself with the `ReaderBinning` the pipeline sends it. All must give what training's preprocessing
    gives on the stacked batch (bins, the pre-filter's measure, NaN checks) for every kind of frame a source
    hands over, and release each frame once. The batch path runs here on the CPU: only its buffer is pinned
    on a GPU."""
    from lcls_hitfinder.preprocess import PhotonCalibration

    rng = np.random.default_rng(3)
    shape: tuple[int, ...] = (2, SIDE // 2, SIDE) if detector == "panels" else (SIDE, SIDE)
    ints = rng.poisson(0.7, (3, *shape)).astype(np.uint16)
    floats = rng.normal(1.0, 1.5, (3, *shape)).astype(np.float32)
    floats[1, 0, 5] = np.nan
    read_only = floats[0].copy()
    read_only.flags.writeable = False
    arrays = [
        ints[0],
        ints[1].astype(">u2"),  # another byte order, as an HDF5 file may hold it
        ints[2].astype(np.int16),
        floats[1],  # NaN
        read_only,
        floats[2].astype(np.float64),
    ]
    calibration = PhotonCalibration(gain=1.5, offset=0.5, threshold=0.4) if detector == "calibrated" else None
    mask = rng.random(shape) > 0.1 if detector == "calibrated" else None
    pre = Preprocessor(PreprocessSettings(thumbnail=16, clip_photons=3.0), mask, shape, calibration)
    photons = pre.photons(torch.from_numpy(np.stack([a.astype(np.float32) for a in arrays])))
    expected_bins = pre.binned(photons)
    expected_measure = {
        "lit_pixels": (photons > 0.5).flatten(1).sum(1).double(),
        "photons": photons.flatten(1).double().sum(1),
        "none": torch.zeros(len(arrays), dtype=torch.float64),
    }[prefilter]
    settings = _settings(tmp_path, prefilter={"kind": prefilter, "lit_threshold": 0.5})
    r = _start(settings, ListSource([]), fx.model, fx.bank)
    r.publisher.close()
    # as a psana reader bins them in its own process, with what the pipeline sends it
    at_reader = ReaderBinning(pre.settings, pre.calibration, settings.prefilter, mask).binner(shape)
    for path in ("frame by frame", "batch", "reader", "reader and service"):
        released: Counter[int] = Counter()
        frames = [
            Frame(EventId("mem", 1, i, 0), a, 0, on_release=functools.partial(released.update, [i]))
            for i, a in enumerate(arrays)
        ]
        by_reader = {"reader": set(range(len(arrays))), "reader and service": {0, 3, 4}}.get(path, set())
        for i in by_reader:  # as they come from a reader that bins some frames (shared) or all (always)
            frames[i] = replace(frames[i], data=np.empty(0, arrays[i].dtype), binned=at_reader.bin(arrays[i]))
        bin_frames = r.pipeline._bin_on_device if path == "batch" else r.pipeline._bin_on_cpu
        with torch.inference_mode():
            bins, measure, finite = bin_frames(pre, frames)
        assert finite.tolist() == [True, True, True, False, True, True]
        ok = finite.numpy()
        torch.testing.assert_close(bins[ok], expected_bins[ok], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(measure[ok], expected_measure[ok], rtol=1e-6, atol=0.0)
        assert released == Counter(set(range(len(arrays))) - by_reader)
    assert float(expected_bins.nansum()) > 0 and (prefilter == "none" or float(expected_measure.nansum()) > 0)


class FailingSource(ListSource):
    """Hands over its frames, then fails as a reader that gave up does."""

    def frames(self) -> Iterator[Frame | None]:
        yield from super().frames()
        raise UserError("xtc2:run.xtc2?det=cam: the reader exited (code 3), 5 times in a row without a frame")


def test_a_failing_source_ends_the_run_in_one_line_and_keeps_what_it_read(
    fx: Fixtures, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = [np.random.default_rng(i).poisson(3.0, (SIDE, SIDE)).astype(np.float32) for i in range(5)]
    r = _start(_settings(tmp_path), FailingSource(images), fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert isinstance(r.pipeline.error, UserError)
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    assert attrs["complete"] and columns["event"].tolist() == list(range(5))
    (record,) = [rec for rec in caplog.records if "source failed" in rec.getMessage()]
    assert "5 times in a row" in record.getMessage() and record.exc_info is None  # no traceback for the user


def test_with_overflow_drop_every_frame_is_decided_or_counted(fx: Fixtures, tmp_path: Path) -> None:
    frames = list(np.random.default_rng(3).poisson(1.0, (200, SIDE, SIDE)).astype(np.uint16))
    settings = _settings(tmp_path, queue_size=2, overflow="drop", batch={"max_size": 1})
    source = ListSource(frames)
    r = _start(settings, source, fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert source.released == Counter(range(200))  # the dropped frames' slots too
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    dropped = r.metrics.dropped.labels(reason="queue_full")._value.get()
    assert dropped > 0  # 200 frames handed over in microseconds into a queue of 2: the drop path ran
    assert len(columns["seq"]) + dropped == 200 == attrs["events"] + attrs["dropped"]
    assert columns["seq"].tolist() == list(range(len(columns["seq"])))  # drops never leave holes in seq
    assert columns["event"].tolist() == sorted(columns["event"].tolist())


class OddIdentitySource(ListSource):
    """Frames whose identities strain the log's columns: a run number beyond int32 (psana's is uint32), a truth
    count beyond int8, and one event index beyond int64, which no column can hold."""

    def frames(self) -> Iterator[Frame | None]:
        for i, a in enumerate(self.arrays):
            event = 2**63 if i == 5 else i
            yield Frame(EventId("mem", 3_000_000_000, event, 0), a, time.perf_counter_ns(), 300 if i == 2 else 1)


def test_an_identity_the_log_cannot_hold_costs_that_event_alone_and_is_counted(fx: Fixtures, tmp_path: Path) -> None:
    frames = list(np.random.default_rng(4).poisson(1.0, (12, SIDE, SIDE)).astype(np.float32))
    settings = _settings(tmp_path, batch={"max_size": 8, "max_wait_ms": 1000})  # event 5 inside a batch of 8
    decisions, end, r = _serve_one_run(fx, settings, OddIdentitySource(frames))
    assert r.pipeline.error is None
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    events = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert columns["event"].tolist() == [d["event"] for d in decisions] == events
    assert columns["seq"].tolist() == [d["seq"] for d in decisions] == list(range(11))  # no hole where 5 was
    assert set(columns["run"].tolist()) == {d["run"] for d in decisions} == {3_000_000_000}
    assert columns["truth_n_particles"].tolist() == [1, 1, -1, 1, 1, 1, 1, 1, 1, 1, 1]  # unknown, not wrapped
    assert r.metrics.dropped.labels(reason="internal")._value.get() == 1
    assert attrs["events"] == end["events"] == 11 and attrs["dropped"] == end["dropped"] == 1


def test_a_worker_that_fails_counts_what_it_never_decided(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing fails for good after 20 decisions: the worker stops, and every frame read is in the log or
    counted as dropped (internal), none released twice or kept."""
    published = 0

    def failing(self: ZmqPublisher, topic: str, payload: dict[str, Any]) -> None:
        nonlocal published
        if topic == DECISION:
            published += 1
            if published > 20:
                raise RuntimeError("the socket is gone")

    monkeypatch.setattr(ZmqPublisher, "publish", failing)
    frames = list(np.random.default_rng(6).poisson(1.0, (200, SIDE, SIDE)).astype(np.uint16))
    source = ListSource(frames)
    r = _start(_settings(tmp_path, queue_size=64, batch={"max_size": 4}), source, fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert isinstance(r.pipeline.error, RuntimeError)
    columns, attrs = read_decision_log(r.pipeline.logs[0])
    dropped = r.metrics.dropped.labels(reason="internal")._value.get()
    assert dropped > 0 and attrs["dropped"] == dropped
    read = len(source.released)  # the reader stops once the worker has failed: not every frame is read
    assert source.released == Counter(range(read))  # each read frame handed back once
    assert attrs["events"] + dropped == len(columns["seq"]) + dropped == read  # the batch that failed: logged


def test_a_failure_between_runs_of_one_batch_counts_the_frames_after_it(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch holds run 1's frames, its end and run 2's frames; announcing run 2 fails. Run 1's frames
    are decided, run 2's counted as dropped (internal): none is left unaccounted for or handed back twice."""
    real = ZmqPublisher.publish

    def failing(self: ZmqPublisher, topic: str, payload: dict[str, Any]) -> None:
        if topic == RUN and payload["phase"] == "begin" and payload["run"] == 2:
            raise RuntimeError("the socket is gone")
        real(self, topic, payload)

    monkeypatch.setattr(ZmqPublisher, "publish", failing)
    source = TwoRunSource(list(np.random.default_rng(8).poisson(1.0, (4, SIDE, SIDE)).astype(np.uint16)), lambda: None)
    batch = {"max_size": 16, "max_wait_ms": 1000}  # all of both runs in one batch (the source ends before 1 s)
    r = _start(_settings(tmp_path, batch=batch), source, fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert isinstance(r.pipeline.error, RuntimeError)
    assert r.pipeline.total.events == 4 and r.pipeline.total.dropped == 4
    assert r.metrics.dropped.labels(reason="internal")._value.get() == 4
    assert source.released == Counter({i: 2 for i in range(4)})  # each frame of each run handed back once


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_the_bank_decides_on_one_blas_thread_and_the_callers_setting_returns(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bank's small matrix products run on one BLAS thread while the service runs (threads spinning for
    each other on busy cores cost 2-8 ms a batch), and the caller's setting is back once it is done."""
    seen: list[set[int]] = []
    decide = ReferenceBank.decide

    def noting(bank: ReferenceBank, embeddings: np.ndarray) -> Any:
        seen.append(_blas_threads())
        return decide(bank, embeddings)

    monkeypatch.setattr(ReferenceBank, "decide", noting)
    frames = list(np.random.default_rng(4).poisson(1.0, (6, SIDE, SIDE)).astype(np.uint16))
    with threadpool_limits(2, user_api="blas"):
        assert _blas_threads() == {2}
        r = _start(_settings(tmp_path), ListSource(frames), fx.model, fx.bank)
        r.pipeline.start()
        assert r.pipeline.wait(WAIT_S)
        r.publisher.close()
        assert seen and all(threads == {1} for threads in seen)
        assert _blas_threads() == {2}
    assert r.pipeline.error is None


# HITFINDER_REQUIRE_CUDA=1 (the device machine's check) makes them run, and fail, where torch sees no GPU (a CPU
# wheel of torch carried to the GPU machine would otherwise skip them and look green)
REQUIRE_CUDA = os.environ.get("HITFINDER_REQUIRE_CUDA") == "1"
CUDA_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available() and not REQUIRE_CUDA, reason="needs a CUDA device (run on the device machine)"
)


def _decide_all(settings: ServeSettings, frames: list[np.ndarray], fx: Fixtures) -> tuple[dict[str, Any], Running]:
    r = _start(settings, ListSource(frames), fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert r.pipeline.error is None
    columns, _ = read_decision_log(r.pipeline.logs[0])
    return columns, r


class Clock:
    """The pipeline's `time` module with a perf_counter that a source can move on: waits without waiting."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.ahead_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class TickingSource(ListSource):
    """A paced source: between its frames only idle ticks (None), as a psana reader gives while it waits; each
    tick moves `clock` on by `tick_s`."""

    def __init__(self, arrays: list[np.ndarray], ticks: int, tick_s: float, clock: Clock) -> None:
        super().__init__(arrays)
        self.ticks, self.tick_s, self.clock = ticks, tick_s, clock

    def frames(self) -> Iterator[Frame | None]:
        for i, frame in enumerate(super().frames()):
            if i:
                for _ in range(self.ticks):
                    self.clock.ahead_s += self.tick_s
                    yield None
            yield frame


def test_the_read_stage_of_a_paced_source_is_the_time_between_its_events(
    fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle ticks between two events are not events: the second frame's read stage spans all of them (4 ticks
    of 10 s on the pipeline's clock), not the last tick's 10 s alone."""
    clock = Clock()
    monkeypatch.setattr(pipeline_module, "time", clock)
    images = np.random.default_rng(2).poisson(2.0, (2, SIDE, SIDE)).astype(np.float32)
    r = _start(_settings(tmp_path), TickingSource(list(images), ticks=4, tick_s=10.0, clock=clock), fx.model, fx.bank)
    r.pipeline.start()
    assert r.pipeline.wait(WAIT_S)
    r.publisher.close()
    assert r.metrics.stage.labels(stage="read")._sum.get() >= 40.0


@CUDA_ONLY
def test_the_cuda_path_decides_as_the_cpu_path(fx: Fixtures, tmp_path: Path) -> None:
    """Raw uint16 through the pinned buffer, converted (gain, offset) and binned on the device, blanks found by
    the lit-pixel pre-filter there, the thumbnails handed to onnxruntime by IO binding: the same labels and
    scores as the CPU path, and the frames' NaN check too."""
    images, _ = _patterns(np.random.default_rng(5), 40)
    raw = [np.round(im * 2.0 + 1.0).astype(np.uint16) for im in images]
    nan = images[0].copy()
    nan[1, 1] = np.nan
    frames = [*raw, nan, images[1] * 2.0 + 1.0]
    more = {"calibration": {"gain": 2.0, "offset": 1.0}, "prefilter": {"kind": "lit_pixels", "min_lit_pixels": 30}}
    on = {}
    for device in ("cpu", "cuda"):
        columns, r = _decide_all(_settings(tmp_path / device, device=device, **more), [f.copy() for f in frames], fx)
        on[device] = columns
        if device == "cuda":
            assert r.pipeline.device.type == "cuda"
            assert all(buf.is_pinned() for buf in r.pipeline._host.values())
            assert set(r.pipeline._sent) <= set(r.pipeline._host)  # each buffer's last copy out is waited for
            assert np.dtype(np.uint16) in r.pipeline._host  # whole batches of raw uint16 went to the device as such
            assert r.pipeline.embedder.on_gpu, "IO binding needs onnxruntime-gpu (the gpu extra)"
    assert on["cuda"]["label"].tolist() == on["cpu"]["label"].tolist()
    assert on["cuda"]["label"][len(raw)] == "error"
    np.testing.assert_allclose(on["cuda"]["score"], on["cpu"]["score"], atol=1e-4)


@CUDA_ONLY
def test_io_binding_on_cuda_tensors_gives_the_host_embeddings(fx: Fixtures) -> None:
    emb = OnnxEmbedder(fx.model)
    if not emb.on_gpu:
        why = f"onnxruntime has no GPU provider here ({emb.provider}): install onnxruntime-gpu"
        pytest.fail(why) if REQUIRE_CUDA else pytest.skip(why)
    thumbs = torch.randn(7, 1, 16, 16)
    np.testing.assert_allclose(emb.embed(thumbs.cuda()), emb.embed(thumbs.numpy()), rtol=1e-4, atol=1e-5)
    # written on torch's stream behind 0.1 s of other work: onnxruntime must wait for it, not read zeros
    late = torch.zeros(7, 1, 16, 16, device="cuda")
    torch.cuda._sleep(10**8)
    late.copy_(thumbs.cuda(), non_blocking=True)
    np.testing.assert_allclose(emb.embed(late), emb.embed(thumbs.numpy()), rtol=1e-4, atol=1e-5)


def test_the_publisher_counts_every_subscription_and_survives_a_message_it_cannot_encode() -> None:
    """XPUB_VERBOSER: a topic two subscribers hold counts twice, and each leaving counts. A message msgpack
    cannot pack (an integer beyond 64 bits) is logged and skipped; the publisher thread goes on."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = ZmqPublisher(endpoint, 1000)
    try:
        both = DecisionClient(endpoint, (DECISION, HEARTBEAT), timeout_s=WAIT_S)
        one = DecisionClient(endpoint, (DECISION,), timeout_s=WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while publisher.subscriptions < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert publisher.subscriptions == 3
        one.close()
        while publisher.subscriptions > 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert publisher.subscriptions == 2
        both.close()
        while publisher.subscriptions > 0 and time.monotonic() < deadline:  # or raw's would be taken for both's
            time.sleep(0.02)
        assert publisher.subscriptions == 0
        raw = zmq.Context.instance().socket(zmq.SUB)  # the payloads below are no schema's: read them raw
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(endpoint)
        while publisher.subscriptions < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher.publish(HEARTBEAT, {"next_seq": 2**64})  # msgpack cannot pack it
        publisher.publish(HEARTBEAT, {"next_seq": 5})
        assert raw.poll(WAIT_S * 1000)
        topic, body = raw.recv_multipart()
        raw.close(0)
        assert (topic, msgpack.unpackb(body)["next_seq"]) == (HEARTBEAT.encode(), 5)
    finally:
        publisher.close()


def test_a_frozen_subscriber_is_dropped_with_its_subscriptions() -> None:
    """A subscriber that stops answering ZeroMQ's pings (its process stopped: a host gone to sleep looks the
    same) is dropped after the peer timeout, with its subscriptions and the messages queued for it; one that
    is alive stays. Without pings it would be held until TCP gave up (many minutes while data flow)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = ZmqPublisher(endpoint, 1000, peer_timeout_s=0.6)
    code = f"import time, zmq; s = zmq.Context().socket(zmq.SUB); s.subscribe(b'decision'); s.connect({endpoint!r})"
    frozen = subprocess.Popen([sys.executable, "-c", code + "; time.sleep(600)"])
    try:
        alive = DecisionClient(endpoint, (DECISION,), timeout_s=WAIT_S)
        _wait_until(lambda: publisher.subscriptions == 2, "both subscriptions")
        frozen.send_signal(signal.SIGSTOP)
        _wait_until(lambda: publisher.subscriptions == 1, "the frozen subscriber dropped")
        publisher.publish(DECISION, {"seq": 0})  # no schema's payload: read raw below
        assert alive._sock.poll(WAIT_S * 1000)  # the live one still receives
        alive.close()
    finally:
        frozen.kill()
        frozen.wait()
        publisher.close()


def _listen_to(messages: list[list[bytes]], *args: str) -> subprocess.CompletedProcess[str]:
    """`listen --json` on an XPUB of our own that sends `messages` once listen has subscribed."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    xpub = zmq.Context.instance().socket(zmq.XPUB)
    xpub.bind(endpoint)
    try:
        listen = subprocess.Popen(
            [*LCLS_HITFINDER, "listen", endpoint, "--json", "--timeout", "2", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3):  # decision, heartbeat, run
            assert xpub.poll(WAIT_S * 1000), "listen never subscribed"
            xpub.recv()
        for frames in messages:
            xpub.send_multipart(frames)
        out, err = listen.communicate(timeout=WAIT_S)
    finally:
        xpub.close(0)
    return subprocess.CompletedProcess(listen.args, listen.returncode, out, err)


def _message(topic: str, version: int = SCHEMA_VERSION, **values: Any) -> list[bytes]:
    payload = {f.name: 0 for f in FIELDS[topic]} | values | {"v": version}
    return [topic.encode(), msgpack.packb(payload)]


def test_listen_skips_what_is_not_the_services_and_reports_losses_a_heartbeat_reveals() -> None:
    """Decisions 7-9 lost at the end of the stream show in no later decision: the heartbeat's next_seq says so.
    A topic that only shares a prefix, and a payload that does not decode, are skipped and counted."""
    decisions = [_message(DECISION, seq=s, experiment=b"raw\xffbytes") for s in range(7)]
    foreign = [[b"runner", msgpack.packb({"x": 1})], [b"decision", b"\xff"]]
    done = _listen_to([*decisions, *foreign, _message(HEARTBEAT, next_seq=10)])
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [m["topic"] for m in lines] == [DECISION] * 7 + [HEARTBEAT]
    assert lines[0]["experiment"] == "raw\ufffdbytes"  # msgpack bytes as text in --json, not a TypeError
    assert "gap: seq 7..9 missing (3)" in done.stderr
    assert "7 decisions, 1 gap(s), 3 missing, 1 message(s) not the service's skipped" in done.stderr


def test_a_subscriber_of_heartbeats_alone_misses_no_decisions_but_sees_a_restart() -> None:
    """Heartbeats announce ever later seqs: to a client that never subscribed to decisions those are no gap
    (listen --topic heartbeat reported every second's decisions lost); another instance is still a restart."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    xpub = zmq.Context.instance().socket(zmq.XPUB)
    xpub.bind(endpoint)
    try:
        with DecisionClient(endpoint, (HEARTBEAT,), timeout_s=1) as client:
            assert xpub.poll(WAIT_S * 1000), "the client never subscribed"
            xpub.recv()
            for next_seq, instance in ((5, "a"), (120, "a"), (7, "b")):
                xpub.send_multipart(_message(HEARTBEAT, next_seq=next_seq, instance=instance))
            beats = [p["next_seq"] for _, p in client.messages()]
    finally:
        xpub.close(0)
    assert beats == [5, 120, 7] and client.gaps == [] and client.tracker.restarts == 1


def test_listen_refuses_another_schema_version_in_one_line() -> None:
    done = _listen_to([_message(DECISION, version=SCHEMA_VERSION + 1, seq=0)])
    errors = [line for line in done.stderr.splitlines() if line.startswith("lcls-hitfinder: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "schema version" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_listen_piped_into_a_reader_that_stops_ends_with_its_summary() -> None:
    """`listen --json | head -1`: the closed pipe ends listen quietly (exit 0) with the gap summary on stderr."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    xpub = zmq.Context.instance().socket(zmq.XPUB)
    xpub.bind(endpoint)
    read_fd, write_fd = os.pipe()
    try:
        listen = subprocess.Popen(
            [*LCLS_HITFINDER, "listen", endpoint, "--json", "--timeout", "5"],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_fd)
        for _ in range(3):
            assert xpub.poll(WAIT_S * 1000), "listen never subscribed"
            xpub.recv()
        xpub.send_multipart(_message(DECISION, seq=0))
        with os.fdopen(read_fd) as reader:
            assert json.loads(reader.readline())["seq"] == 0
        for seq in range(1, 200):  # the pipe is closed: listen's next writes fail
            xpub.send_multipart(_message(DECISION, seq=seq))
        _, err = listen.communicate(timeout=WAIT_S)
    finally:
        xpub.close(0)
    assert listen.returncode == 0 and "Traceback" not in err, err
    assert "decisions, 0 gap(s), 0 missing" in err

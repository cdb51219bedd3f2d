"""`lcls-hitfinder serve` on psana data, the real commands in subprocesses: an XTC2 file written with
psana's DgramEdit (decisions = `classify`), live shared memory through a shmemServer that is killed and
replaced mid-run, and the `demo` command. Subscribers are real ZeroMQ SUB sockets."""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from psana_helpers import frame_of, leftovers, shm_files, write_run
from tiny_model import free_port, tiny_model_and_bank

from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.dataset import Dataset
from lcls_hitfinder.model_io import file_hash
from lcls_hitfinder.service.client import DecisionClient
from lcls_hitfinder.service.decision_log import read_decision_log
from lcls_hitfinder.service.messages import DECISION, HEARTBEAT, RUN
from lcls_hitfinder.service.sources.shmem_server import ShmemServer
from lcls_hitfinder.service.sources.xtc2_writer import Xtc2Writer
from lcls_hitfinder.simulate.generate import simulate_dataset
from lcls_hitfinder.simulate.settings import SimulateSettings

pytest.importorskip("psana.psexp", reason="psana2 is not installed (pip install 'lcls-hitfinder[psana]')")

pytestmark = pytest.mark.psana
CLI = str(Path(sys.executable).parent / "lcls-hitfinder")
SIDE = 64
WAIT_S = 90.0  # a deadline against hanging, never a speed requirement


@dataclass
class Model:
    model: Path
    bank: Path
    simulate: SimulateSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A tiny exported embedder and a bank of its embeddings of simulated, labelled patterns."""
    d = tmp_path_factory.mktemp("psana_model")
    settings = SimulateSettings(detector={"shape": (SIDE, SIDE)}, seed=11)
    model, bank = tiny_model_and_bank(d, settings)
    return Model(model, bank, settings)


def serve_config(path: Path, tiny: Model, source: str, endpoint: str, **extra: Any) -> Path:
    serve: dict[str, Any] = {
        "source": source,
        "model": str(tiny.model),
        "bank": str(tiny.bank),
        "prefilter": {"kind": "none"},  # every event through the model (one test sets the default's)
        "log_dir": str(path.parent / "logs"),
        "publish": {"endpoint": endpoint, "wait_for_subscriber_s": WAIT_S, "heartbeat_s": 0.2},
        "metrics": {"port": None},
        **extra,
    }
    path.write_text(yaml.safe_dump({"serve": serve}))
    return path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str] | ShmemServer]]:
    """Everything a test starts, stopped at the end even when the test fails."""
    started: list[subprocess.Popen[str] | ShmemServer] = []
    yield started
    for p in reversed(started):
        if isinstance(p, ShmemServer):
            p.stop()
        elif p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize(
    ("mode", "binning", "prefilter"),
    [("xtc2", "never", "none"), ("xtc2", "always", "none"), ("exp-mpi", "always", "none"), ("xtc2", "never", "lit")],
)
def test_xtc2_run_through_serve_equals_classify(
    tiny: Model, tmp_path: Path, processes: list[Any], mode: str, binning: str, prefilter: str
) -> None:
    """The run as a file, and as an experiment directory read by psana's MPI mode (two big-data ranks handing
    over batches of 4 out of order): the same decisions either way, one per event, seq contiguous; and the
    same whether the frames cross to the service whole or binned by the reader (each MPI rank its own).
    `classify` with the service's config gives the same labels, its pre-filter's blanks included."""
    data = simulate_dataset(tiny.simulate, tmp_path / "data.h5", n=24, workers=1, progress=False)
    xtc2 = tmp_path / "run.xtc2"
    xtc = tmp_path / "xtc"  # the same run in psana's exp= layout, smalldata included
    made = subprocess.run(
        [CLI, "xtc2", str(data), "--out", str(xtc2), "--exp", "cxitest23", "--run", "4", "--exp-dir", str(xtc)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    constants = f"constants={tmp_path / 'run.constants.npz'}"  # the mask, as psana's pixel_mask
    if mode == "xtc2":
        source = f"xtc2:{xtc2}?det=cam&{constants}"
    else:
        assert f"--source 'exp:cxitest23:4?dir={xtc}&det=cam&{constants}'" in made.stdout
        source = f"exp:cxitest23:4?dir={xtc}&det=cam&ranks=4&batch=4&{constants}"
    with Dataset(data) as d:  # a cut that finds some of the hits too dim (the model would have judged them)
        lit_pixels = ((d.photon_images(np.arange(len(d))) * d.mask) > 0.5).sum((1, 2))
        cut = int(np.median(lit_pixels[d.n_particles > 0]))
    lit = {"kind": "lit_pixels", "min_lit_pixels": cut} if prefilter == "lit" else {"kind": "none"}
    reader = {"bin_in_reader": binning}
    config = serve_config(tmp_path / "serve.yaml", tiny, source, endpoint, reader=reader, prefilter=lit)
    with DecisionClient(endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client:
        serve = subprocess.Popen(
            [CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        processes.append(serve)
        decisions, end = [], {}
        for topic, payload in client.messages():
            if topic == DECISION:
                decisions.append(payload)
            elif payload["phase"] == "end":
                end = payload
                break
        output, _ = serve.communicate(timeout=WAIT_S)
    assert serve.returncode == 0, output
    with Dataset(data) as d:
        n, truth = len(d), d.n_particles.tolist()
    said = " ".join(output.split())  # the log's lines are wrapped at the terminal's width
    assert f"{n if binning == 'always' else 0} binned by the reader" in said, said
    assert [m["seq"] for m in decisions] == list(range(n)) and client.gaps == []
    decisions.sort(key=lambda m: m["event"])  # MPI ranks decide their batches as they come
    assert [(m["experiment"], m["run"], m["event"]) for m in decisions] == [("cxitest23", 4, i) for i in range(n)]
    assert [m["truth_n_particles"] for m in decisions] == truth
    stamps = [m["timestamp"] for m in decisions]
    assert stamps == sorted(stamps) and len(set(stamps)) == n
    assert all(m["pulse_id"] is not None for m in decisions)
    assert end["events"] == n and end["ended"] == "run_end"  # psana's EndRun: the whole run was read

    csv_out = str(tmp_path / "classify.csv")
    files = ["--model", str(tiny.model), "--bank", str(tiny.bank), "--data", str(data), "--out", csv_out]
    classified = subprocess.run(
        [CLI, "classify", *files, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert classified.returncode == 0, classified.stderr
    with open(csv_out) as f:
        offline = list(csv.DictReader(f))
    assert [m["label"] for m in decisions] == [row["label"] for row in offline]
    np.testing.assert_allclose([m["score"] for m in decisions], [float(r["score"]) for r in offline], atol=1e-4)
    served_distance = [np.nan if m["distance"] is None else m["distance"] for m in decisions]
    np.testing.assert_allclose(served_distance, [float(r["distance"]) for r in offline], atol=1e-4)  # NaN: none
    assert len({m["label"] for m in decisions}) > 1, "a test where every label is the same proves little"
    prefiltered = [m["truth_n_particles"] for m in decisions if m["reason"] == "prefilter"]
    assert (0 < sum(t > 0 for t in prefiltered) < n) if prefilter == "lit" else prefiltered == [], prefiltered


def test_sigterm_while_the_source_opens_closes_what_was_started(
    tiny: Model, tmp_path: Path, processes: list[Any]
) -> None:
    """SIGTERM while psana's MPI ranks are starting: the service stops as asked (no traceback, exit 0) and
    leaves neither ranks nor shared memory behind."""
    data = simulate_dataset(tiny.simulate, tmp_path / "data.h5", n=8, workers=1, progress=False)
    xtc = tmp_path / "xtc"
    made = subprocess.run(
        [
            CLI,
            "xtc2",
            str(data),
            "--out",
            str(tmp_path / "run.xtc2"),
            "--exp",
            "cxitest23",
            "--run",
            "4",
            "--exp-dir",
            str(xtc),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    source = f"exp:cxitest23:4?dir={xtc}&det=cam&ranks=3"
    config = serve_config(tmp_path / "serve.yaml", tiny, source, f"tcp://127.0.0.1:{free_port()}")
    serve, output = _signalled_while_opening(config, processes, signal.SIGTERM)
    assert serve.returncode == 0 and "stopped before serving" in output and "Traceback" not in output, output
    assert "SIGTERM while starting" in output and "serving exp:" not in output, output  # it came while opening
    assert leftovers(serve.pid) == []
    assert _ranks_of(serve.pid) == []  # MpiRun.join waited for them; nothing is left to psana's hydra


def test_sighup_while_the_source_opens_is_a_reload_once_serving(
    tiny: Model, tmp_path: Path, processes: list[Any]
) -> None:
    """`systemctl reload` (SIGHUP) while psana opens the run: by default it ended the service (and systemd
    does not restart a service ended by SIGHUP); now the bank is reloaded once serving and the run is served."""
    data = simulate_dataset(tiny.simulate, tmp_path / "data.h5", n=8, workers=1, progress=False)
    made = subprocess.run(
        [CLI, "xtc2", str(data), "--out", str(tmp_path / "run.xtc2")], capture_output=True, text=True, timeout=WAIT_S
    )
    assert made.returncode == 0, made.stdout + made.stderr
    publish = {"endpoint": f"tcp://127.0.0.1:{free_port()}"}
    config = serve_config(tmp_path / "serve.yaml", tiny, f"xtc2:{tmp_path / 'run.xtc2'}?det=cam", "", publish=publish)
    serve, output = _signalled_while_opening(config, processes, signal.SIGHUP)
    assert serve.returncode == 0 and "Traceback" not in output, output
    assert "SIGHUP while starting" in output and "bank reloaded from" in output, output
    (log_file,) = (tmp_path / "logs").rglob("*.h5")
    columns, attrs = read_decision_log(log_file)
    assert attrs["complete"] and columns["seq"].tolist() == list(range(8))
    assert leftovers(serve.pid) == []


def _signalled_while_opening(
    config: Path, processes: list[Any], signum: signal.Signals
) -> tuple[subprocess.Popen[str], str]:
    """`serve --config config`, sent `signum` once its psana reader has begun to open the source; its output."""
    serve = subprocess.Popen(
        [CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    processes.append(serve)
    deadline = time.monotonic() + WAIT_S
    while not glob.glob(f"/dev/shm/lhf_{serve.pid}_*"):  # the reader's segments: the source is opening
        assert serve.poll() is None and time.monotonic() < deadline, "the source never began to open"
        time.sleep(0.05)
    serve.send_signal(signum)
    output, _ = serve.communicate(timeout=WAIT_S)
    return serve, output


def _ranks_of(pid: int) -> list[str]:
    """Command lines of live MPI ranks of service `pid` (their socket lies under /dev/shm/lhf_PID_*)."""
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            args = Path(cmdline).read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"lcls_hitfinder.service.mpi_rank" in args and any(
            a.startswith(f"/dev/shm/lhf_{pid}_".encode()) for a in args
        ):
            found.append(b" ".join(args).decode())
    return found


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} is not exported"
    return values[0]


def test_live_shmem_survives_a_killed_server(tiny: Model, tmp_path: Path, processes: list[Any]) -> None:
    """The server dies mid-run (the reader freezes with the GIL held); a new one serves the next run, whose
    frames have another shape (the detector set up anew, as a DAQ does between runs): decided, not errors."""
    shape, shape2 = (SIDE, SIDE), (2 * SIDE, 2 * SIDE)
    end_ns = write_run(tmp_path / "a.xtc2", 200, shape, run=1)
    write_run(tmp_path / "b.xtc2", 100, shape2, run=2, start_ns=end_ns + 10**9)  # later timestamps
    tag = f"lhfserve{time.monotonic_ns() % 10**9}"
    first = ShmemServer(tag, [tmp_path / "a.xtc2"], rate_hz=30, buffer_bytes=2 * SIDE * SIDE).start()
    processes.append(first)
    endpoint, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    config = serve_config(
        tmp_path / "serve.yaml",
        tiny,
        f"shmem:{tag}?det=cam",
        endpoint,
        metrics={"port": metrics_port},
        reader={"stall_s": 1.5, "backoff_s": 0.3, "max_backoff_s": 1.0},
    )
    runs: dict[int, int] = {1: 0, 2: 0}
    labels: dict[int, set[str]] = {1: set(), 2: set()}
    seqs: list[int] = []
    beats_while_down = 0
    second: ShmemServer | None = None
    with DecisionClient(endpoint, (DECISION, HEARTBEAT, RUN), timeout_s=WAIT_S) as client:
        serve = subprocess.Popen(
            [CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        processes.append(serve)
        for topic, payload in client.messages():
            if topic == DECISION:
                runs[payload["run"]] += 1
                labels[payload["run"]].add(payload["label"])
                seqs.append(payload["seq"])
                if runs[1] == 5:
                    first.kill()
            elif topic == HEARTBEAT and not first.running and second is None:
                beats_while_down += 1  # the service keeps heartbeating while its reader is frozen
                if payload["source_restarts"] >= 1 and beats_while_down >= 3:
                    first.stop()
                    second = ShmemServer(tag, [tmp_path / "b.xtc2"], rate_hz=30, buffer_bytes=8 * SIDE * SIDE)
                    processes.append(second.start())
            if runs[2] >= 5:
                break
        restarts = _metric(metrics_port, "hitfinder_source_restarts_total")
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=WAIT_S)
    assert serve.returncode == 0, output
    assert 5 <= runs[1] < 200 and runs[2] >= 5
    assert "error" not in labels[1] | labels[2], labels
    assert restarts >= 1
    assert seqs == list(range(len(seqs))) and client.gaps == []
    assert leftovers(serve.pid) == []


def test_a_nan_frame_and_an_event_without_the_detector_are_error_decisions_through_serve(
    tiny: Model, tmp_path: Path, processes: list[Any]
) -> None:
    """Through psana and `serve` (the issue's acceptance test on the real path): a float32 run whose event 2
    holds a NaN pixel and whose event 5 lacks the camera's data (psana hands over no frame: the service sees
    one of shape (0,)). Each is an `error` decision with its reason; every other event is decided, seq
    contiguous, and the service ends the run and exits 0."""
    run = tmp_path / "run.xtc2"
    frames = [frame_of(i, (SIDE, SIDE)).astype(np.float32) for i in range(8)]
    frames[2][3, 4] = np.nan
    with Xtc2Writer(run, (SIDE, SIDE), np.float32) as w:
        for i, frame in enumerate(frames):
            w.write(None if i == 5 else frame, n_particles=i % 5)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = serve_config(tmp_path / "serve.yaml", tiny, f"xtc2:{run}?det=cam", endpoint)
    with DecisionClient(endpoint, (DECISION, RUN), timeout_s=WAIT_S) as client:
        serve = subprocess.Popen(
            [CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        processes.append(serve)
        decisions = []
        for topic, payload in client.messages():
            if topic == DECISION:
                decisions.append(payload)
            elif payload["phase"] == "end":
                break
        output, _ = serve.communicate(timeout=WAIT_S)
    assert serve.returncode == 0, output
    assert [d["seq"] for d in decisions] == list(range(8)) and [d["event"] for d in decisions] == list(range(8))
    labels = [d["label"] for d in decisions]
    assert labels[2] == labels[5] == "error" and "error" not in labels[:2] + labels[3:5] + labels[6:], labels
    assert decisions[2]["reason"] == "nonfinite: NaN or Inf pixels"
    assert decisions[5]["reason"] == "shape: the detector is missing from this event"
    assert leftovers(serve.pid) == []


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (the demo's service and shmemServer run in sessions of their own)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _kill_with_children(demo: subprocess.Popen[Any]) -> None:
    """A demo that failed its test: its service and shmemServer (sessions of their own) outlive it otherwise."""
    for pid in _children(demo.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    demo.kill()
    demo.communicate()


def _run_demo(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    demo = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = demo.communicate(timeout=timeout)
    finally:
        if demo.poll() is None:
            _kill_with_children(demo)
    return subprocess.CompletedProcess(args, demo.returncode, out, err)


def test_demo_runs_the_real_path_and_cleans_up(tiny: Model, tmp_path: Path) -> None:
    before = shm_files()  # the demo's service is a process of its own: any new segment is the demo's
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"simulate": {"detector": {"shape": [SIDE, SIDE]}, "seed": 5}}))
    models = ["--model", str(tiny.model), "--workdir", str(tmp_path / "demo")]  # the bank: built for the sample
    demo = _run_demo([CLI, "demo", "--n", "40", "--rate", "40", "--config", str(config), *models], timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "accuracy" in demo.stdout and "true particle count vs label" in demo.stdout
    assert "Hz on average" in demo.stdout and "Hz now" not in demo.stdout  # the run is over: no rate of late
    assert "building this sample's bank" in demo.stdout
    bank = ReferenceBank.load(tmp_path / "demo" / "bank.h5", expected_model_hash=file_hash(tiny.model))
    assert sorted(np.bincount(bank.n_particles).tolist()) == [10] * 5  # 10 references per particle count
    logs = list((tmp_path / "demo" / "decisions").glob("*.h5"))
    assert len(logs) == 1
    columns, attrs = read_decision_log(logs[0])
    assert attrs["complete"] and 0 < len(columns["seq"]) <= 40  # live shared memory may skip events
    assert f"files in {tmp_path / 'demo'}" in demo.stdout.splitlines()  # whole, on a line of its own
    assert f"next: lcls-hitfinder summary {logs[0]} --plot run.png" in demo.stdout.splitlines()
    kept, true_single = columns["label"] == "single", columns["truth_n_particles"] == 1
    assert kept.any() and true_single.any()
    purity = f"{(kept & true_single).sum() / kept.sum():.1%} of the kept are true singles"  # as the log has it
    assert purity in " ".join(demo.stdout.split())
    assert columns["seq"].tolist() == list(range(len(columns["seq"])))
    assert set(columns["truth_n_particles"].tolist()) <= {0, 1, 2, 3, 4}  # truth came through shared memory
    assert glob.glob("/dev/shm/PdsMonitorSharedMemory_hitfinder_demo_*") == []
    assert shm_files() - before == set()


@pytest.mark.parametrize(("nohup", "again"), [(False, False), (True, False), (False, True)])
def test_a_hangup_stops_the_demo_and_everything_it_started(
    tiny: Model, tmp_path: Path, nohup: bool, again: bool
) -> None:
    """A closed terminal (SIGHUP): psana's MPI library (UCX) takes SIGHUP when psana is imported, and the demo
    went on with its server and service; now it stops them as Ctrl-C does and leaves nothing behind. Under
    nohup (SIGHUP ignored) it goes on, until SIGTERM stops it. A second signal while the service drains (an
    impatient Ctrl-C) kills the service, and the server is still stopped (it lived on)."""
    before = shm_files()
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"simulate": {"detector": {"shape": [SIDE, SIDE]}, "seed": 5}}))
    workdir = tmp_path / "demo"
    args = ["demo", "--n", "2000", "--rate", "20", "--config", str(config), "--model", str(tiny.model)]
    demo = subprocess.Popen(
        [CLI, *args, "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        serve_log = workdir / "serve.log"
        while not (serve_log.exists() and " begins " in serve_log.read_text(errors="replace")):
            assert demo.poll() is None and time.monotonic() < deadline, "the demo's service never began its run"
            time.sleep(0.2)
        started = _children(demo.pid)
        assert len(started) == 2  # the service and shmemServer
        demo.send_signal(signal.SIGHUP)
        if again:
            time.sleep(0.1)
            demo.send_signal(signal.SIGTERM)
        if nohup:
            with pytest.raises(subprocess.TimeoutExpired):
                demo.wait(3)  # a deadline it must outlive, not a speed: the run lasts 100 s
            assert _children(demo.pid) == started
            demo.send_signal(signal.SIGTERM)
        out, _ = demo.communicate(timeout=WAIT_S)
    finally:
        if demo.poll() is None:
            _kill_with_children(demo)
    assert demo.returncode == 130 and b"stopping the service and the server" in out, out.decode(errors="replace")
    assert all(not Path(f"/proc/{pid}").exists() for pid in started)
    assert glob.glob("/dev/shm/PdsMonitorSharedMemory_hitfinder_demo_*") == []
    assert shm_files() - before == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="makes the service fail by asking for CUDA where there is none")
def test_demo_fails_with_the_service_s_own_error_when_the_service_fails(tiny: Model, tmp_path: Path) -> None:
    before = shm_files()
    config = tmp_path / "demo.yaml"
    config.write_text(
        yaml.safe_dump({"simulate": {"detector": {"shape": [SIDE, SIDE]}, "seed": 5}, "serve": {"device": "cuda"}})
    )
    args = [CLI, "demo", "--n", "5", "--config", str(config), "--model", str(tiny.model)]
    demo = _run_demo([*args, "--workdir", str(tmp_path / "demo")], timeout=300)
    assert demo.returncode == 2, demo.stdout + demo.stderr
    error = "lcls-hitfinder: error: the service failed: serve.device is cuda but torch sees no CUDA device"
    assert demo.stderr.strip().splitlines()[-1] == error
    assert shm_files() - before == set()


@pytest.mark.parametrize("wrong", ["bank", "model"])
def test_demo_refuses_a_bank_of_another_model_or_a_file_that_is_no_model_before_simulating(
    tiny: Model, tmp_path: Path, wrong: str
) -> None:
    bank = tmp_path / "bank.h5"
    ReferenceBank(np.zeros((2, 4), np.float32), np.array([0, 1]), "another-model").save(bank)
    files = ["--model", str(tiny.model), "--bank", str(bank)] if wrong == "bank" else ["--model", str(bank)]
    demo = subprocess.run(
        [CLI, "demo", *files, "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=300
    )
    message = "was built for model another-model" if wrong == "bank" else f"cannot read model {bank}"
    assert demo.returncode == 2 and message in demo.stderr, demo.stdout + demo.stderr
    assert not (tmp_path / "demo" / "run.h5").exists()


def test_a_demo_whose_server_fails_is_an_error_not_a_success(
    tiny: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shmemServer exits at once (here: /bin/false in its place; at a beamline, say, a container's small
    /dev/shm): no decision comes, and the demo says so and fails instead of reporting "done"."""
    from typer.testing import CliRunner

    from lcls_hitfinder.cli import app
    from lcls_hitfinder.errors import UserError
    from lcls_hitfinder.service.sources import shmem_server

    monkeypatch.setattr(shmem_server, "psana_tool", lambda name: Path("/bin/false"))
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"simulate": {"detector": {"shape": [SIDE, SIDE]}, "seed": 5}}))
    args = ["demo", "--n", "10", "--config", str(config), "--model", str(tiny.model), "--workdir", str(tmp_path / "d")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    assert "no decision came from the service" in str(result.exception)
    assert str(tmp_path / "d" / "shmemServer.log") in str(result.exception)
    assert "shmemServer exited with code 1" in result.output and "done" not in result.output

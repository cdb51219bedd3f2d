"""`lcls-hitfinder demo`: the real path, end to end, on one machine.

simulate a run of hits (with their true particle counts) -> build the sample's bank from a few other patterns
of it -> write the run as XTC2 with psana's own writer
-> replay it through psana's `shmemServer` at the beam rate -> `lcls-hitfinder serve` reads that
shared memory as it would the DAQ's -> this process subscribes to the service's ZeroMQ stream and
shows a live summary: rate, p50/p99 latency, keep fraction and accuracy against the truth.

Every process started here runs in its own session, so Ctrl-C (or SIGTERM, or SIGHUP) reaches only the demo,
which then stops them in order (the service drains and closes its run, then the server) and removes
what they leave in /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from lcls_hitfinder.config import HitfinderConfig
from lcls_hitfinder.labels import MAX_PARTICLES, Label, label_of_count
from lcls_hitfinder.preprocess import PhotonCalibration
from lcls_hitfinder.service.reader import remove_leftovers
from lcls_hitfinder.service.sources.shmem_server import ShmemServer

if TYPE_CHECKING:
    from lcls_hitfinder.service.client import DecisionClient

DETECTOR = "cam"
SILENCE_S = 3.0  # after the server has sent everything: this long without a decision ends the demo
REFERENCE_PATTERNS = 400  # of the sample, drawn apart from the run: 10 per particle count, the rest calibrate
REFERENCES_PER_COUNT = 10
_STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # held while the demo cleans up after itself


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free now: all held open while they are picked (one at a time, the kernel can give a
    port just released again, and the service would fail to bind its metrics on its publish port)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class Tally:
    """What the subscriber has seen so far, for the live table."""

    events: int  # in the XTC2 run; a live reader that falls behind misses some, as at the beamline
    decisions: int = 0
    keep: int = 0
    correct: int = 0
    with_truth: int = 0
    labels: dict[str, int] = field(default_factory=lambda: {label.text: 0 for label in Label})
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((MAX_PARTICLES + 1, len(Label)), np.int64))
    latencies_us: deque[int] = field(default_factory=lambda: deque(maxlen=5000))
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=5000))
    restarts: int = 0
    dropped: int = 0
    gaps: int = 0
    runs: list[str] = field(default_factory=list)

    def add(self, d: dict[str, Any]) -> None:
        self.decisions += 1
        self.keep += d["decision"] == "keep"
        self.labels[d["label"]] = self.labels.get(d["label"], 0) + 1
        self.latencies_us.append(int(d["latency_us"]))
        self.arrivals.append(time.monotonic())
        truth = d["truth_n_particles"]
        if truth is not None:
            self.confusion[min(truth, MAX_PARTICLES), Label[d["label"].upper()]] += 1
            if d["label"] != Label.ERROR.text:  # an error is no answer, as the service and `summary` count it
                self.with_truth += 1
                self.correct += d["label"] == label_of_count(truth).text

    def rate_hz(self, window_s: float = 2.0) -> tuple[float, float]:
        """Decisions per second over the last `window_s`, and over the whole run so far."""
        if len(self.arrivals) < 2:
            return 0.0, 0.0
        now = time.monotonic()
        recent = sum(now - t <= window_s for t in self.arrivals)
        return recent / window_s, (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])

    def table(self, status: str, live: bool = True) -> Panel:
        """The summary; once the run is over (`live` false) without the rate of the last seconds, which is 0."""
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        lat = np.asarray(self.latencies_us, float) / 1000
        p50, p99 = (np.percentile(lat, 50), np.percentile(lat, 99)) if lat.size else (float("nan"),) * 2
        t.add_row("decisions", f"{self.decisions} ({self.events} events in the run)")
        now, mean = self.rate_hz()
        t.add_row("rate", f"{now:.1f} Hz now, {mean:.1f} Hz on average" if live else f"{mean:.1f} Hz on average")
        t.add_row("latency", f"p50 {p50:.2f} ms   p99 {p99:.2f} ms")
        t.add_row("keep", f"{self.keep / max(self.decisions, 1):.1%} kept as single hits")
        kept, singles = self.confusion[:, Label.SINGLE].sum(), self.confusion[1].sum()
        if kept and singles:  # what a keep/veto user needs: how pure the kept events are, and how many singles
            hits = self.confusion[1, Label.SINGLE]
            t.add_row("", f"{hits / kept:.1%} of the kept are true singles; {hits / singles:.1%} of true singles kept")
        accuracy = f"{self.correct / self.with_truth:.1%}" if self.with_truth else "-"
        t.add_row("accuracy", f"{accuracy} of {self.with_truth} events with a known particle count")
        t.add_row("labels", "  ".join(f"{k} {v}" for k, v in self.labels.items()))
        t.add_row("source", f"{self.restarts} reader restart(s), {self.dropped} dropped, {self.gaps} seq gap(s)")
        return Panel(t, title="lcls-hitfinder demo: XTC2 -> shmemServer -> serve -> ZeroMQ", subtitle=status)

    def confusion_table(self) -> Table:
        t = Table(title="true particle count vs label")
        t.add_column("truth")
        for label in Label:
            t.add_column(label.text, justify="right")
        for n in range(MAX_PARTICLES + 1):
            t.add_row(str(n), *(str(v) for v in self.confusion[n]))
        return t


class Demo:
    """Owns the files and processes of one demo run; `run()` returns the final tally."""

    def __init__(
        self,
        n: int,
        rate_hz: float,
        workdir: Path | None,
        config: HitfinderConfig,
        model: Path | None,
        bank: Path | None,
        console: Console,
    ) -> None:
        self.n = n
        self.rate_hz = rate_hz
        self.config = config
        self.model = model
        self.bank = bank
        self.console = console
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lcls-hitfinder-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "decisions"  # the service's decision logs
        self.tag = f"hitfinder_demo_{os.getpid()}"
        self.server: ShmemServer | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.service_error: str | None = None  # why the service exited by itself, if it failed

    def prepare(self) -> Path:
        """Simulate the run and write it as XTC2 (both with progress bars); returns the XTC2 path."""
        import torch

        from lcls_hitfinder.service.sources.xtc2_writer import dataset_to_xtc2
        from lcls_hitfinder.simulate.generate import simulate_dataset

        torch.set_num_threads(1)
        data = self.workdir / "run.h5"
        self.console.print(f"[bold]1/4[/] simulating {self.n} patterns -> {data}")
        simulate_dataset(self.config.simulate, data, n=self.n, workers=1)
        if self.bank is None and self.config.serve.bank is None:
            self.bank = self._sample_bank()
        else:
            self.console.print(f"[bold]2/4[/] using the bank {self.bank or self.config.serve.bank}")
        xtc2 = self.workdir / "run.xtc2"
        self.console.print(f"[bold]3/4[/] writing them as XTC2 with psana's DgramEdit -> {xtc2}")
        dataset_to_xtc2(data, xtc2, detector=DETECTOR, rate_hz=self.rate_hz)
        return xtc2

    def _sample_bank(self) -> Path:
        """As at a beamline: a bank from a few reference patterns of this very sample (other patterns than
        the run's), calibrated for single-hit precision 0.9, rather than the generic shipped bank."""
        from lcls_hitfinder.learn.infer import build_bank
        from lcls_hitfinder.service.commands import model_file
        from lcls_hitfinder.simulate.generate import simulate_dataset

        refs = self.workdir / "references.h5"
        path = self.workdir / "bank.h5"
        self.console.print(
            f"[bold]2/4[/] building this sample's bank from {REFERENCE_PATTERNS} reference patterns -> {path}"
        )
        sample = self.config.simulate.model_copy(update={"seed": self.config.simulate.seed + 1})
        simulate_dataset(sample, refs, n=REFERENCE_PATTERNS, workers=1)
        model = model_file(self.model or self.config.serve.model)
        bank, report = build_bank(model, refs, per_class=REFERENCES_PER_COUNT)
        bank.save(path)
        self.console.print(
            f"    {report['references']} references; threshold {bank.threshold:.3f} keeps singles at precision"
            f" {report['precision']:.2f}, recall {report['recall']:.2f} on the other {report['calibration_patterns']}"
        )
        return path

    def _start_service(self, xtc2: Path, endpoint: str, metrics_port: int) -> None:
        from lcls_hitfinder.service.sources.xtc2_writer import constants_path

        update: dict[str, Any] = {
            "source": f"shmem:{self.tag}?det={DETECTOR}&constants={constants_path(xtc2)}",
            "log_dir": self.log_dir,
            "model": self.model or self.config.serve.model,
            "bank": self.bank or self.config.serve.bank,
        }
        noise = self.config.simulate.noise
        if noise.adu_gain is not None and "calibration" not in self.config.serve.model_fields_set:
            # simulated in ADU: the service must turn them back into photons as it would a detector's
            update["calibration"] = PhotonCalibration(gain=noise.adu_gain, offset=noise.adu_offset)
        serve = self.config.serve.model_copy(update=update)
        settings = serve.model_dump(mode="json")
        settings["publish"].update(endpoint=endpoint, wait_for_subscriber_s=30.0)
        settings["metrics"].update(port=metrics_port)
        config = self.workdir / "serve.yaml"
        config.write_text(yaml.safe_dump({"serve": settings}, sort_keys=False))
        cmd = [str(Path(sys.executable).parent / "lcls-hitfinder"), "serve", "--config", str(config)]
        with open(self.workdir / "serve.log", "wb") as log:
            self.service = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, xtc2: Path) -> Tally:
        """Serve the file through shared memory and watch the decisions until the run is done."""
        from lcls_hitfinder.service.client import DecisionClient
        from lcls_hitfinder.service.messages import DECISION, HEARTBEAT, RUN

        publish_port, metrics_port = free_ports(2)
        endpoint = f"tcp://127.0.0.1:{publish_port}"
        tally = Tally(events=self.n)
        with DecisionClient(endpoint, (DECISION, HEARTBEAT, RUN), timeout_s=0.25) as client:  # before the bind
            self._watch(xtc2, client, tally, metrics_port)
        return tally

    def _watch(self, xtc2: Path, client: DecisionClient, tally: Tally, metrics_port: int) -> None:
        from lcls_hitfinder.service.messages import DECISION, HEARTBEAT, RUN

        endpoint = client.endpoint
        shape = self.config.simulate.detector.shape
        self.console.print(
            f"[bold]4/4[/] serving it with shmemServer (tag {self.tag}, {self.rate_hz:g} Hz); the service publishes"
            f" on {endpoint}, metrics on http://127.0.0.1:{metrics_port}/metrics, log in {self.workdir / 'serve.log'}"
        )
        self._start_service(xtc2, endpoint, metrics_port)
        self.server = ShmemServer(
            self.tag, [xtc2], self.rate_hz, int(np.prod(shape)) * 2, log=self.workdir / "shmemServer.log"
        ).start()
        started, last_decision = time.monotonic(), time.monotonic()
        status = "starting the service (loading the model, connecting to shared memory)"
        with Live(tally.table(status), console=self.console, refresh_per_second=4, transient=True) as live:
            while True:
                refresh = time.monotonic() + 0.25
                for topic, payload in client.messages():  # also returns after 0.25 s without a message
                    if topic == DECISION:
                        tally.add(payload)
                        last_decision = time.monotonic()
                    elif topic == HEARTBEAT:
                        tally.restarts, tally.dropped = payload["source_restarts"], payload["dropped"]
                    elif topic == RUN:
                        tally.runs.append(f"{payload['phase']} {payload['experiment']}:{payload['run']}")
                    if time.monotonic() > refresh:
                        break
                tally.gaps = len(client.gaps)
                assert self.service is not None
                if self.service.poll() is not None:
                    status = f"the service exited (code {self.service.returncode}); see {self.workdir / 'serve.log'}"
                    if self.service.returncode:
                        self.service_error = self._service_error_line() or status
                    break
                if not self.server.running and time.monotonic() - last_decision > SILENCE_S:
                    code = self.server.returncode
                    status = "the server has sent the whole run: done"
                    if code:
                        status = f"shmemServer exited with code {code}; see {self.workdir / 'shmemServer.log'}"
                    break
                if tally.decisions:
                    status = f"serving for {time.monotonic() - started:.0f} s; Ctrl-C stops"
                live.update(tally.table(status))
        self.console.print(status)
        self.stop()
        for topic, payload in client.messages():  # the run-end message the service sends as it drains
            if topic == DECISION:
                tally.add(payload)
            elif topic == RUN:
                tally.runs.append(f"{payload['phase']} {payload['experiment']}:{payload['run']}")

    def _service_error_line(self) -> str | None:
        """The service's own one-line error from its log, if it gave one."""
        lines = (self.workdir / "serve.log").read_text(errors="replace").splitlines()
        errors = [line.split("error: ", 1)[1] for line in lines if line.startswith("lcls-hitfinder: error: ")]
        return errors[-1] if errors else None

    def stop(self) -> None:
        """Stop the service (SIGTERM: it drains and closes the run), then the server; clean /dev/shm. A second
        Ctrl-C while the service drains kills it; the server (in a session of its own, out of the terminal's
        reach) and /dev/shm are cleaned up whatever comes, the interrupt taken after."""
        try:
            if self.service is not None and self.service.poll() is None:
                self.service.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):  # killed below
                    self.service.wait(20)
        finally:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
            try:
                if self.service is not None:
                    if self.service.poll() is None:
                        self.service.kill()
                    self.service.wait()
                    remove_leftovers(f"lhf_{self.service.pid}")
                if self.server is not None:
                    self.server.stop()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_demo(demo: Demo) -> Tally:
    """The whole demo with its live table; returns the tally. Ctrl-C stops it cleanly."""
    console = demo.console

    def interrupt(signum: int, _frame: object) -> None:  # SIGTERM and SIGHUP stop the demo as Ctrl-C does
        raise KeyboardInterrupt

    hangup = signal.getsignal(signal.SIGHUP)  # ignored under nohup: it stays so
    with contextlib.suppress(ImportError):  # psana's MPI library (UCX) takes SIGHUP on import: take it back
        import psana  # noqa: F401
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if hangup == signal.SIG_IGN else interrupt)  # a closed terminal
    try:
        tally = demo.run(demo.prepare())
    except KeyboardInterrupt:
        console.print("interrupted: stopping the service and the server")
        raise
    finally:
        demo.stop()
    console.print(tally.table(f"runs: {', '.join(tally.runs) or '-'}", live=False))
    console.print(tally.confusion_table())
    console.print(f"files in {demo.workdir}", soft_wrap=True)  # whole, to copy
    for log_file in sorted(demo.log_dir.glob("*.h5")):  # what a user does with a run's record
        console.print(f"next: lcls-hitfinder summary {log_file} --plot run.png", soft_wrap=True)
    return tally

"""CLI subcommands of the service: `serve` (the real-time classifier), `listen` (a subscriber) and `summary` (of
a run's decision log)."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lcls_hitfinder import strict_json
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.paths import existing, output_dir
from lcls_hitfinder.service.systemd import notify

if TYPE_CHECKING:
    from lcls_hitfinder.service.pipeline import Pipeline
    from lcls_hitfinder.service.settings import ServeSettings

log = logging.getLogger("lcls_hitfinder.serve")


def shipped_file(name: str) -> Path:
    """A shipped model file: models/NAME beside the package (a checkout) or lcls_hitfinder/data/NAME (a wheel)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package.parent / "models" / name, package / "data" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"no {name} given and none shipped (looked in {', '.join(str(c.parent) for c in candidates)})")


def model_file(path: Path | None) -> Path:
    """The model to serve: `path` (a flag's or serve.model), checked, or else the shipped one."""
    return existing(path, "model") if path is not None else shipped_file("embedder.onnx")


def _setup_logging() -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # On stderr, as a service's log goes (stdout is left to results). Rich on a terminal; elsewhere (journald,
    # a log file) one plain line per record, since rich wraps long lines at 80 columns there.
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(sys.stderr), "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%Y-%m-%d %H:%M:%S", handlers=[handler])


def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML or YAML config file (its serve section)")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="source URI, e.g. xtc2:run.xtc2?det=pnccd, shmem:TAG?det=NAME, exp:EXP:RUN?dir=DIR&det=NAME, "
            "psana1:DATASOURCE?det=NAME, h5:FILE, sim: (default: sim:?rate=120)"
        ),
    ] = None,
    model: Annotated[Path | None, typer.Option(help="embedder ONNX file (default: the shipped one)")] = None,
    bank: Annotated[Path | None, typer.Option(help="reference bank file (default: the shipped one)")] = None,
    publish: Annotated[
        str | None, typer.Option(help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5556; tcp://0.0.0.0:5556: all)")
    ] = None,
    metrics_port: Annotated[
        str | None,
        typer.Option(help="HTTP port of /metrics for Prometheus (default 9108; 0: any free one; false: none)"),
    ] = None,
    max_events: Annotated[int | None, typer.Option(help="stop after this many events")] = None,
    log_dir: Annotated[
        str | None, typer.Option(help="folder of the per-run decision logs (default ./decisions; false: none)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="where preprocessing runs: auto, cpu or cuda")] = None,
) -> None:
    """Classify every event of a source in real time; publish decisions on ZeroMQ and metrics over HTTP.

    With no options: the simulated stream at 120 Hz through the shipped model and bank. Stop with
    Ctrl-C (or SIGTERM): reading stops, events in flight are decided and published, the decision log
    is closed and a `run` end message sent. SIGHUP (or a changed bank file) reloads the bank.
    """
    signals = _Signals()  # first: a `systemctl reload` or stop while the config and the model load is kept
    from lcls_hitfinder.config import load_config

    def off(value: str | None) -> str | bool | None:  # as false in the config file switches it off
        return False if value is not None and value.lower() in ("false", "off", "none") else value

    overrides: dict[str, Any] = {
        "serve.source": source,
        "serve.model": model,
        "serve.bank": bank,
        "serve.publish.endpoint": publish,
        "serve.metrics.port": off(metrics_port),
        "serve.max_events": max_events,
        "serve.log_dir": off(log_dir),
        "serve.device": device,
    }
    settings = load_config(config, {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}).serve
    _setup_logging()
    code = run_service(settings, signals)
    raise typer.Exit(code)


class _Signals:
    """SIGINT and SIGTERM stop the service, SIGHUP reloads the bank. A second stop cuts the drain short (the
    batch in hand is finished and logged, the frames still waiting are dropped, the run closed); a third, or a
    second while starting, quits at once.

    While it starts both are noted, not acted on: a stop is not raised into whatever is starting (a half-started
    reader or MPI run cannot be cleaned up reliably), the start-up stops at its next step; a reload (`systemctl
    reload`) is done once serving (by default SIGHUP would end the process, which systemd does not restart).
    """

    def __init__(self) -> None:
        self.stop_asked, self._reload_asked = threading.Event(), threading.Event()
        self.interrupted = False
        self._pipeline: Pipeline | None = None
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGHUP, self._hup)

    def serving(self, pipeline: Pipeline) -> None:
        """From now on the pipeline is stopped and reloaded; a reload asked for while starting is done now.
        systemd (`Type=notify`) hears that the service is up: it sends reloads from now on."""
        self._pipeline = pipeline
        if self._reload_asked.is_set():
            pipeline.request_bank_reload()
        notify("READY=1", f"STATUS=serving {pipeline.source.uri}")

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        name, pipeline = signal.Signals(signum).name, self._pipeline
        if self.stop_asked.is_set():  # the operator will not wait (a pipeline that stopped itself asked nobody)
            if pipeline is None or self.interrupted:
                raise KeyboardInterrupt(f"{'third' if self.interrupted else 'second'} {name}")
            self.interrupted = True
            log.warning("second %s: the frames still waiting are dropped, the run closed (again to quit at once)", name)
            pipeline.interrupt()
            return
        self.stop_asked.set()
        notify("STOPPING=1")
        if pipeline is None:
            log.info("%s while starting: stopping once the step under way is done (again to quit at once)", name)
            return
        log.info("%s: stopping the reader, draining what is in flight (again to quit at once)", name)
        pipeline.stop()

    def _hup(self, _signum: int, _frame: FrameType | None) -> None:
        if self._pipeline is None:
            log.info("SIGHUP while starting: the bank is reloaded once serving")
            self._reload_asked.set()
            return
        log.info("SIGHUP: reloading the bank")
        self._pipeline.request_bank_reload()


def run_service(settings: ServeSettings, signals: _Signals) -> int:
    """Start-up in the order that keeps subscribers and operators informed, then serve until done."""
    import torch

    from lcls_hitfinder.devices import resolve_device
    from lcls_hitfinder.embedder import OnnxEmbedder
    from lcls_hitfinder.service.bank_reload import ReloadingBank
    from lcls_hitfinder.service.metrics import ServiceMetrics
    from lcls_hitfinder.service.pipeline import Pipeline, service_threads
    from lcls_hitfinder.service.publish import ZmqPublisher
    from lcls_hitfinder.service.sources import open_source, parse_uri
    from lcls_hitfinder.service.sources.h5 import recorded_calibration

    # What can be refused is refused before anything is bound, loaded or made: the source URI and its parameters
    # (the source is built, not opened: nothing runs yet), a GPU that is not there, missing files, and a log
    # folder that cannot be (rather than every run without its log).
    uri = parse_uri(settings.source)
    resolve_device(settings.device, "serve.device")
    model_path = model_file(settings.model)
    bank_path = existing(settings.bank, "bank") if settings.bank else shipped_file("bank.h5")
    src = open_source(uri, settings)
    if settings.log_dir is not None:
        output_dir(settings.log_dir, "decision log directory")
    if "source" not in settings.model_fields_set:
        log.warning("no source given (--source, serve.source): serving the simulated stream %s", settings.source)
    if settings.bank is None:
        log.warning(
            "no bank given (--bank, serve.bank): the shipped generic bank judges these patterns; a bank of this "
            "sample's own references decides far better (bank pick, bank build; models/MODEL_CARD.md)"
        )
    # Bind first: subscribers connect while the model and the source are still loading.
    publisher = ZmqPublisher(settings.publish.endpoint, settings.publish.sndhwm)
    metrics = ServiceMetrics()
    try:
        if settings.metrics.port is not None:
            try:
                port = metrics.serve_http(settings.metrics.host, settings.metrics.port)
            except OSError as err:
                raise UserError(
                    f"cannot serve metrics on {settings.metrics.host}:{settings.metrics.port}: {err}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", settings.metrics.host, port)
        threads = service_threads(settings, src)
        torch.set_num_threads(threads)
        embedder = OnnxEmbedder(model_path, settings.providers, settings.batch.max_size, threads)
        reloading_bank = ReloadingBank(bank_path, embedder, metrics)
        if not signals.stop_asked.is_set():
            src.open(signals.stop_asked)
        settings = recorded_calibration(settings, src)
        reloading_bank.serve_with(settings.calibration)
        pipeline = Pipeline(settings, src, embedder, reloading_bank, publisher, metrics)
    except KeyboardInterrupt as why:  # the second stop: what was started dies with the process (readers do)
        publisher.close()
        log.warning("%s while starting: quitting at once", why)
        return 130
    except BaseException:
        src.close()  # a reader that failed to open is not left running, nor a simulator thread
        publisher.close()
        raise

    signals.serving(pipeline)
    try:
        if signals.stop_asked.is_set():  # asked while starting (checked after the handlers above: none is missed)
            log.info("stopped before serving")
            return 0
        wait = settings.publish.wait_for_subscriber_s
        if wait > 0:
            log.info("waiting up to %.0f s for a subscriber on %s", wait, publisher.endpoint)
            deadline = time.monotonic() + wait
            while not (publisher.wait_for_subscriber(0.2) or pipeline.stopping or time.monotonic() > deadline):
                pass
            if pipeline.stopping:  # stopped while waiting: nothing was read, so nothing to drain
                log.info("stopped before serving")
                return 0
            if not publisher.subscriptions:
                log.warning("no subscriber yet; serving anyway")
        log.info(
            "serving %s on %s with model %s (%s; preprocessing on %s)",
            uri.raw,
            publisher.endpoint,
            embedder.model_hash,
            embedder.provider,
            pipeline.device,  # serve.device auto with a CPU build of torch: the CPU, whatever the provider
        )
        pipeline.start()
        while not pipeline.wait(0.5):
            pass
    except KeyboardInterrupt as why:
        log.warning("%s: quitting before the drain finished; the decision log may end early", why)
        return 130
    finally:
        try:
            src.close()
        finally:  # the run end message goes out whatever closing the source did
            publisher.close()
    total = pipeline.total
    log.info(
        "%d decisions (%s), %d kept, %d dropped, %d binned by the reader; logs: %s",
        total.events,
        ", ".join(f"{k} {v}" for k, v in total.counts.items()),
        total.keep,
        total.dropped,
        total.binned_at_reader,
        logs_said(pipeline.logs),
    )
    return 1 if pipeline.error is not None else 130 if pipeline.cut_short else 0


def logs_said(paths: list[str]) -> str:
    """The decision logs written, for the last line: a shift's hundreds of runs by their folder and the last."""
    if len(paths) <= 3:
        return ", ".join(paths) or "none"
    folders = {str(Path(p).parent) for p in paths}
    where = f"in {folders.pop()}" if len(folders) == 1 else f"in {len(folders)} folders"
    return f"{len(paths)} {where}, the last {paths[-1]}"


def _human(topic: str, p: dict[str, Any]) -> str:
    if topic == "decision":
        truth = "" if p["truth_n_particles"] is None else f" truth {p['truth_n_particles']}"
        reason = f" ({p['reason']})" if p["reason"] and p["label"] == "error" else ""
        score = "" if math.isnan(p["score"]) else f" score {p['score']:+.3f}"
        return (
            f"{p['seq']:>8} {p['experiment']}:{p['run']} event {p['event']:<7} {p['label']:<6} {p['decision']:<4}"
            f"{score}{reason} {p['latency_us']} µs{truth}"
        )
    if topic == "heartbeat":
        restarts = p["source_restarts"]
        return f"heartbeat: {p['rate_hz']:.1f} Hz, next seq {p['next_seq']}, {p['counts']}, restarts {restarts}"
    ended = f" ({p['ended']})" if p["ended"] else ""
    return f"run {p['phase']}{ended}: {p['experiment']}:{p['run']}, {p['events']} events {p['counts']}, log {p['log']}"


def _json_line(topic: str, payload: dict[str, Any]) -> str:
    """Strict JSON (jq, pandas): a NaN score or distance (not computed) becomes null."""
    return strict_json.dumps({"topic": topic, **payload})


def listen(
    endpoint: Annotated[str, typer.Argument(help="the service's ZeroMQ endpoint, e.g. tcp://host:5556")],
    topic: Annotated[
        list[str] | None, typer.Option(help="decision, heartbeat or run (repeatable; default: all)")
    ] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="one JSON object per line: {topic, ...payload}; NaN as null")
    ] = False,
    count: Annotated[
        int | None, typer.Option(min=1, help="stop after this many decisions (decision must be a topic)")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="stop after this many seconds without a message")
    ] = None,
) -> None:
    """Print the service's messages (or record them with --json > FILE) and report gaps in `seq`.

    Exits 1 if --timeout passes before any message came: nothing publishes on ENDPOINT."""
    import zmq

    from lcls_hitfinder.service.client import DecisionClient
    from lcls_hitfinder.service.messages import DECISION, TOPICS, SchemaVersionError, tcp_port_checked

    topics = tuple(topic or TOPICS)
    unknown = set(topics) - set(TOPICS)
    if unknown:
        raise UserError(f"unknown topic(s) {', '.join(sorted(unknown))}; use {', '.join(TOPICS)}")
    if count is not None and DECISION not in topics:
        raise UserError("--count counts decisions: add --topic decision, or stop with --timeout")
    try:
        tcp_port_checked(endpoint)
    except ValueError as err:
        raise UserError(f"cannot subscribe to {err}") from None
    decisions = messages = 0
    try:
        client = DecisionClient(endpoint, topics, timeout_s=timeout)
    except zmq.ZMQError as err:
        raise UserError(f"cannot subscribe to {endpoint!r}: {err} (an endpoint is tcp://HOST:PORT)") from None
    print(f"listening on {endpoint} for {', '.join(topics)} (Ctrl-C to stop)", file=sys.stderr)
    gaps_seen = restarts_seen = 0
    try:
        for name, payload in client.messages():
            messages += 1
            print(_json_line(name, payload) if json_lines else _human(name, payload), flush=True)
            if client.tracker.restarts > restarts_seen:
                restarts_seen = client.tracker.restarts
                print(f"the service was restarted: instance {payload['instance']} counts seq from 0", file=sys.stderr)
            for gap in client.gaps[gaps_seen:]:
                print(f"gap: seq {gap.expected}..{gap.got - 1} missing ({gap.missing})", file=sys.stderr)
            gaps_seen = len(client.gaps)
            if name == DECISION:
                decisions += 1
                if decisions == 1 and client.tracker.first:
                    print(
                        f"joined at seq {client.tracker.first}: the decisions before it went out before this"
                        " subscriber connected (the service's decision log has them)",
                        file=sys.stderr,
                    )
                if count is not None and decisions >= count:
                    break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `listen | head`: the reader has what it wanted; the summary still goes to stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except SchemaVersionError as err:
        raise UserError(f"{endpoint}: {err}: use the lcls-hitfinder of that service") from None
    finally:
        client.close()
    tracker = client.tracker
    print(
        f"{decisions} decisions, {len(client.gaps)} gap(s), {tracker.missing} missing"
        + (f", joined at seq {tracker.first}" if tracker.first else "")
        + (f", {tracker.restarts} service restart(s)" if tracker.restarts else "")
        + (f", {len(client.skipped)} message(s) not the service's skipped" if client.skipped else ""),
        file=sys.stderr,
    )
    if not messages and timeout is not None:
        print(f"no message from {endpoint} in {timeout:g} s: is the service publishing there?", file=sys.stderr)
        raise typer.Exit(1)


def summary(
    log_files: Annotated[
        list[Path], typer.Argument(metavar="LOG...", help="decision logs of runs (in serve.log_dir), one or more")
    ],
    csv: Annotated[
        Path | None, typer.Option(help="write one row per event (run, event, timestamp, label, score) for bank pick")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="write a PNG: label fractions over the run, scores by label")
    ] = None,
) -> None:
    """Summarise runs' decision logs: labels, keep fraction, rate, latency (and the truth, when known).

    Also of a log still being written.
    --csv is the list to review (every given run's events): correct the labels of the events you are sure of,
    keep those rows only, and give them to `bank pick --picks`."""
    import numpy as np

    from lcls_hitfinder.paths import output_file
    from lcls_hitfinder.service.decision_log import read_decision_log
    from lcls_hitfinder.service.log_summary import plot_run, summarise, write_csv

    if plot is not None and len(log_files) > 1:
        raise UserError(f"--plot pictures one run: give one log, not {len(log_files)}")
    for log_file in log_files:
        if csv is not None:
            output_file(csv, "CSV", {"LOG": log_file})
        if plot is not None:
            output_file(plot, "plot", {"LOG": log_file}, suffix=".png")
    logs = []
    for log_file in log_files:
        if log_file.is_dir():  # serve.log_dir itself: its runs' logs are in it
            found = sorted(log_file.rglob("*.h5"), key=lambda p: p.stat().st_mtime)
            newest = f"the newest of its {len(found)}: {found[-1]}" if found else "it holds none"
            raise UserError(f"{log_file} is a folder: give runs' decision logs ({newest}; or {log_file}/*.h5)")
        try:
            logs.append(read_decision_log(existing(log_file, "decision log")))
        except (OSError, KeyError) as err:
            raise UserError(f"{log_file} is not a decision log of lcls-hitfinder serve ({err})") from None
    runs = [summarise(columns, attrs) for columns, attrs in logs]
    print("\n\n".join("\n".join(run.lines()) for run in runs))
    if csv is not None:
        columns = {k: np.concatenate([c[k] for c, _ in logs]) for k in logs[0][0]}
        write_csv(columns, csv)
        events = sum(run.events for run in runs)
        print(f"{csv}: {events} events; next: correct the labels, keep the sure rows, bank pick --picks {csv}")
        if len(runs) > 1:
            print("bank pick reads one run's source: give it the rows of that run (the run column) only")
    if plot is not None:
        plot_run(logs[0][0], f"{runs[0].experiment}:{runs[0].run}", plot)
        print(f"{plot}: the run's labels and scores")


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to `app`."""
    app.command()(serve)
    app.command()(listen)
    app.command()(summary)

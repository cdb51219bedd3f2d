"""Every Prometheus metric of the service, defined once with its help text.

`SPECS` is the single table: `ServiceMetrics` builds the live metrics from it and docs/metrics.md is
generated from it (`python -m lcls_hitfinder.service.metrics > docs/metrics.md`; a test keeps the two
equal). Names are stable: dashboards and alerts (deploy/) are built on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from lcls_hitfinder.labels import Label

# 50 µs .. 1 s, roughly 1-2.5-5 per decade: fine enough for p99 at both a batch of one and a stalled stage;
# 20 ms is an edge, so the latency budget's alert fires when more than 1% of events are over it, not when
# histogram_quantile's interpolation within a wider bucket says so.
STAGE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
# a backlog (serve.overflow = "block" behind a fast source) holds events for seconds: beyond 1 s a p99 would
# read as the last bucket's edge, 1 s, however long they waited
LATENCY_BUCKETS = (*STAGE_BUCKETS, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = ("read", "preprocess", "infer", "decide", "publish")
ERROR_REASONS = ("shape", "dtype", "nonfinite", "internal")  # the part before ':' of an error decision's reason
DROP_REASONS = ("queue_full", "internal", "interrupted")

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "hitfinder_events_total",
        "counter",
        "Events decided, by label (blank, single, multi, error) and decision (keep, veto).",
        ("label", "decision"),
    ),
    MetricSpec(
        "hitfinder_stage_duration_seconds",
        "histogram",
        "Seconds per batch in each stage: preprocess, infer, decide, publish; read is per frame and includes "
        "waiting for the source (at a paced source it is the time between events). preprocess is the service's "
        'own work: frames a psana reader binned (hitfinder_frames_binned_total{where="reader"}) were binned in '
        "the reader's process after being read and before the service got them: that time is in "
        "hitfinder_latency_seconds, not in this stage.",
        ("stage",),
        STAGE_BUCKETS,
    ),
    MetricSpec(
        "hitfinder_latency_seconds",
        "histogram",
        "End-to-end seconds per event, from the frame being read to its decision being ready, just before it is "
        'logged and handed to the publisher (that last step is the stage "publish" of '
        "hitfinder_stage_duration_seconds, tens of microseconds, which also keeps them for the decision log's "
        "writer process: handed over every 0.1 s and flushed to disk once a second, outside this time).",
        (),
        LATENCY_BUCKETS,
    ),
    MetricSpec("hitfinder_batch_size", "histogram", "Frames per inference batch.", (), BATCH_BUCKETS),
    MetricSpec(
        "hitfinder_dropped_events_total",
        "counter",
        "Events read but never decided, by reason (queue_full: the service fell behind a live source; internal: "
        "a failure of the service itself, which it logs; interrupted: waiting when a second SIGINT or SIGTERM "
        "cut the drain short).",
        ("reason",),
    ),
    MetricSpec(
        "hitfinder_frame_errors_total",
        "counter",
        "Frames that got an `error` decision, by reason (shape, dtype, nonfinite, internal).",
        ("reason",),
    ),
    MetricSpec(
        "hitfinder_queue_depth",
        "gauge",
        "Items waiting in each internal queue (frames: reader to batcher; publish: to the publisher thread).",
        ("queue",),
    ),
    MetricSpec(
        "hitfinder_source_restarts_total",
        "counter",
        "Restarts of the source's reader by its watchdog (a stalled or dead psana child process).",
    ),
    MetricSpec(
        "hitfinder_build_info",
        "gauge",
        "Always 1; the labels name the package version, the model hash, the active onnxruntime provider and "
        "the device that preprocesses the frames (`cpu` or `cuda`).",
        ("version", "model", "provider", "device"),
    ),
    MetricSpec(
        "hitfinder_bank_info",
        "gauge",
        "Always 1 for the bank in use; the labels name its file, its model hash and its size.",
        ("path", "model", "references"),
    ),
    MetricSpec(
        "hitfinder_bank_reloads_total",
        "counter",
        "Bank reload attempts (SIGHUP or a changed file), by result: ok, or refused (the old bank stays).",
        ("result",),
    ),
    MetricSpec(
        "hitfinder_decision_log_failures_total",
        "counter",
        "Decision logs that failed: could not be created at a run's start (the folder cannot be written) or "
        "failed while written (a full disk, or the log's writer process died). That run went on without its log; "
        "its decisions were still published.",
    ),
    MetricSpec(
        "hitfinder_decision_log_lost",
        "gauge",
        "1 from a decision log's failure until a run's log is created again (the runs meanwhile go without their "
        "record), else 0.",
    ),
    MetricSpec(
        "hitfinder_prefilter_blank_total",
        "counter",
        "Events the cheap pre-filter labelled blank without running the model.",
    ),
    MetricSpec(
        "hitfinder_frames_binned_total",
        "counter",
        "Frames converted and binned to the model's thumbnail, by where: reader (a psana reader process, which "
        "shares this work with the service while the service is behind) or service.",
        ("where",),
    ),
    MetricSpec(
        "hitfinder_truth_events_total",
        "counter",
        "Events whose true particle count the source knows (simulation), by true label and agree (yes, no).",
        ("truth", "agree"),
    ),
    MetricSpec(
        "hitfinder_run_open",
        "gauge",
        "1 while a run is being served, 0 between runs.",
    ),
    MetricSpec(
        "hitfinder_run_number",
        "gauge",
        "Number of the run being served (or last served).",
    ),
    MetricSpec(
        "hitfinder_heartbeat_timestamp_seconds",
        "gauge",
        "Unix time of the last heartbeat message: a stale value means the service is stuck.",
    ),
    MetricSpec(
        "hitfinder_last_event_timestamp_seconds",
        "gauge",
        "Unix time at which the last decision was published.",
    ),
)

_BY_NAME = {s.name: s for s in SPECS}


class ServiceMetrics:
    """The live metrics of one service instance, on their own registry (several may share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # process_start_time_seconds, CPU and memory: a service restarting in a loop shows as its start time
        # changing (HitfinderRestarting), where `up` only flickers between scrapes
        ProcessCollector(registry=self.registry)
        self.events = self._counter("hitfinder_events_total")
        self.stage = self._histogram("hitfinder_stage_duration_seconds")
        self.latency = self._histogram("hitfinder_latency_seconds")
        self.batch_size = self._histogram("hitfinder_batch_size")
        self.dropped = self._counter("hitfinder_dropped_events_total")
        self.frame_errors = self._counter("hitfinder_frame_errors_total")
        self.queue_depth = self._gauge("hitfinder_queue_depth")
        self.source_restarts = self._counter("hitfinder_source_restarts_total")
        self.build_info = self._gauge("hitfinder_build_info")
        self.bank_info = self._gauge("hitfinder_bank_info")
        self.bank_reloads = self._counter("hitfinder_bank_reloads_total")
        self.decision_log_failures = self._counter("hitfinder_decision_log_failures_total")
        self.decision_log_lost = self._gauge("hitfinder_decision_log_lost")
        self.prefilter_blank = self._counter("hitfinder_prefilter_blank_total")
        self.frames_binned = self._counter("hitfinder_frames_binned_total")
        self.truth_events = self._counter("hitfinder_truth_events_total")
        self.run_open = self._gauge("hitfinder_run_open")
        self.run_number = self._gauge("hitfinder_run_number")
        self.heartbeat_time = self._gauge("hitfinder_heartbeat_timestamp_seconds")
        self.last_event_time = self._gauge("hitfinder_last_event_timestamp_seconds")
        for stage in STAGES:  # export every stage from the start, so quantile queries never see gaps
            self.stage.labels(stage=stage)
        # Known label values start at 0 too, so rates and alerts read 0 (not "no data") before the first one.
        for label in Label:
            for decision in ("keep", "veto"):
                self.events.labels(label=label.text, decision=decision)
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for reason in ERROR_REASONS:
            self.frame_errors.labels(reason=reason)
        for result in ("ok", "refused"):
            self.bank_reloads.labels(result=result)
        for where in ("reader", "service"):
            self.frames_binned.labels(where=where)

    def _counter(self, name: str) -> Counter:
        s = _BY_NAME[name]
        return Counter(s.name, s.help, s.labels, registry=self.registry)

    def _gauge(self, name: str) -> Gauge:
        s = _BY_NAME[name]
        return Gauge(s.name, s.help, s.labels, registry=self.registry)

    def _histogram(self, name: str) -> Histogram:
        s = _BY_NAME[name]
        return Histogram(s.name, s.help, s.labels, registry=self.registry, buckets=s.buckets)

    def set_build_info(self, version: str, model: str, provider: str, device: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version=version, model=model, provider=provider, device=device).set(1)

    def set_bank_info(self, path: str, model: str, references: int) -> None:
        self.bank_info.clear()
        self.bank_info.labels(path=path, model=model, references=str(references)).set(1)

    def serve_http(self, host: str, port: int) -> int:
        """Start prometheus-client's HTTP thread for /metrics; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


def markdown() -> str:
    """docs/metrics.md, generated from SPECS."""
    lines = [
        "# Metrics",
        "",
        "`lcls-hitfinder serve` exports these on HTTP `/metrics` (Prometheus text format), bound to",
        "`serve.metrics.host` (127.0.0.1 by default) and `serve.metrics.port` (`--metrics-port`).",
        "Generated from `lcls_hitfinder/service/metrics.py` by `python -m lcls_hitfinder.service.metrics`;",
        "a test fails when the two differ.",
        "",
        "| name | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for s in SPECS:
        labels = ", ".join(f"`{label}`" for label in s.labels) or "-"
        lines.append(f"| `{s.name}` | {s.kind} | {labels} | {s.help} |")
    lines += [
        "",
        "Also prometheus-client's process metrics: `process_start_time_seconds` (each start of the service; the",
        "alert HitfinderRestarting counts its changes), `process_cpu_seconds_total`, `process_resident_memory_bytes`,",
        "`process_open_fds`.",
        "",
        f"Stage histogram buckets (seconds): {', '.join(f'{b:g}' for b in STAGE_BUCKETS)}; latency: the same and "
        f"{', '.join(f'{b:g}' for b in LATENCY_BUCKETS[len(STAGE_BUCKETS) :])}.",
        f"Batch size buckets: {', '.join(f'{b:g}' for b in BATCH_BUCKETS)}.",
        "",
        "Useful queries:",
        "",
        "- p99 per stage: `histogram_quantile(0.99, sum by (le, stage) "
        "(rate(hitfinder_stage_duration_seconds_bucket[1m])))`",
        "- event rate: `sum(rate(hitfinder_events_total[1m]))`",
        '- keep fraction of the classifiable events: `sum(rate(hitfinder_events_total{decision="keep"}[5m])) / '
        'sum(rate(hitfinder_events_total{label!="error"}[5m]))`',
        "- fraction decided `error`: `sum(rate(hitfinder_frame_errors_total[5m])) / "
        "sum(rate(hitfinder_events_total[5m]))`",
        '- agreement with the simulated truth: `sum(rate(hitfinder_truth_events_total{agree="yes"}[5m])) / '
        "sum(rate(hitfinder_truth_events_total[5m]))`",
        "- stuck or dead service: `hitfinder:heartbeat_age:seconds > 10` (deploy/prometheus/rules/recording.yml: "
        "the age of the last heartbeat scraped, which a plain `time() - hitfinder_heartbeat_timestamp_seconds` "
        "loses as soon as scrapes fail)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")

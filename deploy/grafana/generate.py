"""Generate the Grafana dashboard of lcls-hitfinder from code: `python deploy/grafana/generate.py [--check]`.

Writes deploy/grafana/dashboards/hitfinder.json (provisioned by provisioning/dashboards/hitfinder.yml).
`--check` exits 1 when the committed file differs from what this script makes; tests do the same.
Panels read the recording rules of deploy/prometheus/rules/ (hitfinder:*) where one exists, and the
service's own metrics (lcls_hitfinder/service/metrics.py) otherwise. The Prometheus data source is
picked with the `datasource` template variable, so the same file works in any Grafana.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "hitfinder.json"
THRESHOLDS = HERE.parent / "prometheus" / "rules" / "thresholds.yml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24  # Grafana's grid is 24 columns wide

Json = dict[str, Any]
# Grafana custom units: a rate of events (or frames), not of HTTP requests ("reqps" would say req/s)
EVENTS_PER_S = "suffix: events/s"
FRAMES_PER_S = "suffix: frames/s"


@cache
def threshold(name: str) -> float:
    """The alert threshold `hitfinder:threshold:NAME` (a `vector(X)` rule), so stat colours match the alerts."""
    rules = yaml.safe_load(THRESHOLDS.read_text())["groups"][0]["rules"]
    expr = next(r["expr"] for r in rules if r["record"] == f"hitfinder:threshold:{name}")
    match = re.fullmatch(r"vector\(([0-9.eE+-]+)\)", expr.strip())
    if match is None:
        raise ValueError(f"{THRESHOLDS}: hitfinder:threshold:{name} is not vector(NUMBER): {expr}")
    return float(match[1])


def sel(metric: str, exclude: dict[str, str] | None = None, **matchers: str) -> str:
    """`metric{instance=~"$instance", k="v"..., k!="v"...}`: every query is filtered by the instance variable."""
    inner = ", ".join(
        [
            'instance=~"$instance"',
            *(f'{k}="{v}"' for k, v in matchers.items()),
            *(f'{k}!="{v}"' for k, v in (exclude or {}).items()),
        ]
    )
    return f"{metric}{{{inner}}}"


def target(expr: str, legend: str = "__auto", *, instant: bool = False, fmt: str = "time_series") -> Json:
    """One PromQL query of a panel. refIds are filled in by `panel`."""
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "instant": instant,
        "range": not instant,
        "format": fmt,
    }


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    overrides: list[Json] | None = None,
    **extra: Any,
) -> Json:
    """A panel without id and gridPos (the layout assigns both)."""
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, **extra.pop("defaults", {})}, "overrides": overrides or []},
        **extra,
    }


def timeseries(title: str, description: str, targets: list[Json], unit: str, **extra: Any) -> Json:
    options = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}}
    defaults = {"custom": {"lineWidth": 1, "fillOpacity": 0, "spanNulls": False}, **extra.pop("defaults", {})}
    return panel("timeseries", title, description, targets, unit, options=options, defaults=defaults, **extra)


def stat(title: str, description: str, expr: str, unit: str, thresholds: list[tuple[float | None, str]]) -> Json:
    steps = [{"value": v, "color": c} for v, c in thresholds]
    return panel(
        "stat",
        title,
        description,
        [target(expr, instant=True)],
        unit,
        options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"},
        defaults={"thresholds": {"mode": "absolute", "steps": steps}},
    )


def info_table(title: str, description: str, expr: str, columns: list[str]) -> Json:
    """The labels of an `_info`-style gauge (always 1) as a table, one row per instance."""
    hidden = {name: True for name in ("Time", "Value", "__name__", "job")}
    order = {c: i for i, c in enumerate(columns)}
    return panel(
        "table",
        title,
        description,
        [target(expr, instant=True, fmt="table")],
        "none",
        transformations=[{"id": "organize", "options": {"excludeByName": hidden, "indexByName": order}}],
    )


def heatmap(title: str, description: str, buckets: str, unit: str) -> Json:
    """`buckets`: a histogram's `_bucket` selector, e.g. from `sel`. A rate per bucket: an increase over
    $__rate_interval, evaluated at steps shorter than that window, would count each event in several cells.
    One heatmap holds one distribution: that of the instances selected, together."""
    expr = f"sum by (le) (rate({buckets}[$__rate_interval]))"
    return panel(
        "heatmap",
        title,
        f"{description} All the instances selected together: pick one in `instance` to see its own.",
        [target(expr, "{{le}}", fmt="heatmap")],
        unit,
        options={
            "calculate": False,
            "yAxis": {"unit": unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "tooltip": {"show": True, "yHistogram": True},
        },
    )


def quantiles(record: str, by: str = "") -> list[Json]:
    """p50/p95/p99 series of a recorded quantile rule (one rule per quantile, label `quantile`), per instance:
    two services on one node (two detectors) are two lines, never one maximum of both."""
    prefix = f"{{{{{by}}}}} " if by else ""
    group = f"instance, {by}, quantile" if by else "instance, quantile"
    return [target(f"max by ({group}) ({sel(record)})", f"{prefix}p{{{{quantile}}}} {{{{instance}}}}")]


def overview() -> list[Json]:
    return [
        stat(
            "Event rate",
            "Events decided per second (all labels), over the last minute.",
            f"sum({sel('hitfinder:events_all:rate1m')})",
            EVENTS_PER_S,
            [(None, "blue")],  # 0 between runs is normal: the alerts say when it is not
        ),
        stat(
            "Keep fraction",
            "Fraction of the classifiable (non-error) events with decision keep, over the last minute.",
            f"sum({sel('hitfinder:events:rate1m', decision='keep')}) / "
            f"sum({sel('hitfinder:events:rate1m', exclude={'label': 'error'})})",
            "percentunit",
            [(None, "blue")],
        ),
        stat(
            "p99 latency",
            "99th percentile of end-to-end latency (frame read to decision published), over the last minute.",
            f"max({sel('hitfinder:latency_seconds:quantile_1m', quantile='0.99')})",
            "s",
            [(None, "green"), (threshold("latency_p99_seconds"), "red")],
        ),
        stat(
            "Heartbeat age",
            "Seconds since the last heartbeat (sent every second). Grows when the service is stuck or gone.",
            f"max({sel('hitfinder:heartbeat_age:seconds')})",
            "s",
            [(None, "green"), (threshold("heartbeat_age_seconds"), "red")],
        ),
        stat(
            "Run",
            "Number of the run being served, or of the last one served between runs.",
            f"max({sel('hitfinder_run_number')})",
            "none",
            [(None, "text")],
        ),
        stat(
            "Source restarts",
            "Restarts of the psana reader by the watchdog in the dashboard's time range.",
            f"sum(increase({sel('hitfinder_source_restarts_total')}[$__range]))",
            "none",
            [(None, "green"), (1, "orange")],
        ),
    ]


def build_info() -> list[Json]:
    return [
        info_table(
            "Model and provider",
            "What is live: package version, model hash, the onnxruntime execution provider and the device that "
            "preprocesses the frames.",
            sel("hitfinder_build_info"),
            ["instance", "version", "model", "provider", "device"],
        ),
        info_table(
            "Reference bank",
            "The bank in use: file, the model hash it was built with, and the number of references.",
            sel("hitfinder_bank_info"),
            ["instance", "path", "model", "references"],
        ),
    ]


def events() -> list[Json]:
    return [
        timeseries(
            "Event rate by label",
            "Events per second by label; `kept` is the rate with decision keep.",
            [
                target(f"sum by (instance, label) ({sel('hitfinder:events:rate1m')})", "{{label}} {{instance}}"),
                target(f"sum by (instance) ({sel('hitfinder:events:rate1m', decision='keep')})", "kept {{instance}}"),
            ],
            EVENTS_PER_S,
        ),
        timeseries(
            "Keep fraction",
            "Fraction of the classifiable (non-error) events kept, with the alert band "
            "(deploy/prometheus/rules/thresholds.yml).",
            [
                target(sel("hitfinder:keep_fraction:ratio_rate1m"), "{{instance}}"),
                target("hitfinder:threshold:keep_fraction_min", "band min"),
                target("hitfinder:threshold:keep_fraction_max", "band max"),
            ],
            "percentunit",
        ),
        timeseries(
            "Hit fraction and single-hit fraction",
            "Hit fraction: single or multi among classified events. Single-hit fraction: single among hits.",
            [
                target(sel("hitfinder:hit_fraction:ratio_rate1m"), "hits {{instance}}"),
                target(sel("hitfinder:single_hit_fraction:ratio_rate1m"), "single / hits {{instance}}"),
                target(sel("hitfinder:prefilter_blank_fraction:ratio_rate1m"), "pre-filter blank {{instance}}"),
            ],
            "percentunit",
        ),
        timeseries(
            "Agreement with ground truth",
            "Only when the source carries the true particle count (sim:). Overall agreement, and per true "
            "label the fraction labelled correctly (recall).",
            [
                target(sel("hitfinder:truth_agreement:ratio_rate1m"), "overall {{instance}}"),
                target(
                    f"max by (instance, truth) ({sel('hitfinder:truth_recall:ratio_rate1m')})",
                    "recall {{truth}} {{instance}}",
                ),
            ],
            "percentunit",
        ),
    ]


def latency() -> list[Json]:
    return [
        timeseries(
            "End-to-end latency",
            "Frame read to decision published, per event: p50/p95/p99 over 1 min, and the p99 budget.",
            [
                *quantiles("hitfinder:latency_seconds:quantile_1m"),
                target("hitfinder:threshold:latency_p99_seconds", "p99 budget"),
            ],
            "s",
        ),
        heatmap(
            "End-to-end latency distribution",
            "Events per second in each latency bucket.",
            sel("hitfinder_latency_seconds_bucket"),
            "s",
        ),
        timeseries(
            "Stage durations",
            "Seconds per batch in each stage (read: per frame): p50/p95/p99 over 1 min.",
            quantiles("hitfinder:stage_duration_seconds:quantile_1m", by="stage"),
            "s",
        ),
        heatmap(
            "Inference time distribution",
            "Batches per second in each bucket of the infer stage (onnxruntime).",
            sel("hitfinder_stage_duration_seconds_bucket", stage="infer"),
            "s",
        ),
    ]


def health() -> list[Json]:
    return [
        timeseries(
            "Batch size",
            "Frames per inference batch: mean and p99 over 1 min. Near the maximum: the service is saturated.",
            [
                target(sel("hitfinder:batch_size:mean_rate1m"), "mean {{instance}}"),
                target(sel("hitfinder:batch_size:quantile_1m", quantile="0.99"), "p99 {{instance}}"),
            ],
            "none",
        ),
        timeseries(
            "Where frames are binned",
            "Frames binned per second: by a psana reader process (which shares the work while the service is "
            "behind) or by the service. Most of them in the reader: the service is the bottleneck.",
            [
                target(
                    f"sum by (instance, where) (rate({sel('hitfinder_frames_binned_total')}[$__rate_interval]))",
                    "{{where}} {{instance}}",
                )
            ],
            FRAMES_PER_S,
        ),
        timeseries(
            "Queue depths",
            "Items waiting in each internal queue. A queue that stays full means a stage cannot keep up.",
            [target(f"max by (instance, queue) ({sel('hitfinder_queue_depth')})", "{{queue}} {{instance}}")],
            "none",
        ),
        timeseries(
            "Drops and errors",
            "Events dropped per second, by reason (never decided), and frames given an error decision.",
            [
                target(
                    f"sum by (instance, reason) ({sel('hitfinder:dropped_events:rate1m')})",
                    "dropped: {{reason}} {{instance}}",
                ),
                target(
                    f"sum by (instance, reason) ({sel('hitfinder:frame_errors:rate1m')})",
                    "error: {{reason}} {{instance}}",
                ),
            ],
            EVENTS_PER_S,
        ),
        timeseries(
            "Source restarts and bank reloads",
            "Reader restarts by the watchdog, bank reloads by result (refused: the old bank stayed), and decision"
            " logs that failed (that run went on without its record); each bar counts those of its minute (a step of"
            " a minute at least: over $__rate_interval, a scrape wider than a step, none is missed between bars).",
            [
                target(
                    f"sum by (instance) (increase({sel('hitfinder_source_restarts_total')}[$__rate_interval]))",
                    "restarts {{instance}}",
                ),
                target(
                    f"sum by (instance, result) (increase({sel('hitfinder_bank_reloads_total')}[$__rate_interval]))",
                    "bank reload {{result}} {{instance}}",
                ),
                target(
                    f"sum by (instance) (increase({sel('hitfinder_decision_log_failures_total')}[$__rate_interval]))",
                    "decision log failed {{instance}}",
                ),
            ],
            "none",
            defaults={"custom": {"drawStyle": "bars", "lineWidth": 1, "fillOpacity": 80, "spanNulls": False}},
            interval="1m",  # the least step: windows of a step and a scrape, so short steps count nothing twice
        ),
        timeseries(
            "Heartbeat age",
            "Seconds since the last heartbeat, and the age at which HitfinderHeartbeatStale fires.",
            [
                target(sel("hitfinder:heartbeat_age:seconds"), "{{instance}}"),
                target("hitfinder:threshold:heartbeat_age_seconds", "alert"),
            ],
            "s",
        ),
        timeseries(
            "Run",
            "Run number being served (left axis), and whether a run is open (1) or not (0, right axis).",
            [
                target(f"max by (instance) ({sel('hitfinder_run_number')})", "run number {{instance}}"),
                target(f"max by (instance) ({sel('hitfinder_run_open')})", "run open {{instance}}"),
            ],
            "none",
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": "run open .*"},
                    "properties": [
                        {"id": "custom.axisPlacement", "value": "right"},
                        {"id": "min", "value": 0},
                        {"id": "max", "value": 1},
                    ],
                }
            ],
        ),
    ]


def row(title: str, y: int) -> Json:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
    }


def layout(sections: list[tuple[str, list[Json], int, int]]) -> list[Json]:
    """Rows of panels, `width` x `height` each, left to right then wrapping; ids in reading order."""
    out: list[Json] = []
    y = 0
    for title, panels, width, height in sections:
        out.append(row(title, y))
        y += 1
        for i, p in enumerate(panels):
            x = (i * width) % WIDTH
            if i and x == 0:
                y += height
            p["gridPos"] = {"x": x, "y": y, "w": width, "h": height}
            out.append(p)
        y += height
    for i, p in enumerate(out, start=1):
        p["id"] = i
    return out


def templating() -> Json:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            {
                "name": "instance",
                "label": "Instance",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": "label_values(hitfinder_build_info, instance)", "refId": "instance"},
                "definition": "label_values(hitfinder_build_info, instance)",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "refresh": 2,
                "sort": 1,
                "hide": 0,
                "regex": "",
                "options": [],
            },
        ]
    }


def dashboard() -> Json:
    panels = layout(
        [
            ("Overview", overview(), 4, 4),
            ("What is live", build_info(), 12, 4),
            ("Events", events(), 12, 8),
            ("Latency", latency(), 12, 8),
            ("Pipeline health", health(), 8, 7),
        ]
    )
    return {
        "uid": "lcls-hitfinder",
        "title": "lcls-hitfinder",
        "description": "Real-time single-hit classification: throughput, decisions, latency, health.",
        "tags": ["lcls", "hitfinder"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "annotations": {"list": []},
        "templating": templating(),
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

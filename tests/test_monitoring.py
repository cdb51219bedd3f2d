"""The monitoring files of deploy/: Prometheus config and rules (promtool), the generated Grafana dashboard,
its provisioning, and that every series they read is one the service exports or a rule records."""

from __future__ import annotations

import json
import shutil
import subprocess
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_support import (
    DASHBOARDS,
    DEPLOY,
    PROMETHEUS,
    REPO,
    RULE_FILES,
    dashboard_exprs,
    dashboards,
    exported_series,
    load_generator,
    panels,
    recorded_series,
    rule_exprs,
    rules,
    series_names,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (deploy/install.sh installs Debian's prometheus package)"
)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def promtool(*args: str | Path) -> str:
    assert PROMTOOL is not None
    proc = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@needs_promtool
def test_promtool_check_config() -> None:
    out = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out


@needs_promtool
def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", *RULE_FILES)
    assert out.count("SUCCESS") == len(RULE_FILES)


@needs_promtool
def test_promtool_unit_tests_of_rules() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    out = promtool("test", "rules", *tests)
    assert "FAILED" not in out


def test_every_alert_is_unit_tested_and_documented() -> None:
    tested = "\n".join(p.read_text() for p in (PROMETHEUS / "tests").glob("*.yml"))
    ops = (REPO / "docs" / "operations.md").read_text()
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 6
    for rule in alerts:
        name = rule["alert"]
        assert f"alertname: {name}" in tested, f"{name} has no promtool unit test"
        assert f"### {name}" in ops, f"{name} is not explained in docs/operations.md"
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}"
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_the_latency_budget_is_an_edge_of_the_latency_buckets() -> None:
    """Within a bucket histogram_quantile interpolates: a budget inside one (20 ms in (10, 25] ms) read a p99
    of 11 ms as 22 ms and raised the alert."""
    from lcls_hitfinder.service.metrics import LATENCY_BUCKETS

    budget = next(r for r in rules() if r.get("record") == "hitfinder:threshold:latency_p99_seconds")
    assert float(budget["expr"].removeprefix("vector(").removesuffix(")")) in LATENCY_BUCKETS


def test_every_series_in_rules_and_dashboards_exists() -> None:
    """No invented names: each series read is exported by the service (metrics.py) or recorded by a rule."""
    known = exported_series() | recorded_series() | {"up"}
    exprs = dashboard_exprs() + rule_exprs()
    used: set[str] = set()
    for e in exprs:
        names = series_names(e.promql)
        assert names or e.name.startswith("hitfinder:threshold:"), f"{e.where}: no series in {e.promql!r}"
        unknown = names - known
        assert not unknown, f"{e.where}: {sorted(unknown)} is neither exported by the service nor recorded"
        used |= names
    # and every recording rule is read by a panel or an alert (no dead rules)
    unused = recorded_series() - used
    assert not unused, f"recording rules nobody reads: {sorted(unused)}"


def test_series_names_parser() -> None:
    promql = (
        'histogram_quantile(0.99, sum by (job, le) (rate(hitfinder_latency_seconds_bucket{stage="x"}[1m]))) '
        "> on () group_left () hitfinder:threshold:latency_p99_seconds unless up offset 5m"
    )
    assert series_names(promql) == {"hitfinder_latency_seconds_bucket", "hitfinder:threshold:latency_p99_seconds", "up"}


def test_committed_dashboard_is_the_generated_one() -> None:
    generator = load_generator()
    committed = generator.OUT.read_text()
    assert committed == generator.render(), "run: .venv/bin/python deploy/grafana/generate.py"
    assert [p.name for p in DASHBOARDS] == [generator.OUT.name]


@pytest.mark.parametrize("name", [p.name for p in DASHBOARDS])
def test_dashboard_structure(name: str) -> None:
    board = dashboards()[name]
    assert "__inputs" not in board and "__requires" not in board
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, f"variable {v['name']}"

    all_panels = panels(board)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rects = []
    for p in all_panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), p["title"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        rects.append((p["title"], g))
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"], f"panel {p['id']} needs a title and a description"
        assert p["datasource"] == DATASOURCE, f"panel {p['title']!r}: datasource must be ${{datasource}}"
        targets = p["targets"]
        assert targets, p["title"]
        assert len({t["refId"] for t in targets}) == len(targets), p["title"]
        for t in targets:
            assert t["datasource"] == DATASOURCE, f"{p['title']!r} {t['refId']}"
            assert t["expr"].strip()
        unit = p["fieldConfig"]["defaults"]["unit"]
        assert unit not in ("reqps", "rps", "wps"), f"{p['title']!r}: a rate of events in HTTP request units"
    for (a, ga), (b, gb) in combinations(rects, 2):
        overlap_x = ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
        overlap_y = ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"]
        assert not (overlap_x and overlap_y), f"panels {a!r} and {b!r} overlap"


def unknown_keys(ours: Any, schema: Any, path: str = "") -> list[str]:
    """Keys of `ours` that the schema round trip dropped, as paths."""
    if isinstance(ours, dict) and isinstance(schema, dict):
        return [
            found
            for key, value in ours.items()
            for found in ([f"{path}/{key}"] if key not in schema else unknown_keys(value, schema[key], f"{path}/{key}"))
        ]
    if isinstance(ours, list) and isinstance(schema, list):
        return [
            found
            for i, (a, b) in enumerate(zip(ours, schema, strict=True))
            for found in unknown_keys(a, b, f"{path}[{i}]")
        ]
    return []


@pytest.mark.parametrize("name", [p.name for p in DASHBOARDS])
def test_dashboard_keys_are_grafanas(name: str) -> None:
    """Round trip through Grafana's own schema (grafana-foundation-sdk, with the panel plugins' option
    types): a key it does not know, say a misspelt option, is dropped and reported here."""
    sdk_dashboard = pytest.importorskip("grafana_foundation_sdk.models.dashboard")
    plugins = pytest.importorskip("grafana_foundation_sdk.cog.plugins")
    plugins.register_default_plugins()
    board = dashboards()[name]
    model = sdk_dashboard.Dashboard.from_json(board)
    schema = json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json()))
    dropped = unknown_keys(board, schema)
    # `definition` is the text Grafana's editor shows for a query variable; the schema leaves it out
    assert [d for d in dropped if not d.endswith("/definition")] == []
    assert [p["type"] for p in schema["panels"]] == [p["type"] for p in board["panels"]]


@pytest.mark.parametrize("name", [p.name for p in DASHBOARDS])
def test_time_series_keep_the_instances_apart(name: str) -> None:
    """Two services on one node (two detectors) are two lines in every time series: an aggregation that drops
    `instance` showed one queue depth, one latency, one drop rate for both."""
    import re

    for p in panels(dashboards()[name]):
        if p["type"] != "timeseries":
            continue
        for t in p["targets"]:
            for op, group in re.findall(r"\b(sum|max|min|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(", t["expr"]):
                assert "instance" in group.split(", "), f"{p['title']}: {op} without instance in {t['expr']}"
                assert "{{instance}}" in t["legendFormat"], f"{p['title']}: {t['legendFormat']}"


def test_dashboard_covers_what_operators_watch() -> None:
    """The panels issue 5 asks for, found by the series they read."""
    reads: dict[str, set[str]] = {}
    for e in dashboard_exprs():
        title = e.where.split("'")[1]
        reads.setdefault(title, set()).update(series_names(e.promql))
    everything = set().union(*reads.values())
    for series in (
        "hitfinder:events:rate1m",  # event rate by label
        "hitfinder:keep_fraction:ratio_rate1m",
        "hitfinder:hit_fraction:ratio_rate1m",
        "hitfinder:single_hit_fraction:ratio_rate1m",
        "hitfinder:latency_seconds:quantile_1m",
        "hitfinder:stage_duration_seconds:quantile_1m",
        "hitfinder_latency_seconds_bucket",  # heatmap
        "hitfinder:batch_size:mean_rate1m",
        "hitfinder_queue_depth",
        "hitfinder:dropped_events:rate1m",
        "hitfinder_source_restarts_total",
        "hitfinder:heartbeat_age:seconds",
        "hitfinder_build_info",
        "hitfinder_bank_info",
        "hitfinder:truth_agreement:ratio_rate1m",
    ):
        assert series in everything, f"no panel shows {series}"
    heatmaps = [p for b in dashboards().values() for p in panels(b) if p["type"] == "heatmap"]
    assert heatmaps and all(t["format"] == "heatmap" for p in heatmaps for t in p["targets"])


def test_dashboard_thresholds_follow_the_alert_thresholds() -> None:
    """Stat colours are read from rules/thresholds.yml by the generator, not typed twice."""
    generator = load_generator()
    board = generator.dashboard()
    p99 = next(p for p in panels(board) if p["title"] == "p99 latency")
    steps = p99["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == generator.threshold("latency_p99_seconds") == 0.02


def test_grafana_provisioning() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "${PROMETHEUS_URL}"
    (provider,) = yaml.safe_load((prov / "dashboards" / "hitfinder.yml").read_text())["providers"]
    assert provider["type"] == "file"
    # docker/compose.yaml mounts the dashboards where the provider looks
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_known_label_values_are_exported_from_the_start() -> None:
    """Drops, errors and bank reloads read 0 before the first one happens, so panels and alerts have data."""
    from prometheus_client import generate_latest

    from lcls_hitfinder.service.metrics import ServiceMetrics

    text = generate_latest(ServiceMetrics().registry).decode()
    for line in (
        'hitfinder_events_total{decision="keep",label="single"} 0.0',
        'hitfinder_dropped_events_total{reason="queue_full"} 0.0',
        'hitfinder_frame_errors_total{reason="nonfinite"} 0.0',
        'hitfinder_bank_reloads_total{result="refused"} 0.0',
    ):
        assert line in text.splitlines()

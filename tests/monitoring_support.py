"""What the monitoring tests share: the deploy/ files, the PromQL they contain, and the metric names in it."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from lcls_hitfinder.service.metrics import SPECS, ServiceMetrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"offset", "inf", "nan"}


@dataclass(frozen=True)
class Expr:
    """One PromQL expression and where it comes from (for messages)."""

    where: str
    promql: str
    kind: str  # "panel", "record", "alert"
    name: str = ""  # the recorded series or the alert


def load_generator() -> ModuleType:
    """deploy/grafana/generate.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("grafana_generate", DEPLOY / "grafana" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in DASHBOARDS}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def rules() -> list[dict[str, Any]]:
    return [
        rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard_exprs() -> list[Expr]:
    return [
        Expr(f"{name}: panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"], "panel")
        for name, board in dashboards().items()
        for p in panels(board)
        for t in p.get("targets", [])
    ]


def rule_exprs() -> list[Expr]:
    return [
        Expr(
            f"rule {r.get('record') or r.get('alert')}",
            r["expr"],
            "record" if "record" in r else "alert",
            r.get("record") or r["alert"],
        )
        for r in rules()
    ]


def series_names(promql: str) -> set[str]:
    """Metric and recorded-series names in an expression: identifiers that are not functions, keywords,
    label names (inside {} or by/on/... lists), durations or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", promql)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match[0].lower() in PROMQL_KEYWORDS:
            continue  # a function call or a keyword
        names.add(match[0])
    return names


def exported_series() -> set[str]:
    """Every series name the service exports: the one table in lcls_hitfinder/service/metrics.py, and the
    process metrics of its registry (process_start_time_seconds...)."""
    out = set()
    for spec in SPECS:
        if spec.kind == "histogram":
            out |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            out.add(spec.name)
    registry = ServiceMetrics().registry
    return out | {s.name for family in registry.collect() for s in family.samples if s.name.startswith("process_")}


def recorded_series() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}

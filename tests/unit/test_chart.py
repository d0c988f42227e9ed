"""The Helm chart: values it references exist; dashboard and alerts use metrics the operator serves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.metrics import OperatorMetrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"


def _served_series() -> set[str]:
    names: set[str] = set()
    for family in OperatorMetrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def _series_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(finetune_[a-z_]+)", expr))


def test_dashboard_and_alerts_only_use_served_metrics() -> None:
    served = _served_series()
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    used = set().union(*(_series_in(e) for e in exprs))
    assert used, "no metrics referenced"
    assert used <= served, f"unknown series: {sorted(used - served)}"


def _has_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_templates_reference_existing_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for template in (CHART / "templates").glob("*"):
        for path in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()):
            assert _has_path(values, path), f"{template.name}: .Values.{path} is not in values.yaml"


def test_chart_files_exist_for_every_files_get() -> None:
    for template in (CHART / "templates").glob("*"):
        for name in re.findall(r'\.Files\.Get "([^"]+)"', template.read_text()):
            assert (CHART / name).is_file(), f"{template.name} reads missing {name}"

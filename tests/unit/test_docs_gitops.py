"""docs/gitops.md and docs/monitoring.md stay true to the files and code they describe."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune_operator.controller import metrics

ROOT = Path(__file__).resolve().parents[2]
GITOPS = (ROOT / "docs" / "gitops.md").read_text()
MONITORING = ROOT / "docs" / "monitoring.md"
CHART_FILES = ROOT / "charts" / "finetune-operator" / "files"


def test_gitops_doc_carries_the_tested_health_lua_and_flux_expressions() -> None:
    lua = (ROOT / "gitops/argocd/resource_customizations/finetune.dev/FineTuneJob/health.lua").read_text()
    indented = "".join(("    " + line) if line.strip() else line for line in lua.splitlines(keepends=True))
    assert indented.rstrip("\n") in GITOPS, "docs/gitops.md: the argocd-cm snippet differs from health.lua"
    flux = (ROOT / "gitops/flux/kustomization.yaml").read_text()
    assert flux.rstrip("\n") in GITOPS, "docs/gitops.md: the Kustomization differs from gitops/flux/kustomization.yaml"


def test_metrics_reference_is_generated_from_the_code() -> None:
    text = MONITORING.read_text()
    assert text == metrics.render_docs(text), "docs/monitoring.md: run `make docs`"
    for metric in metrics.OperatorMetrics().metrics():
        assert f"`{next(iter(metric.describe())).name}" in text


def test_monitoring_doc_names_every_alert_and_panel() -> None:
    text = MONITORING.read_text()
    alerts = yaml.safe_load((CHART_FILES / "alerts.yaml").read_text())
    for rule in (rule for group in alerts["groups"] for rule in group["rules"]):
        assert f"`{rule['alert']}`" in text
    for panel in json.loads((CHART_FILES / "dashboard.json").read_text())["panels"]:
        assert f"| {panel['title']} |" in text

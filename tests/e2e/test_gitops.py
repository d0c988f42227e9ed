"""GitOps and Grafana, on the real control plane: every phase of a FineTuneJob as kstatus,
Argo CD (health.lua) and Flux (healthCheckExprs) compute it, and every dashboard query
against a real Prometheus scraping the operator.

One module fixture drives cheap scripted trainers (fake_trainer.py) into every phase at once,
dumps the jobs, and queries Prometheus before it briefly stops the operator to catch a spec
change not yet observed. The dumps, scrubbed of names and times, are also the checked-in
testdata of the Argo CD health check: a test fails when the operator stops producing what
they show (regenerate with FINETUNE_UPDATE_GITOPS_TESTDATA=1). Checked in rather than only
regenerated because Argo CD's layout wants them next to health.lua, and the offline test
(tests/gitops) runs them without a cluster.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_localcluster.cluster import free_port
from finetune_testsupport import gitops_harness
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.e2e.conftest import Jobs, Operator, fake_job
from tests.e2e.test_sweeps import Sweeps, fake_sweep, finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "files" / "dashboard.json"
TESTDATA = gitops_harness.ARGOCD_DIR / "testdata"
UPDATE = os.environ.get("FINETUNE_UPDATE_GITOPS_TESTDATA") == "1"

# phase: (kstatus, Argo CD, Flux healthCheckExprs)
EXPECTED = {
    "pending": ("InProgress", "Progressing", "InProgress"),
    "running": ("InProgress", "Progressing", "InProgress"),
    "suspended": ("Current", "Suspended", "Current"),
    "stalled": ("Failed", "Degraded", "Failed"),
    "succeeded": ("Current", "Healthy", "Current"),
    "early-stopped": ("Current", "Healthy", "Current"),
    "failed-invalid-spec": ("Failed", "Degraded", "Failed"),
    "failed-backoff": ("Failed", "Degraded", "Failed"),
    "failed-data-error": ("Failed", "Degraded", "Failed"),
    "spec-changed": ("InProgress", "Progressing", "InProgress"),
}


def _true(type_: str, reason: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def holds(body: dict[str, Any]) -> bool:
        return any(
            c["type"] == type_ and c["status"] == "True" and reason in (None, c["reason"])
            for c in (body.get("status") or {}).get("conditions", [])
        )

    return holds


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, expression: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def last_scrape(self) -> float:
        """When Prometheus last scraped the operator (Unix seconds; 0 before the first scrape)."""
        scraped = self.query('timestamp(up{job="operator"})')
        return float(scraped[0]["value"][1]) if scraped else 0.0


@pytest.fixture(scope="module")
def prometheus(operator: Operator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run `make system-deps`"
    directory = tmp_path_factory.mktemp("prometheus")
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "operator", "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"]}]}
                ],
            }
        )
    )
    port = free_port()
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Prometheus(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 60
        while True:  # scraped once: counters are seen at 0 before the jobs move them
            try:
                if running.query('up{job="operator"} == 1'):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (directory / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        yield running
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _panel_queries(namespace: str) -> list[tuple[str, str]]:
    """(title, query) of every panel target, with the dashboard's $namespace set to ``namespace``."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$namespace", namespace))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def _variable_queries() -> dict[str, str]:
    """The dashboard's query variables as PromQL: Grafana's label_values(m, l) is group by (l) (m)."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
            assert match, f"unsupported variable query {variable['query']}"
            queries[variable["name"]] = f"group by ({match.group(2)}) ({match.group(1)})"
    return queries


@dataclass
class Scenario:
    namespace: str
    dumps: dict[str, dict[str, Any]]
    panels: dict[tuple[str, str], list[dict[str, Any]]]
    variables: dict[str, list[str]]
    observed_again: dict[str, Any]
    events: dict[str, list[str]]
    """The reasons of each job's Events."""


@pytest.fixture(scope="module")
def scenario(
    local_cluster: LocalCluster, operator: Operator, prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("gitops")
    namespace = local_cluster.create_namespace("gitops")
    with local_cluster.api_client() as api:
        jobs = Jobs(api, namespace, operator)
        steady = "finetune-test/steady:1"
        manifests = {
            "pending": fake_job("pending", steady, tmp, resources={"image": steady, "gpusPerNode": 64}),
            "running": fake_job("running", steady, tmp),
            "suspended": fake_job("suspended", steady, tmp, suspend=True),
            "stalled": fake_job("stalled", "finetune-test/silent:1", tmp, stallTimeoutSeconds=30),
            "succeeded": fake_job("succeeded", "finetune-test/exit-0", tmp),
            "early-stopped": fake_job(
                "early-stopped", "finetune-test/plateau:1", tmp, earlyStopping={"metric": "accuracy", "patience": 2}
            ),
            "failed-invalid-spec": fake_job(
                "failed-invalid-spec", steady, tmp, freeze={"strategy": "modules", "frozenModules": ["(embeddings"]}
            ),
            "failed-backoff": fake_job("failed-backoff", "finetune-test/exit-1", tmp, backoffLimit=0),
            "failed-data-error": fake_job("failed-data-error", "finetune-test/exit-3", tmp),
        }
        for manifest in manifests.values():
            jobs.create(manifest)
        sweeps = Sweeps(jobs)  # its metrics feed the dashboard's sweep panels
        sweeps.create(fake_sweep("sweep", tmp, parallelism=2, maxTrials=2))
        waits: dict[str, Callable[[dict[str, Any]], bool]] = {
            "pending": lambda b: (b.get("status") or {}).get("phase") is not None,
            "running": lambda b: _true("Running")(b) and (b["status"].get("progress") or {}).get("step", 0) >= 1,
            "suspended": _true("Suspended"),
            "stalled": _true("Stalled", "NoProgress"),
            "succeeded": _true("Complete", "Succeeded"),
            "early-stopped": _true("Complete", "EarlyStopped"),
            "failed-invalid-spec": _true("Failed", "InvalidSpec"),
            "failed-backoff": _true("Failed", "BackoffLimitExceeded"),
            "failed-data-error": _true("Failed", "DataError"),
        }
        dumps = {phase: jobs.wait(phase, phase, holds, timeout=120) for phase, holds in waits.items()}
        dumps["pending"] = jobs.get("pending")  # still pending after all that time: no node has 64 GPUs
        dumps["running"] = jobs.get("running")
        sweeps.wait("sweep", "Complete", finished, timeout=120)

        # The operator updates its metrics right after each status write: a scrape a little after the last
        # dump sees every transition. (Waiting for every series to be non-zero instead burnt the whole
        # deadline: a pending job's progress and the pre-created failure reasons are 0 by design.)
        caught_up = time.time() + 2
        deadline = time.monotonic() + 30
        while True:
            panels = {panel: prometheus.query(panel[1]) for panel in _panel_queries(namespace)}
            settled = prometheus.last_scrape() >= caught_up and all(
                any(float(s["value"][1]) for s in series) for series in panels.values()
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)

        variables = {
            name: [next(iter(s["metric"].values()), "") for s in prometheus.query(query)]
            for name, query in _variable_queries().items()
        }

        # A spec change the operator has not acted on yet: stop it, edit, dump, start it again.
        operator.kill(signal.SIGTERM)
        try:
            jobs.patch("suspended", {"spec": {"ttlSecondsAfterFinished": 3600}})
            dumps["spec-changed"] = jobs.get("suspended")
        finally:
            operator.start()
        observed_again = jobs.wait(
            "suspended",
            "the new generation observed",
            lambda b: b["status"].get("observedGeneration") == b["metadata"]["generation"],
            timeout=60,
        )
        events = {name: jobs.events(name) for name in manifests}
        yield Scenario(namespace, dumps, panels, variables, observed_again, events)
        client.CoreV1Api(api).delete_namespace(namespace)


def _scrub(body: dict[str, Any], namespace: str) -> dict[str, Any]:
    """A dump without the names, paths and times of this run, as checked-in testdata."""
    text = json.dumps(body)
    text = text.replace(namespace, "ml-team")
    text = re.sub(r"file:///[^\"]*?/(model|data|[a-z-]+)\"", r'pvc://team-volume/\1"', text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "2026-11-30T12:00:00Z", text)
    scrubbed: dict[str, Any] = json.loads(text)
    metadata = scrubbed["metadata"]
    for key in ("managedFields", "uid", "resourceVersion", "creationTimestamp"):
        metadata.pop(key, None)
    status = scrubbed.get("status") or {}
    if "evaluations" in status:
        status["evaluations"] = status["evaluations"][-3:]
    return scrubbed


def _essence(body: dict[str, Any]) -> dict[str, Any]:
    """What the health checks read: generations, phase, conditions (type, status, reason)."""
    status = body.get("status") or {}
    return {
        "generation": body["metadata"].get("generation"),
        "observedGeneration": status.get("observedGeneration"),
        "phase": status.get("phase"),
        "conditions": sorted((c["type"], c["status"], c["reason"]) for c in status.get("conditions", [])),
    }


def test_every_phase_computes_right_in_kstatus_argocd_and_flux(scenario: Scenario, tmp_path: Path) -> None:
    files = []
    for phase, body in scenario.dumps.items():
        path = tmp_path / f"{phase}.yaml"
        path.write_text(yaml.safe_dump(body))
        files.append(path)
    report = gitops_harness.report(files)
    got = {
        Path(name).stem: (r["kstatus"]["status"], r["argocd"]["status"], r["flux"]["status"])
        for name, r in report.items()
    }
    assert got == EXPECTED, json.dumps(report, indent=1)
    assert report["failed-backoff.yaml"]["argocd"]["message"].startswith("BackoffLimitExceeded: trainer failed")
    assert report["running.yaml"]["argocd"]["message"] == scenario.dumps["running"]["status"]["message"]


def test_a_trainer_that_stops_reporting_is_stalled(scenario: Scenario) -> None:
    """The silent trainer (it starts, then never reports) is Stalled/NoProgress, with an Event saying so."""
    status = scenario.dumps["stalled"]["status"]
    assert status["phase"] == "Stalled"
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert "no progress report for more than 30s" in stalled["message"]
    assert "NoProgress" in scenario.events["stalled"]


def test_the_spec_change_is_observed_again(scenario: Scenario, tmp_path: Path) -> None:
    path = tmp_path / "observed-again.yaml"
    path.write_text(yaml.safe_dump(scenario.observed_again))
    result = gitops_harness.report([path])["observed-again.yaml"]
    assert (result["kstatus"]["status"], result["argocd"]["status"], result["flux"]["status"]) == (
        "Current",
        "Suspended",
        "Current",
    )


def test_checked_in_testdata_is_what_the_operator_produces(scenario: Scenario) -> None:
    stale = []
    for phase, body in scenario.dumps.items():
        path = TESTDATA / f"{phase}.yaml"
        fresh = _scrub(copy.deepcopy(body), scenario.namespace)
        if UPDATE:
            path.write_text(yaml.safe_dump(fresh, sort_keys=False))
        elif not path.exists() or _essence(yaml.safe_load(path.read_text())) != _essence(fresh):
            stale.append(phase)
    assert not stale, f"{TESTDATA} differs from the operator's {stale}: rerun with FINETUNE_UPDATE_GITOPS_TESTDATA=1"


def test_every_dashboard_query_returns_series(scenario: Scenario) -> None:
    empty = [f"{title}: {expr}" for (title, expr), series in scenario.panels.items() if not series]
    assert not empty, "dashboard queries without data (broken query or vanished metric):\n" + "\n".join(empty)
    by_title = {title: series for (title, _), series in scenario.panels.items()}
    per_job = {
        s["metric"].get("name") for s in by_title["Progress"] if s["metric"].get("namespace") == scenario.namespace
    }
    assert {"running", "early-stopped"} <= per_job
    assert scenario.namespace in scenario.variables["namespace"], scenario.variables
    best = {
        s["metric"]["name"]: float(s["value"][1])
        for s in by_title["Best monitored metric"]
        if s["metric"].get("namespace") == scenario.namespace
    }
    assert best.get("early-stopped") == 0.6
    trials = {
        s["metric"]["state"]: float(s["value"][1])
        for s in by_title["Sweep trials by state"]
        if s["metric"].get("namespace") == scenario.namespace
    }
    assert trials.get("succeeded", 0) + trials.get("pruned", 0) == 2, trials
    sweep_best = [
        s for s in by_title["Sweep best objective value"] if s["metric"].get("namespace") == scenario.namespace
    ]
    assert [(s["metric"]["name"], s["metric"]["metric"]) for s in sweep_best] == [("sweep", "accuracy")]


def test_first_failure_of_a_reason_shows_on_the_dashboard(scenario: Scenario) -> None:
    """A labelled counter born at 1 has no increase; the operator pre-creates every failure reason at 0."""
    failures = {
        s["metric"].get("reason"): float(s["value"][1])
        for (title, expr), series in scenario.panels.items()
        if "finetune_job_failures_total" in expr
        for s in series
    }
    assert failures.get("BackoffLimitExceeded", 0) > 0, failures
    assert failures.get("DataError", 0) > 0, failures
    assert failures.get("InvalidSpec", 0) > 0, failures
    early = next(series for (_, expr), series in scenario.panels.items() if "early_stops" in expr)
    assert float(early[0]["value"][1]) > 0

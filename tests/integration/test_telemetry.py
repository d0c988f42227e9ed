"""Private telemetry. ``/metrics`` behind Kubernetes authentication (``--metrics-auth=kubernetes``), against
the real API server: the operator asks it with its own token (the chart's ClusterRole) who holds a
scraper's bearer token (TokenReview) and whether that identity may get ``/metrics`` (SubjectAccessReview).
On main every caller got every tenant's series."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from finetune_devtools.helm import ensure_helm
from finetune_localcluster.cluster import free_port
from finetune_localcluster.kubeconfig import service_account_kubeconfig
from finetune_operator.api.job import FineTuneJobStatus, Progress
from finetune_operator.controller.clients import login
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.metrics_auth import KubernetesAuth
from finetune_operator.generators.rbac import cluster_role
from finetune_testsupport.pytest_plugin import LocalCluster

pytestmark = pytest.mark.integration
CHART = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"

READER = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "metadata": {"name": "metrics-reader"},
    "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}],
}


def _scrape(port: int, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _token(kubeconfig: Path) -> str:
    token: str = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    return token


def test_metrics_are_served_only_to_identities_allowed_to_get_them(
    local_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = local_cluster.kubeconfig
    operator = service_account_kubeconfig(admin, cluster_role(), "finetune-system", tmp_path / "operator.yaml")
    scraper = _token(service_account_kubeconfig(admin, READER, "monitoring", tmp_path / "scraper.yaml"))
    with local_cluster.api_client() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": "nosy"}})
        client.CoreV1Api(api).create_namespaced_service_account("nosy", {"metadata": {"name": "tenant"}})
        nosy = client.CoreV1Api(api).create_namespaced_service_account_token("tenant", "nosy", {"spec": {}})
    monkeypatch.setenv("KUBECONFIG", str(operator))  # the operator's own credentials ask the API server
    metrics = OperatorMetrics()
    metrics.observe_job("team-a", "secret-project", FineTuneJobStatus(phase="Running", progress=Progress(percent=5)))
    port = free_port()
    metrics.serve(port, "127.0.0.1", KubernetesAuth(login))

    assert _scrape(port, None)[0] == 401
    assert _scrape(port, "not-a-token")[0] == 401
    status, body = _scrape(port, nosy.status.token)
    assert status == 403 and "secret-project" not in body, "a tenant's own token reads no one's series"
    status, body = _scrape(port, scraper)
    assert status == 200 and 'name="secret-project"' in body
    assert _scrape(port, scraper)[0] == 200, "the verdict is cached"


def test_the_charts_network_policies_pass_the_api_servers_dry_run(local_cluster: LocalCluster, namespace: str) -> None:
    """No CNI here enforces them; the API server validates them (server-side dry-run), and
    tests/unit/test_chart.py checks their selectors and ports against the rendered pods."""
    rendered = subprocess.run(
        [
            *(str(ensure_helm()), "template", "rel", str(CHART), "-n", namespace),
            *("--set", "metrics.networkPolicy.enabled=true", "--set-json", f'namespaces=["{namespace}"]'),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    policies = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "NetworkPolicy"]
    assert len(policies) == 2
    with local_cluster.api_client() as api:
        networking = client.NetworkingV1Api(api)
        for policy in policies:
            networking.create_namespaced_network_policy(policy["metadata"]["namespace"], policy, dry_run="All")

"""The shipped user roles (deploy/user-roles.yaml) on the real API server, with users by impersonation:
finetune-author uses the product without pod or Secret rights; the built-in edit/view cover both kinds."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_operator.api.sweep import SWEEP_PLURAL
from finetune_operator.generators.crd import USER_ROLES_FILE
from finetune_operator.generators.rbac import AUTHOR_ROLE
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import Manifest, baseline, sweep_baseline

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "sneaky"},
    "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["true"]}]},
}


@pytest.fixture(scope="module")
def user_roles(local_cluster: LocalCluster, crd: Any, sweep_crd: Any) -> None:
    """The plain-YAML roles applied as an admin would, and aggregated into edit/view by the controller."""
    local_cluster.kubectl("apply", "-f", str(ROOT / USER_ROLES_FILE))
    with local_cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        deadline = time.monotonic() + 60
        while True:
            granted = [
                {r for rule in rbac.read_cluster_role(role).rules or [] for r in rule.resources or []}
                for role in ("edit", "view")
            ]
            if all(SWEEP_PLURAL in resources for resources in granted):
                return
            assert time.monotonic() < deadline, f"edit/view never aggregated {SWEEP_PLURAL}: {granted}"
            time.sleep(0.2)


@pytest.fixture
def tenant(local_cluster: LocalCluster, namespace: str, user_roles: None) -> Iterator[str]:
    """``namespace`` with alice bound to finetune-author, bob to edit, carol to view (RoleBindings)."""
    with local_cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        for user, role in (("alice", AUTHOR_ROLE), ("bob", "edit"), ("carol", "view")):
            rbac.create_namespaced_role_binding(
                namespace,
                {
                    "metadata": {"name": user},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
                },
            )
        client.CoreV1Api(api).create_namespaced_secret(
            namespace, {"metadata": {"name": "prod-db-credentials"}, "stringData": {"password": "x"}}
        )
    yield namespace


def _as(local_cluster: LocalCluster, user: str, namespace: str, *args: str, manifest: Manifest | None = None) -> str:
    """kubectl as ``user``; '' on success, else its error (Forbidden...)."""
    res = local_cluster.kubectl(
        f"--as={user}", "-n", namespace, *args, input=json.dumps(manifest) if manifest else None, check=False
    )
    return "" if res.returncode == 0 else res.stderr


def test_an_author_uses_jobs_and_sweeps_but_gets_no_pods_or_secrets(
    local_cluster: LocalCluster, tenant: str, namespace: str
) -> None:
    as_alice = lambda *args, manifest=None: _as(local_cluster, "alice", tenant, *args, manifest=manifest)  # noqa: E731
    assert as_alice("apply", "-f", "-", manifest=baseline("mine")) == ""
    assert as_alice("apply", "-f", "-", manifest=sweep_baseline("search")) == ""
    assert as_alice("get", "finetunejob", "mine") == ""
    assert as_alice("get", "finetunesweep", "search") == ""
    assert as_alice("get", "pods") == "" and as_alice("get", "events") == "" and as_alice("get", "jobs.batch") == ""
    assert as_alice("delete", "finetunejob", "mine") == ""
    for denied in (
        as_alice("create", "-f", "-", manifest=POD),
        as_alice("get", "secret", "prod-db-credentials"),
        as_alice("get", "secrets"),
        as_alice("create", "job", "j", "--image=busybox"),
        _as(local_cluster, "alice", "default", "get", "finetunejobs"),  # bound in one namespace only
    ):
        assert "forbidden" in denied.lower(), denied


def test_the_builtin_edit_applies_sweeps_and_view_reads_them(
    local_cluster: LocalCluster, tenant: str, namespace: str
) -> None:
    """On main: Forbidden for both (the aggregated roles named finetunejobs only)."""
    assert _as(local_cluster, "bob", tenant, "apply", "-f", "-", manifest=sweep_baseline("by-edit")) == ""
    assert _as(local_cluster, "carol", tenant, "get", "finetunesweep", "by-edit", "-o", "name") == ""
    assert _as(local_cluster, "carol", tenant, "get", "finetunesweeps") == ""
    denied = _as(local_cluster, "carol", tenant, "apply", "-f", "-", manifest=sweep_baseline("by-view"))
    assert "forbidden" in denied.lower(), denied

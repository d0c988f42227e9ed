"""Drift is judged by what a child holds (``children.content_hash``): on the real API server, every child
as stored hashes as it was rendered, so the fields the server fills in (a Service's clusterIPs,
sessionAffinity, ipFamilies...) are never taken for an edit, and no child is rewritten for nothing."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.utils import create_from_dict

from finetune_operator.reconcile import Settings, desired_children
from finetune_operator.reconcile.children import content_hash
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.integration.test_child_names import _job, _unowned

pytestmark = pytest.mark.integration


def _read(api: client.ApiClient, child: dict[str, Any]) -> dict[str, Any]:
    """The child as the API server stores it, in its wire form."""
    kind, namespace, name = child["kind"], child["metadata"]["namespace"], child["metadata"]["name"]
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    read = {
        "ConfigMap": core.read_namespaced_config_map,
        "Service": core.read_namespaced_service,
        "Role": rbac.read_namespaced_role,
        "RoleBinding": rbac.read_namespaced_role_binding,
    }[kind]
    stored: dict[str, Any] = {"kind": kind, **api.sanitize_for_serialization(read(name, namespace))}
    return stored


def test_every_child_hashes_as_stored_as_it_was_rendered(local_cluster: LocalCluster, namespace: str) -> None:
    children = [
        _unowned(c)
        for c in desired_children(_job("content", namespace, nodes=2), Settings(), trainer_job=False)
        if content_hash(c) is not None
    ]
    assert {c["kind"] for c in children} == {"ConfigMap", "Service", "Role", "RoleBinding"}
    with local_cluster.api_client() as api:
        for child in children:
            create_from_dict(api, child, namespace=namespace)
        for child in children:
            assert content_hash(_read(api, child)) == content_hash(child), child["kind"]

"""The operator's own writes on a real API server, with its real token (``service_account_kubeconfig``:
the chart's ServiceAccount bound to the chart's ClusterRole): RBAC lets it create Jobs, ConfigMaps,
RoleBindings... anywhere; ``finetune_operator.generators.operator_policy`` (installed by the ``crd`` fixture) lets
through only the children of a FineTuneJob (a trial of a FineTuneSweep), labelled as ours."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster.kubeconfig import api_client, service_account_kubeconfig
from finetune_operator.api.job import GROUP, PLURAL, VERSION, FineTuneJob, read_stored
from finetune_operator.generators.rbac import OPERATOR_ACCOUNT, cluster_role
from finetune_operator.reconcile import Settings, desired_children
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import baseline

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crd")]


@pytest.fixture
def as_operator(local_cluster: LocalCluster, tmp_path: Path) -> Iterator[client.ApiClient]:
    """An API client holding a token of the operator's ServiceAccount, as its pod would."""
    path = service_account_kubeconfig(local_cluster.kubeconfig, cluster_role(), OPERATOR_ACCOUNT[0], tmp_path / "k")
    with api_client(path) as api:
        yield api


def _refusal(call: Callable[[], Any]) -> str:
    with pytest.raises(client.ApiException) as refused:
        call()
    assert refused.value.status == 403, refused.value.body
    return str(refused.value.body)


def test_the_operator_writes_only_children_of_our_kinds(
    local_cluster: LocalCluster, namespace: str, as_operator: client.ApiClient
) -> None:
    """On main the chart's ClusterRole let the operator's token create any ConfigMap, any Job (pods as any
    ServiceAccount) and bind any ClusterRole, in every namespace."""
    with local_cluster.api_client() as admin:
        stored = client.CustomObjectsApi(admin).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, baseline("owner")
        )
    job: FineTuneJob = read_stored(stored)
    children = {c["kind"]: c for c in desired_children(job, Settings())}
    core, rbac = client.CoreV1Api(as_operator), client.RbacAuthorizationV1Api(as_operator)
    batch = client.BatchV1Api(as_operator)

    config = children["ConfigMap"]
    unlabelled = {"metadata": {"name": "loose", "ownerReferences": config["metadata"]["ownerReferences"]}}
    assert "labelled app.kubernetes.io/managed-by" in _refusal(
        lambda: core.create_namespaced_config_map(namespace, unlabelled)
    )
    orphan = {"metadata": {"name": "orphan", "labels": config["metadata"]["labels"]}, "data": {"a": "b"}}
    assert "controlled by a FineTuneJob" in _refusal(lambda: core.create_namespaced_config_map(namespace, orphan))
    pod_runner = {**children["Job"], "metadata": {**children["Job"]["metadata"], "ownerReferences": []}}
    _refusal(lambda: batch.create_namespaced_job(namespace, pod_runner))
    binding = children["RoleBinding"]
    escalation = {**binding, "roleRef": {**binding["roleRef"], "kind": "ClusterRole", "name": "finetune-operator"}}
    assert "bind only a Role" in _refusal(lambda: rbac.create_namespaced_role_binding(namespace, escalation))
    trial = {**baseline("not-a-trial"), "metadata": {"name": "not-a-trial", "labels": config["metadata"]["labels"]}}
    trial["metadata"]["ownerReferences"] = config["metadata"]["ownerReferences"]  # a FineTuneJob, not a sweep
    assert "a trial: by a FineTuneSweep" in _refusal(
        lambda: client.CustomObjectsApi(as_operator).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, trial
        )
    )
    # Its real children pass, in order; so does deleting its own Job. Renamed: in a whole test session the
    # session's operator may already have made the job's own children (the policy reads no names).
    real = {kind: _renamed(child) for kind, child in children.items()}
    core.create_namespaced_config_map(namespace, real["ConfigMap"])
    core.create_namespaced_service_account(namespace, real["ServiceAccount"])
    rbac.create_namespaced_role(namespace, real["Role"])
    rbac.create_namespaced_role_binding(namespace, real["RoleBinding"])
    batch.create_namespaced_job(namespace, real["Job"])
    batch.delete_namespaced_job(real["Job"]["metadata"]["name"], namespace)


def _renamed(child: dict[str, Any]) -> dict[str, Any]:
    """``child`` under a name of its own (a RoleBinding's role renamed alike)."""
    renamed = {**child, "metadata": {**child["metadata"], "name": f"{child['metadata']['name']}-by-test"}}
    if child["kind"] == "RoleBinding":
        renamed["roleRef"] = {**child["roleRef"], "name": f"{child['roleRef']['name']}-by-test"}
    return renamed

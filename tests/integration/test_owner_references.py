"""Children carry ``blockOwnerDeletion: true``: with OwnerReferencesPermissionEnforcement (on in the local
control plane, as on OpenShift) creating them needs ``update`` on ``finetunejobs/finalizers``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster.kubeconfig import api_client, service_account_kubeconfig
from finetune_operator.api.job import GROUP, PLURAL, VERSION, FineTuneJob
from finetune_operator.generators.rbac import OPERATOR_RULES, cluster_role
from finetune_operator.reconcile.children import config_map
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import baseline

pytestmark = pytest.mark.integration


def _create_child_as(kubeconfig: Path, namespace: str, job: FineTuneJob) -> None:
    child = config_map(job)
    child["metadata"]["name"] += "-probe"  # not the operator's own child, should one run in this session
    with api_client(kubeconfig) as api:
        client.CoreV1Api(api).create_namespaced_config_map(namespace, child, dry_run="All")


def test_the_operators_rules_allow_blocking_owner_deletion(
    local_cluster: LocalCluster, crd: Any, namespace: str, tmp_path: Path
) -> None:
    suspended = baseline("owner")
    suspended["spec"]["suspend"] = True  # no trainer pod, should an operator run in this session
    with local_cluster.api_client() as api:
        created = client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            {**suspended, "metadata": {"name": "owner", "namespace": namespace}},
        )
    job = FineTuneJob.model_validate(created)

    without = cluster_role("finetune-operator-without-finalizers")
    without["rules"] = [rule for rule in OPERATOR_RULES if f"{PLURAL}/finalizers" not in rule["resources"]]
    stripped = service_account_kubeconfig(local_cluster.kubeconfig, without, "finetune-system", tmp_path / "old.yaml")
    with pytest.raises(client.ApiException) as refused:
        _create_child_as(stripped, namespace, job)
    assert refused.value.status == 403 and "blockOwnerDeletion" in refused.value.body, "the admission plugin is on"

    operator = service_account_kubeconfig(
        local_cluster.kubeconfig, cluster_role(), "finetune-system", tmp_path / "op.yaml"
    )
    _create_child_as(operator, namespace, job)

"""The rendered trainer Job on a real API server: its podFailurePolicy and scratch limits are valid as written,
and a job that sets no scratch size requests no ephemeral-storage once stored."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from finetune_operator.api.job import FineTuneJob
from finetune_operator.reconcile import Settings
from finetune_operator.reconcile.children import batch_job
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import baseline

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("resources", [{}, {"nodes": 2, "gpusPerNode": 2, "ephemeralStorage": "500Mi"}])
def test_the_api_server_accepts_the_trainer_job(
    local_cluster: LocalCluster, namespace: str, resources: dict[str, Any]
) -> None:
    manifest = baseline("accepted")
    manifest["metadata"].update({"namespace": namespace, "uid": "0d5e8a52-5c2e-4a4e-9a53-2f7f3b0c2d11"})
    manifest["spec"]["resources"] = resources
    job = batch_job(FineTuneJob.model_validate(manifest), Settings())
    job["metadata"]["ownerReferences"] = []  # no such owner: only the Job itself is under test
    with local_cluster.api_client() as api:
        created = client.BatchV1Api(api).create_namespaced_job(namespace, job, dry_run="All")
    rules = created.spec.pod_failure_policy.rules
    assert [rule.action for rule in rules] == ["FailJob", "Ignore", "Count", "Ignore"]
    container = created.spec.template.spec.containers[0]
    asked = "ephemeralStorage" in resources  # unset: no limit the API server would copy into a request
    limits, requests = container.resources.limits or {}, container.resources.requests or {}
    assert ("ephemeral-storage" in limits) == asked and ("ephemeral-storage" in requests) == asked

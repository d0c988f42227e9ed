"""The longest names a multi-node job can have, on the real API server and Job controller: its children
are accepted and its Indexed Job's pods are created (a 60-character name on 2 nodes once gave
hostnames of 65 characters, and the Job stalled on CreateFailed)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.utils import create_from_dict

from finetune_operator.api.job import MAX_NODES, FineTuneJob
from finetune_operator.reconcile import Settings, desired_children
from finetune_operator.reconcile.children import Names
from finetune_testsupport.pytest_plugin import LocalCluster
from tests.manifests import baseline

pytestmark = pytest.mark.integration


def _job(name: str, namespace: str, nodes: int) -> FineTuneJob:
    manifest = baseline(name)
    manifest["metadata"].update({"namespace": namespace, "uid": "uid-1"})
    manifest["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": 0}
    return FineTuneJob.model_validate(manifest)


def _unowned(child: dict[str, Any]) -> dict[str, Any]:
    """No owner (no FineTuneJob exists, so an operator in this session leaves them alone), and pods that
    are created but never scheduled: nothing runs, only names are checked."""
    child["metadata"].pop("ownerReferences")
    if child["kind"] == "Job":
        child["spec"]["template"]["spec"]["nodeSelector"] = {"finetune.dev/test": "no-such-node"}
    return child


def test_the_longest_multi_node_names_make_pods(local_cluster: LocalCluster, namespace: str) -> None:
    job = _job("a" * 60, namespace, nodes=2)
    names = Names.for_job(job)
    with local_cluster.api_client() as api:
        for child in desired_children(job, Settings()):
            create_from_dict(api, _unowned(child), namespace=namespace)
        core = client.CoreV1Api(api)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={names.job}").items
            if len(pods) == 2:
                break
            time.sleep(0.5)
        assert sorted(p.spec.hostname for p in pods) == [f"{names.job}-0", f"{names.job}-1"]

        # The largest index any node count allows, on the longest Job name: the pod the Job controller would make.
        worst = _job("b" * 253, namespace, nodes=MAX_NODES)
        worst_names = Names.for_job(worst)
        children = desired_children(worst, Settings())
        job_manifest = next(c for c in children if c["kind"] == "Job")
        template = job_manifest["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{worst_names.job}-{MAX_NODES - 1}-abcde",
                "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": worst_names.job},
            },
            "spec": {**template["spec"], "hostname": f"{worst_names.job}-{MAX_NODES - 1}"},
        }
        assert len(pod["spec"]["hostname"]) == 63, "the worst case is at the limit"
        for child in children:  # the Job would make 1024 pods: only tried
            create_from_dict(
                api, _unowned(child), namespace=namespace, dry_run="All" if child is job_manifest else None
            )
        core.create_namespaced_pod(namespace, pod, dry_run="All")

"""The resync's check of the watches' caches, against the real API server.

After a watch relist (410 Gone) kopf sends no DELETED for what vanished in the gap: a
FineTuneJob deleted then stayed a ghost with its metrics series, and a Job deleted then was
trusted forever. The resync now lists what exists and drops the rest (driven in-process here;
tests/e2e/test_hardening.py restarts the whole operator)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client
from prometheus_client import generate_latest

from finetune_localcluster.kubeconfig import service_account_kubeconfig
from finetune_operator.api.job import GROUP, PLURAL, VERSION, FineTuneJobStatus, Progress
from finetune_operator.controller.clients import Kube, login
from finetune_operator.controller.handlers import Reconciler
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.generators.rbac import cluster_role, split_by_scope
from finetune_operator.reconcile import Settings
from tests.manifests import baseline

if TYPE_CHECKING:
    from finetune_testsupport.pytest_plugin import LocalCluster

pytestmark = pytest.mark.usefixtures("crd")


async def _ghosts_are_dropped(namespace: str) -> tuple[set[tuple[str, str]], str]:
    kube = Kube(login)
    metrics = OperatorMetrics()
    reconciler = Reconciler(kube, Settings(), metrics)
    try:
        ghost = (namespace, "deleted-during-the-gap")
        reconciler.known.add(ghost)
        reconciler.saw_trainer_job(ghost, {"metadata": {"name": "x-trainer", "namespace": namespace}, "status": {}})
        metrics.observe_job(*ghost, FineTuneJobStatus(phase="Running", progress=Progress(percent=50.0)))
        missing = await reconciler.verify_caches()
        return missing | reconciler.known, generate_latest(metrics.registry).decode()
    finally:
        await kube.close()


def test_a_finetunejob_deleted_while_the_watch_relisted_leaves_no_ghost(
    local_cluster: LocalCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    remembered, exposition = asyncio.run(_ghosts_are_dropped(namespace))
    assert (namespace, "deleted-during-the-gap") not in remembered
    assert "deleted-during-the-gap" not in exposition, "its metrics series went with it"


async def _resync_under_namespaced_rbac(namespace: str, body: dict[str, Any]) -> set[tuple[str, str]]:
    kube = Kube(login)
    try:
        reconciler = Reconciler(kube, Settings(), OperatorMetrics(), namespaces=(namespace,))
        reconciler.saw(body)
        return await reconciler.verify_caches()
    finally:
        await kube.close()


def test_the_resync_works_with_the_charts_namespaced_rbac(
    local_cluster: LocalCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Namespaced mode grants Roles in the watched namespaces only: the resync listed every child kind across
    all namespaces, got 403 every round, and children deleted while the operator was down never came back.
    With a real ServiceAccount token bound as the chart binds it, the round now finds the job without
    children."""
    namespaced, cluster_wide = split_by_scope()
    role = {**cluster_role(f"finetune-operator-{namespace}"), "rules": cluster_wide}
    kubeconfig = service_account_kubeconfig(
        local_cluster.kubeconfig,
        role,
        "finetune-system",
        tmp_path / "kubeconfig.yaml",
        role_rules=namespaced,
        role_namespaces=(namespace,),
    )
    with local_cluster.api_client() as api:
        body = client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, baseline("no-children")
        )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert asyncio.run(_resync_under_namespaced_rbac(namespace, body)) == {(namespace, "no-children")}

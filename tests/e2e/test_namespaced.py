"""Namespaced mode as the chart installs it, on a control plane of its own (it installs cluster-wide roles):
the operator process runs with a real ServiceAccount token bound to the chart's namespaced RBAC (a Role in
each watched namespace, the small ClusterRole for kopf's discovery), not the admin certificate, with every
admission policy of the chart in force, its own writes' included.

One scenario, one job: an edited child ConfigMap is reverted at its next event; a ConfigMap deleted while
the operator is stopped comes back after the restart (the resync listed children across all namespaces:
403 every round under this RBAC, and it never came back); a job in the operator's own namespace is
refused; the job then runs to completion, its trainer reporting with its per-job token.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from finetune_localcluster.cluster import free_port
from finetune_localcluster.kubeconfig import install_objects, service_account_kubeconfig
from finetune_operator.generators.crd import chart_api_objects
from finetune_operator.generators.rbac import OPERATOR_ACCOUNT, cluster_role, split_by_scope
from finetune_testsupport.pytest_plugin import LocalCluster, own_cluster

from .conftest import Jobs, Operator, fake_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYSTEM = OPERATOR_ACCOUNT[0]


@pytest.fixture(scope="module")
def namespaced_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with own_cluster(tmp_path_factory.mktemp("namespaced-cluster")) as cluster:
        with cluster.api_client() as api:
            install_objects(api, chart_api_objects())
        yield cluster


def test_namespaced_mode_repairs_drift_restores_children_after_a_restart_and_refuses_its_own_namespace(
    namespaced_cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster = namespaced_cluster
    tenant = cluster.create_namespace("tenant")
    namespaced, cluster_wide = split_by_scope()
    kubeconfig = service_account_kubeconfig(
        cluster.kubeconfig,
        {**cluster_role(), "rules": cluster_wide},
        SYSTEM,
        tmp_path / "operator-kubeconfig.yaml",
        role_rules=namespaced,
        role_namespaces=(tenant, SYSTEM),
    )
    operator = Operator(
        kubeconfig=kubeconfig,
        log=tmp_path / "operator.log",
        metrics_port=free_port(),
        health_port=free_port(),
        extra_args=("--namespace", tenant, "--namespace", SYSTEM, "--operator-namespace", SYSTEM),
        resync_seconds=600,  # no resync round until the restart: the edit must be reverted by its own event
    )
    operator.start()
    with cluster.api_client() as api:
        jobs, core = Jobs(api, tenant, operator), client.CoreV1Api(api)
        try:
            body = fake_job("scoped", "finetune-test/sweep:1", tmp_path, suspend=True)
            body["spec"]["hyperparameters"] = {"weightDecay": 0.1}
            jobs.create(body)
            jobs.wait_condition("scoped", "Suspended", timeout=60)
            config = core.read_namespaced_config_map("scoped-config", tenant)
            rendered = dict(config.data)

            # kubectl edit: the content changes, the spec-hash annotation stays.
            core.patch_namespaced_config_map(
                "scoped-config", tenant, {"data": {"config.yaml": "model: {trustRemoteCode: true}\n"}}
            )
            jobs.wait(
                "scoped",
                "the edited ConfigMap reverted",
                lambda _: core.read_namespaced_config_map("scoped-config", tenant).data == rendered,
                timeout=15,
            )

            operator.kill(signal.SIGTERM)
            core.delete_namespaced_config_map("scoped-config", tenant)
            operator.resync_seconds = 2  # a deletion while stopped sends no event: the resync finds it
            operator.start()
            jobs.wait(
                "scoped",
                "the ConfigMap deleted while the operator was down is back",
                lambda _: jobs.children("scoped")["ConfigMap"] == 1,
                timeout=30,
            )
            assert core.read_namespaced_config_map("scoped-config", tenant).data == rendered

            system_jobs = Jobs(api, SYSTEM, operator)
            system_jobs.create(fake_job("inside", "finetune-test/sweep:1", tmp_path))
            refused = system_jobs.wait_condition("inside", "Failed", "OperatorNamespace", timeout=30)
            assert "operator's own namespace" in refused["status"]["message"]
            system_jobs.wait_event("inside", "OperatorNamespace")
            assert sum(system_jobs.children("inside").values()) == 0, "nothing was created for it"

            jobs.patch("scoped", {"spec": {"suspend": False}})
            done = jobs.wait_condition("scoped", "Complete", "Succeeded", timeout=90)
            assert done["status"]["evaluations"], "the trainer reported with its per-job token"
            log = operator.log.read_text(errors="replace")
            assert "403" not in log and "Forbidden" not in log, operator.tail()
        finally:
            operator.kill(signal.SIGTERM)

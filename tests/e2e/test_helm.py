"""As users install it: the chart, with the real helm, on a control plane of its own.

The operator image is built from the Dockerfile (``make images``, cached by content hash) and runs
as the chart's Deployment in a podman container, with the chart's ServiceAccount, ClusterRole and
securityContext (non-root, read-only root filesystem), logging in the way it does in a cluster
(kopf's in-cluster login: ``kubernetes.default.svc:443`` and the service-account token). Its
readiness probe decides when it is Ready. The trainer is a scripted one (process mode).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster import images, mountns
from finetune_localcluster.cluster import free_port
from finetune_localcluster.helm import ensure_helm
from finetune_localcluster.pytest_plugin import LocalCluster, own_cluster
from finetune_operator.api import GROUP, PLURAL, VERSION

from .conftest import Jobs, Operator, fake_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not mountns.available(), reason="in-cluster login needs mount namespaces (root, unshare)"),
]

CHART = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"
RELEASE, SYSTEM = "finetune", "finetune-system"


class Helm:
    def __init__(self, cluster: LocalCluster) -> None:
        self.binary = ensure_helm()
        self.cluster = cluster

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.cluster.kubeconfig}", "-n", SYSTEM, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if proc.returncode != 0:
            pods = self.cluster.kubectl("-n", SYSTEM, "describe", "pods", check=False).stdout
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}\n{pods}")
        return proc.stdout


@pytest.fixture(scope="module")
def helm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Cluster-wide objects (CRD, ClusterRoles) of a release must never meet the other tests' operator."""
    with own_cluster(tmp_path_factory.mktemp("helm-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def operator_image() -> str:
    start = time.monotonic()
    (image,) = images.build_images(("operator",))
    print(f"operator image {image.ref}: {image.size_bytes / 1e6:.0f} MB, ready in {time.monotonic() - start:.1f} s")
    return image.ref


def _operator_pods(api: client.ApiClient) -> list[Any]:
    pods = client.CoreV1Api(api).list_namespaced_pod(SYSTEM, label_selector="app.kubernetes.io/name=finetune-operator")
    return [p for p in pods.items if not p.metadata.deletion_timestamp]


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_helm_install_upgrade_uninstall_with_a_job_running_through_it(
    helm_cluster: LocalCluster, operator_image: str, tmp_path: Path
) -> None:
    helm = Helm(helm_cluster)
    repository, tag = operator_image.rsplit(":", 1)
    values = [
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never", "--set", "trainerImage=finetune-test/paced:1",
        "--set", f"metrics.port={free_port()}", "--set", f"healthPort={free_port()}",
        "--set", "resyncSeconds=2", "--set", "logFormat=plain",
    ]  # fmt: skip
    start = time.monotonic()
    helm("install", RELEASE, str(CHART), "--create-namespace", "--wait", "--timeout=3m", *values)
    print(f"helm install -> operator Ready: {time.monotonic() - start:.1f} s")
    with helm_cluster.api_client() as api:
        (pod,) = _operator_pods(api)
        assert _ready(pod) and pod.spec.service_account_name == "finetune-operator"
        assert pod.status.container_statuses[0].image == operator_image
        running = subprocess.run(
            ["podman", "ps", "--format", "{{.Image}} {{.Names}}"],
            env=images.podman_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"{operator_image} ftl-{pod.metadata.uid[:13]}-operator" in running, running
        first_uid = pod.metadata.uid

        namespace = helm_cluster.create_namespace("helm")
        jobs = Jobs(api, namespace, Operator(Path("/dev/null"), tmp_path / "none.log", 0, 0))
        manifest = fake_job("shipped", "unused", tmp_path)
        del manifest["spec"]["resources"]["image"]  # the chart's trainerImage is the default
        jobs.create(manifest)
        jobs.wait("shipped", "progress", lambda j: ((j.get("status") or {}).get("progress") or {}).get("step", 0) >= 1)

        # A changed value rolls the operator; the job it was watching carries on.
        helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "resyncSeconds=3", "--wait", "--timeout=3m")
        (pod,) = _operator_pods(api)
        assert pod.metadata.uid != first_uid and _ready(pod)
        assert "--resync-seconds=3" in pod.spec.containers[0].args
        done = jobs.wait_condition("shipped", "Complete", timeout=120)
        status = done["status"]
        assert status["progress"]["step"] == status["progress"]["totalSteps"] == 30
        assert status["best"]["step"] == 30 and status["best"]["value"] == pytest.approx(0.8)

        helm("uninstall", RELEASE, "--wait", "--timeout=2m")
        assert not _operator_pods(api)
        assert not client.AppsV1Api(api).list_namespaced_deployment(SYSTEM).items
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
        kept = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "shipped")
        assert json.dumps(kept["status"]["best"]) == json.dumps(status["best"])

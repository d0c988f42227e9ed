"""Controllers and admission on the real control plane: Jobs, GC, Pod Security, RBAC."""

from __future__ import annotations

import json
import subprocess
import textwrap
from typing import Any

import pytest
from kubernetes import client

from finetune_testsupport.pytest_plugin import LocalCluster

from .conftest import Kube, pod, pvc, wait_for

pytestmark = pytest.mark.integration


def job(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    template = pod(name, command)
    template.pop("apiVersion")
    template.pop("kind")
    template["metadata"] = {}
    spec.setdefault("backoffLimit", 0)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": template, **spec},
    }


def job_pods(kube: Kube, name: str) -> list[dict[str, Any]]:
    lst = kube.core.list_namespaced_pod(kube.ns, label_selector=f"batch.kubernetes.io/job-name={name}")
    return [dict(kube.api.sanitize_for_serialization(p)) for p in lst.items]


def test_server_version_is_the_built_one(local_cluster: LocalCluster) -> None:
    out = local_cluster.kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.36.' in out.split('"serverVersion"')[1]


def test_job_backoff_limit_retries_then_fails(kube: Kube) -> None:
    kube.apply(job("flaky", ["sh", "-c", "exit 2"], backoffLimit=1))
    j = kube.job_condition("flaky", "Failed")
    cond = next(c for c in j["status"]["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert j["status"]["failed"] == 2  # the first try plus one retry
    codes = [p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in job_pods(kube, "flaky")]
    assert codes == [2, 2]


def test_indexed_job_runs_every_index(kube: Kube) -> None:
    manifest = job(
        "indexed",
        ["sh", "-c", "echo index=$JOB_COMPLETION_INDEX > /out/$JOB_COMPLETION_INDEX.txt"],
        completions=2,
        parallelism=2,
        completionMode="Indexed",
    )
    tpl = manifest["spec"]["template"]["spec"]
    tpl["containers"][0]["volumeMounts"] = [{"name": "o", "mountPath": "/out"}]
    tpl["volumes"] = [{"name": "o", "persistentVolumeClaim": {"claimName": "indexed-out"}}]
    kube.apply(pvc("indexed-out"), manifest)
    j = kube.job_condition("indexed", "Complete")
    assert j["status"]["succeeded"] == 2
    assert j["status"]["completedIndexes"] == "0,1"
    out = kube.cluster.state_dir / "volumes" / kube.ns / "indexed-out"
    assert (out / "0.txt").read_text() == "index=0\n"
    assert (out / "1.txt").read_text() == "index=1\n"


def test_deleting_owner_cascades_to_children(kube: Kube) -> None:
    owner = kube.core.create_namespaced_config_map(
        kube.ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"k": "v"})
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    child = pod("child", ["sleep", "300"], terminationGracePeriodSeconds=1)
    child["metadata"]["ownerReferences"] = [ref]
    kube.apply(child, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dep", "ownerReferences": [ref]}})
    kube.pod_phase("child", "Running")
    kube.core.delete_namespaced_config_map("owner", kube.ns, propagation_policy="Background")
    kube.gone("child")

    def dep_gone() -> bool:
        return not [c for c in kube.core.list_namespaced_config_map(kube.ns).items if c.metadata.name == "dep"]

    wait_for("the garbage collector to delete the dependent ConfigMap", dep_gone)


def test_restricted_namespace_rejects_privileged_pod(local_cluster: LocalCluster) -> None:
    ns = local_cluster.create_namespace("psa", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    bad = pod("priv", ["true"], container={"securityContext": {"privileged": True}})
    with pytest.raises(subprocess.CalledProcessError) as e:
        local_cluster.kubectl("-n", ns, "create", "-f", "-", input=json.dumps(bad))
    assert "violates PodSecurity" in e.value.stderr
    assert "restricted:latest" in e.value.stderr
    assert "privileged" in e.value.stderr


def test_in_cluster_client_is_bound_by_rbac(kube: Kube) -> None:
    kube.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "cm-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader-cm"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader"}],
        },
    )
    script = textwrap.dedent(
        """
        import sys
        from kubernetes import client
        from finetune_localcluster import incluster
        incluster.load_config()
        ns = incluster.namespace()
        v1 = client.CoreV1Api()
        names = [c.metadata.name for c in v1.list_namespaced_config_map(ns).items]
        print("configmaps:", ",".join(sorted(names)))
        try:
            v1.list_namespaced_secret(ns)
            print("secrets: allowed")
        except client.ApiException as e:
            print("secrets:", e.status)
        print("token-file:", open(sys.argv[1]).read()[:3])
        """
    )
    kube.apply(
        pod(
            "incluster",
            ["python", "-c", script, "/var/run/secrets/kubernetes.io/serviceaccount/token"],
            serviceAccountName="reader",
        )
    )
    p = kube.pod_phase("incluster", "Succeeded", "Failed")
    out = kube.logs("incluster")
    assert p["status"]["phase"] == "Succeeded", out
    assert "configmaps: kube-root-ca.crt" in out
    assert "secrets: 403" in out
    assert "token-file: eyJ" in out  # a JWT, read through the mount path (mounted or rewritten)

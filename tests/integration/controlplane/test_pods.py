"""Pods on the local node: scheduling, exit codes, env, volumes, restarts, deadlines, deletion."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from finetune_localcluster import mountns, node, podspec, procs

from .conftest import Kube, pod, pvc, wait_for

pytestmark = pytest.mark.integration


def test_gpu_pod_is_scheduled_and_succeeds(kube: Kube) -> None:
    kube.apply(
        pod(
            "gpu",
            ["sh", "-c", "echo hello from $(POD_NAME) on $(NODE)"],
            container={
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                ],
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            },
        )
    )
    p = kube.pod_phase("gpu", "Succeeded", "Failed")
    assert p["status"]["phase"] == "Succeeded"
    assert p["spec"]["nodeName"] == "local-node"
    conds = {c["type"]: c["status"] for c in p["status"]["conditions"]}
    assert conds["PodScheduled"] == "True"
    assert conds["Initialized"] == "True"
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")
    assert p["status"]["podIP"] == podspec.pod_ip(p) != "127.0.0.1", "each pod has its own loopback IP"
    assert p["status"]["hostIP"] == "127.0.0.1"
    assert "hello from gpu on local-node" in kube.logs("gpu")


def test_gpu_request_beyond_capacity_stays_pending(kube: Kube) -> None:
    kube.apply(pod("greedy", ["true"], container={"resources": {"limits": {"nvidia.com/gpu": "64"}}}))

    def unschedulable() -> bool:
        conds = kube.pod("greedy")["status"].get("conditions") or []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    wait_for("the scheduler to report Unschedulable", unschedulable)
    assert "nvidia.com/gpu" in str(kube.pod("greedy")["status"]["conditions"])


def test_failing_pod_reports_exit_code(kube: Kube) -> None:
    kube.apply(pod("fails", ["sh", "-c", "echo boom >&2; exit 3"]))
    p = kube.pod_phase("fails", "Succeeded", "Failed")
    assert p["status"]["phase"] == "Failed"
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert "boom" in kube.logs("fails")


def test_env_volumes_init_containers_and_path_rewriting(kube: Kube) -> None:
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg"},
            "data": {"mode": "fast", "x.yaml": "a: 1"},
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"password": "s3cret"}},
    )
    script = textwrap.dedent(
        """
        set -e
        echo "cwd=$(pwd)"
        echo "mode=$MODE pw=$PASSWORD ns=$NS cfg_mode=$CFG_mode greeting=$GREETING mem=$MEM_MI"
        echo "file=$(cat /etc/cfg/x.yaml) secret=$(cat /etc/sec/password) label=$(cat /etc/info/app)"
        echo "init=$(cat /scratch/order)"
        echo "sa=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
        """
    )
    manifest = pod(
        "env",
        ["sh", "-c", script],
        container={
            "workingDir": "/scratch",
            "env": [
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "GREETING", "value": "hi-$(MODE)-$$(MODE)"},
                {
                    "name": "MEM_MI",
                    "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}},
                },
            ],
            "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "cfg"}}],
            "resources": {"requests": {"memory": "64Mi"}},
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/etc/cfg"},
                {"name": "sec", "mountPath": "/etc/sec"},
                {"name": "info", "mountPath": "/etc/info"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        initContainers=[
            {
                "name": f"init{i}",
                "image": "busybox",
                "command": ["sh", "-c", f"echo -n {i} >> /scratch/order"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }
            for i in (1, 2)
        ],
        volumes=[
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "sec"}},
            {
                "name": "info",
                "downwardAPI": {"items": [{"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}}]},
            },
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    manifest["metadata"]["labels"] = {"app": "demo"}
    kube.apply(manifest)
    p = kube.pod_phase("env", "Succeeded", "Failed")
    out = kube.logs("env")
    assert p["status"]["phase"] == "Succeeded", out
    assert f"mode=fast pw=s3cret ns={kube.ns} cfg_mode=fast greeting=hi-fast-$(MODE) mem=64" in out
    assert "file=a: 1 secret=s3cret label=demo" in out
    assert "init=12" in out
    assert f"sa={kube.ns}" in out
    if node.USE_MOUNT_NAMESPACES:  # the volume is mounted at /scratch itself
        assert "cwd=/scratch" in out
    else:  # /scratch was rewritten to a host dir
        assert "cwd=" + str(kube.cluster.state_dir / "pods") in out
    inits = p["status"]["initContainerStatuses"]
    assert [s["state"]["terminated"]["exitCode"] for s in inits] == [0, 0]


def test_on_failure_restarts_until_success(kube: Kube) -> None:
    cmd = "if [ -f /data/once ]; then echo second; else touch /data/once; echo first; exit 1; fi"
    kube.apply(
        pod(
            "retry",
            ["sh", "-c", cmd],
            restartPolicy="OnFailure",
            container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            volumes=[{"name": "data", "emptyDir": {}}],
        )
    )
    p = kube.pod_phase("retry", "Succeeded", "Failed")
    cs = p["status"]["containerStatuses"][0]
    assert p["status"]["phase"] == "Succeeded"
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert kube.logs("retry").split() == ["first", "second"]


def test_active_deadline_fails_pod(kube: Kube) -> None:
    kube.apply(pod("slow", ["sleep", "300"], activeDeadlineSeconds=2))
    p = kube.pod_phase("slow", "Succeeded", "Failed")
    assert p["status"]["phase"] == "Failed"
    assert p["status"]["reason"] == "DeadlineExceeded"


def test_delete_sends_sigterm_then_removes_pod(kube: Kube) -> None:
    script = "trap 'echo got TERM; exit 0' TERM; echo started; while true; do sleep 0.1; done"
    kube.apply(pod("victim", ["sh", "-c", script], terminationGracePeriodSeconds=5))
    p = kube.pod_phase("victim", "Running")
    wait_for("the container to start", lambda: "started" in kube.logs("victim"))
    pid = int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
    assert procs.alive(pid)
    log_dir = kube.cluster.state_dir / "pods" / f"{kube.ns}_victim_{p['metadata']['uid']}"
    kube.cluster.kubectl("-n", kube.ns, "delete", "pod", "victim", "--wait=false")
    kube.gone("victim")
    assert not procs.alive(pid)
    assert "got TERM" in (log_dir / "main.log").read_text()


def test_sigkill_after_grace_period(kube: Kube) -> None:
    script = "trap 'echo ignoring TERM' TERM; echo started; while true; do sleep 0.1; done"
    kube.apply(pod("stubborn", ["sh", "-c", script], terminationGracePeriodSeconds=1))
    p = kube.pod_phase("stubborn", "Running")
    wait_for("the container to start", lambda: "started" in kube.logs("stubborn"))
    pid = int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
    kube.cluster.kubectl("-n", kube.ns, "delete", "pod", "stubborn", "--wait=false")
    kube.gone("stubborn")
    assert not procs.alive(pid)
    assert os.path.exists(kube.cluster.state_dir / "pods")


def test_pvc_is_bound_and_maps_to_host_dir(kube: Kube) -> None:
    kube.apply(
        pvc("results"),
        pod(
            "writer",
            ["sh", "-c", "echo persisted > /data/out.txt"],
            container={"volumeMounts": [{"name": "d", "mountPath": "/data"}]},
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "results"}}],
        ),
    )
    assert kube.pod_phase("writer", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    host = kube.cluster.state_dir / "volumes" / kube.ns / "results" / "out.txt"
    assert host.read_text() == "persisted\n"
    claim = kube.core.read_namespaced_persistent_volume_claim("results", kube.ns)
    assert claim.status.phase == "Bound"
    assert claim.spec.storage_class_name == "local"


def test_kubectl_logs_reads_the_container_log(kube: Kube) -> None:
    kube.apply(pod("talker", ["sh", "-c", "echo one; echo two; echo three"]))
    kube.pod_phase("talker", "Succeeded", "Failed")
    out = kube.cluster.kubectl("-n", kube.ns, "logs", "talker").stdout
    assert out.split() == ["one", "two", "three"]
    assert kube.cluster.kubectl("-n", kube.ns, "logs", "talker", "--tail=1").stdout == "three\n"


@pytest.mark.skipif(not mountns.available(), reason="needs root and util-linux unshare for mount namespaces")
def test_volumes_appear_at_their_real_paths_for_fixed_path_programs(kube: Kube) -> None:
    # Paths the program builds itself are never rewritten: they must exist as mounted. The
    # standard in-cluster loader (fixed /var/run/secrets path, no FINETUNE_SA_DIR) must work.
    script = textwrap.dedent(
        """
        import os
        from kubernetes import client, config
        os.environ.pop("FINETUNE_SA_DIR", None)
        print(open("/mnt/" + "claims/results/seed.txt").read().strip())
        config.load_incluster_config()
        namespace = open("/var/run/secrets/kubernetes.io/" + "serviceaccount/namespace").read()
        print("namespace", namespace == os.environ["POD_NAMESPACE"])
        try:
            open("/var/run/secrets/kubernetes.io/" + "serviceaccount/extra", "w")
        except OSError as error:
            print("read-only", error.errno == 30)
        """
    )
    claim_dir = kube.cluster.state_dir / "volumes" / kube.ns / "results"
    claim_dir.mkdir(parents=True, exist_ok=True)
    (claim_dir / "seed.txt").write_text("from the claim\n")
    kube.apply(
        pvc("results"),
        pod(
            "fixed-paths",
            ["python3", "-c", script],
            container={
                "volumeMounts": [{"name": "d", "mountPath": "/mnt/claims/results"}],
                "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
            },
            volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "results"}}],
        ),
    )
    assert kube.pod_phase("fixed-paths", "Succeeded", "Failed")["status"]["phase"] == "Succeeded", kube.logs(
        "fixed-paths"
    )
    assert kube.logs("fixed-paths").split("\n")[:3] == ["from the claim", "namespace True", "read-only True"]


@pytest.mark.skipif(not mountns.available(), reason="needs root and util-linux unshare for mount namespaces")
def test_in_cluster_clients_reach_the_api_server_as_kubernetes_default_svc(kube: Kube) -> None:
    # kopf's own in-cluster login knows only https://kubernetes.default.svc (port 443) and the
    # service-account CA: no KUBERNETES_SERVICE_HOST. That must work as it does in a cluster.
    script = textwrap.dedent(
        """
        import json, ssl, urllib.request
        sa = "/var/run/secrets/kubernetes.io/" + "serviceaccount"
        ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
        req = urllib.request.Request("https://kubernetes.default.svc/version")
        req.add_header("Authorization", "Bearer " + open(sa + "/token").read())
        print("version", json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["gitVersion"])
        """
    )
    kube.apply(pod("incluster", [sys.executable, "-c", script]))
    p = kube.pod_phase("incluster", "Succeeded", "Failed")
    assert p["status"]["phase"] == "Succeeded", kube.logs("incluster")
    assert "version v1." in kube.logs("incluster")

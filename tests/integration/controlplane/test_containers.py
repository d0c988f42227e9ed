"""Pods whose image is in the local image store run as real podman containers on the local node."""

from __future__ import annotations

import shutil
import textwrap
from datetime import timedelta

import obstore
import pytest
from obstore.store import S3Store

from finetune_devtools import images
from finetune_devtools.mlflow_server import MlflowServer
from finetune_devtools.seaweedfs import S3Endpoint
from finetune_localcluster import mountns

from .conftest import Kube, pod, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mountns.available(), reason="containers on the local node need root"),
]


@pytest.fixture(scope="module")
def image() -> str:
    """A plain Debian image with python3 in the local store (the offline base `make images` uses)."""
    if not shutil.which("podman"):
        pytest.fail("podman is not installed: run `dev/install-system-deps.sh containers`")
    return images.base_image()


SCRIPT = textwrap.dedent(
    """
    import json, os, ssl, urllib.request
    print("uid", os.getuid(), "gid", os.getgid())
    try:
        open("/rootfs-write", "w")
    except OSError as error:
        print("rootfs read-only", error.errno == 30)
    open("/scratch/ok", "w").write("x")
    print("scratch writable")
    print("cfg", open("/etc/cfg/mode").read(), "env", os.environ["MODE"], os.environ["POD"], os.environ["PASSWORD"])
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
    print("capeff", status["CapEff"].strip(), "nonewprivs", status["NoNewPrivs"].strip())
    sa = "/var/run/secrets/kubernetes.io/" + "serviceaccount"
    req = urllib.request.Request("https://kubernetes.default.svc/version")
    req.add_header("Authorization", "Bearer " + open(sa + "/token").read())
    ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
    print("api", json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["gitVersion"][:3])
    experiments = os.environ["MLFLOW"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    mlflow = urllib.request.urlopen(experiments, timeout=10)
    print("mlflow", mlflow.status, "experiments" in json.load(mlflow))
    print("s3", urllib.request.urlopen(os.environ["S3_SIGNED_GET"], timeout=10).read().decode())
    print("venv-free", "VIRTUAL_ENV" not in os.environ)
    raise SystemExit(3)
    """
)


def signed_get(server: S3Endpoint, bucket: str, body: bytes) -> str:
    """A presigned GET of an object holding ``body``, uploaded with the keys ``make s3-up`` prints."""
    printed = dict(line.split("=", 1) for line in server.shell().splitlines())
    store = S3Store(
        bucket,  # SeaweedFS creates the bucket on an admin's first upload
        endpoint=printed["S3_ENDPOINT"],
        access_key_id=printed["AWS_ACCESS_KEY_ID"],
        secret_access_key=printed["AWS_SECRET_ACCESS_KEY"],
        region=server.region,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    obstore.put(store, "probe", body)
    return obstore.sign(store, "GET", "probe", timedelta(minutes=5))


def test_container_honours_security_context_volumes_env_network_and_exit_code(
    kube: Kube, image: str, s3_server: S3Endpoint, mlflow_server: MlflowServer
) -> None:
    """Besides the pod's spec: the loopback URIs ``make s3-up`` and ``make mlflow-up`` print serve containers
    too (host network), not only host processes: the MLflow REST API, an S3 GET signed with the printed keys."""
    kube.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"mode": "fast"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"pw": "s3cret"}},
        pod(
            "boxed",
            ["python3", "-c", SCRIPT],
            securityContext={"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532},
            container={
                "image": image,
                "securityContext": {
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "env": [
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}},
                    {"name": "MLFLOW", "value": mlflow_server.uri},
                    {"name": "S3_SIGNED_GET", "value": signed_get(s3_server, kube.ns, b"reached")},
                ],
                "volumeMounts": [
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                ],
            },
            volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}}],
        ),
    )
    p = kube.pod_phase("boxed", "Succeeded", "Failed", timeout=120)
    out = kube.logs("boxed")
    assert p["status"]["phase"] == "Failed", out
    assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3, out
    assert "uid 65532 gid 65532" in out
    assert "rootfs read-only True" in out
    assert "scratch writable" in out
    assert "cfg fast env fast boxed s3cret" in out
    assert "capeff 0000000000000000 nonewprivs 1" in out
    assert "api v1." in out
    assert "mlflow 200 True" in out
    assert "s3 reached" in out
    assert "venv-free True" in out, "the host's environment leaked into the container"


def test_run_as_non_root_refuses_an_image_that_runs_as_root(kube: Kube, image: str) -> None:
    kube.apply(pod("rooted", ["true"], securityContext={"runAsNonRoot": True}, container={"image": image}))

    def refused() -> str | None:
        cs = (kube.pod("rooted")["status"].get("containerStatuses") or [{}])[0]
        waiting = (cs.get("state") or {}).get("waiting") or {}
        return waiting.get("message") if waiting.get("reason") == "CreateContainerConfigError" else None

    assert "runAsNonRoot and image will run as root" in wait_for("the refusal", refused, 60)


def test_delete_sends_sigterm_into_the_container(kube: Kube, image: str) -> None:
    script = textwrap.dedent(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("got TERM", flush=True), sys.exit(0)))
        print("started", flush=True)
        while True:
            time.sleep(0.1)
        """
    )
    kube.apply(pod("victim", ["python3", "-c", script], terminationGracePeriodSeconds=10, container={"image": image}))
    kube.pod_phase("victim", "Running", timeout=120)
    wait_for("the container to start", lambda: "started" in kube.logs("victim"), 60)
    log = kube.cluster.state_dir / "pods" / f"{kube.ns}_victim_{kube.pod('victim')['metadata']['uid']}" / "main.log"
    kube.cluster.kubectl("-n", kube.ns, "delete", "pod", "victim", "--wait=false")
    kube.gone("victim")
    assert "got TERM" in log.read_text()

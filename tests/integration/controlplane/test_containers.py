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
    print("venv-free", "VIRTUAL_ENV" not in os.environ)
    raise SystemExit(3)
    """
)


def test_container_honours_security_context_volumes_env_and_exit_code(kube: Kube, image: str) -> None:
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


REACH = textwrap.dedent(
    """
    import json, sys, urllib.request
    mlflow, signed = sys.argv[1:]
    answer = urllib.request.urlopen(mlflow + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    print("mlflow", answer.status, "experiments" in json.load(answer))
    print("s3", urllib.request.urlopen(signed, timeout=10).read().decode())
    """
)


def test_a_container_reaches_the_s3_and_mlflow_servers_at_the_uris_they_print(
    kube: Kube, image: str, s3_server: S3Endpoint, mlflow_server: MlflowServer
) -> None:
    """The loopback URIs ``make s3-up`` and ``make mlflow-up`` print serve pods of the podman runtime too (host
    network), not only host processes: the MLflow REST API, and an S3 GET signed with the printed keys."""
    printed = dict(line.split("=", 1) for line in s3_server.shell().splitlines())
    store = S3Store(
        kube.ns,  # SeaweedFS creates the bucket on an admin's first upload
        endpoint=printed["S3_ENDPOINT"],
        access_key_id=printed["AWS_ACCESS_KEY_ID"],
        secret_access_key=printed["AWS_SECRET_ACCESS_KEY"],
        region=s3_server.region,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    obstore.put(store, "probe", b"reached")
    signed = obstore.sign(store, "GET", "probe", timedelta(minutes=5))
    kube.apply(
        pod(
            "reach",
            ["python3", "-c", REACH, mlflow_server.uri, signed],
            securityContext={"runAsNonRoot": True, "runAsUser": 65532},
            container={"image": image, "securityContext": {"capabilities": {"drop": ["ALL"]}}},
        )
    )
    p = kube.pod_phase("reach", "Succeeded", "Failed", timeout=120)
    out = kube.logs("reach")
    assert p["status"]["phase"] == "Succeeded", out
    assert "mlflow 200 True" in out
    assert "s3 reached" in out

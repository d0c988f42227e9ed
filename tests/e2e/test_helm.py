"""As users install it: the chart, with the real helm, on a control plane of its own.

Both images are built from the Dockerfile (``make images``, cached by content hash: a cache hit when
nothing changed). The operator runs as the chart's Deployment in a podman container, with the chart's
ServiceAccount, ClusterRole and securityContext (non-root, read-only root filesystem), logging in the
way it does in a cluster (kopf's in-cluster login: ``kubernetes.default.svc:443`` and the
service-account token). Its readiness probe decides when it is Ready. The demo's MiniLM job, shrunk to
a few hundred reviews, trains inside the trainer image (the chart's ``trainerImage``) from volumes,
read-only, as non-root, with no model hub; a scripted trainer (process mode), paced to outlast it,
is the job that runs through ``helm upgrade``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_assets import minilm_dir, rotten_tomatoes
from finetune_devtools import images
from finetune_devtools.helm import ensure_helm
from finetune_localcluster import containers, mountns
from finetune_localcluster.cluster import NODE_NAME, free_port
from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_testsupport.pytest_plugin import LocalCluster, own_cluster

from .conftest import Jobs, Operator, claims, fake_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not mountns.available(), reason="in-cluster login needs mount namespaces (root, unshare)"),
]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
DEMO_JOB = ROOT / "examples" / "minilm-rotten-tomatoes.yaml"
N_TRAIN, N_VAL, EPOCHS, BATCH = 192, 64, 2, 16
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
def built_images() -> dict[str, str]:
    """The operator and trainer images through ``make images``' own cached path (a cold machine builds
    the trainer's dependency layer once); their references by target."""
    start = time.monotonic()
    built = images.build_images(("operator", "trainer"))
    for image in built:
        how = f"built in {image.seconds:.0f} s" if image.built else "up to date"
        print(f"{image.ref}: {image.size_bytes / 1e6:,.0f} MB ({how})")
    print(f"images ready in {time.monotonic() - start:.1f} s")
    return {image.target: image.ref for image in built}


def minilm_job(name: str, volumes: Path) -> dict[str, Any]:
    """The demo's job (examples/minilm-rotten-tomatoes.yaml: real MiniLM-L6 weights, Rotten Tomatoes
    reviews, all from volumes) shrunk to fit ``make test``: a few hundred reviews, two epochs."""
    shutil.copytree(minilm_dir(), volumes / "models" / "all-MiniLM-L6-v2", ignore=shutil.ignore_patterns(".complete"))
    train, validation = rotten_tomatoes(N_TRAIN, N_VAL, seed=0)
    data = volumes / "datasets" / "rotten-tomatoes"
    data.mkdir(parents=True)
    shutil.copy(train, data / "train.jsonl")
    shutil.copy(validation, data / "validation.jsonl")
    manifest: dict[str, Any] = yaml.safe_load(DEMO_JOB.read_text())
    manifest["metadata"] = {"name": name}
    spec = manifest["spec"]
    assert "image" not in spec["resources"], "the chart's trainerImage is the default"
    spec["hyperparameters"].update(epochs=EPOCHS, batchSize=BATCH)
    spec["evaluation"].update(strategy="epoch")
    spec["evaluation"].pop("interval")
    spec["output"]["location"] = f"pvc://outputs/{name}"
    spec["resources"].update(cpu=1, memory="2Gi")  # with the operator's request, fits a 2-core node
    return manifest


def scrape_config(pod_monitor: dict[str, Any], api: client.ApiClient) -> dict[str, Any]:
    """What the Prometheus Operator makes of a PodMonitor (its selector and port name), resolved
    here against the API (Debian's Prometheus has no Kubernetes discovery): a wrong selector or port
    name in the chart finds no target."""
    spec = pod_monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    selector = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
    assert spec["namespaceSelector"] == {"any": True}
    targets = []
    for pod in client.CoreV1Api(api).list_pod_for_all_namespaces(label_selector=selector).items:
        for container in pod.spec.containers:
            for port in container.ports or []:
                if port.name == endpoint["port"] and pod.status.pod_ip:
                    labels = {"finetune_job": pod.metadata.labels.get("finetune.dev/job", "")}
                    targets.append({"targets": [f"{pod.status.pod_ip}:{port.container_port}"], "labels": labels})
    return {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": pod_monitor["metadata"]["name"],
                "metrics_path": endpoint.get("path", "/metrics"),
                "static_configs": targets,
            }
        ],
    }


@contextlib.contextmanager
def prometheus(config: dict[str, Any], directory: Path) -> Iterator[int]:
    """Debian's Prometheus (make system-deps) with ``config``; yields its port."""
    port = free_port()
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (directory / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(port: int, expression: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
            return result
    except OSError:
        return []


def _operator_pods(api: client.ApiClient) -> list[Any]:
    pods = client.CoreV1Api(api).list_namespaced_pod(SYSTEM, label_selector="app.kubernetes.io/name=finetune-operator")
    return [p for p in pods.items if not p.metadata.deletion_timestamp]


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _podman(*args: str) -> str:
    return subprocess.run(["podman", *args], env=images.podman_env(), capture_output=True, text=True, check=True).stdout


def _container_name(pod: Any) -> str:
    """The podman container the local node runs the pod's (first) container in."""
    status = pod.status.container_statuses[0]
    return f"ftl-{pod.metadata.uid[:13]}-{status.name}-{status.restart_count}"


def _trainer_pods_running(api: client.ApiClient, namespace: str, job: str) -> bool:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"finetune.dev/job={job}").items
    return any(p.status.phase == "Running" and p.status.pod_ip for p in pods)


def _trainer_pod(api: client.ApiClient, namespace: str, job: str) -> Any:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"finetune.dev/job={job}").items
    (pod,) = [p for p in pods if p.status.phase == "Running"]
    return pod


def _scraped(port: int, expression: str, tmp_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not _query(port, expression):
        if time.monotonic() > deadline:
            config = (tmp_path / "prometheus.yml").read_text()
            log = (tmp_path / "prometheus.log").read_text()[-2000:]
            raise AssertionError(f"Prometheus never scraped {expression} via the PodMonitor:\n{config}\n{log}")
        time.sleep(0.5)


def test_helm_install_upgrade_uninstall_with_jobs_running_through_it(
    helm_cluster: LocalCluster, built_images: dict[str, str], tmp_path: Path
) -> None:
    helm = Helm(helm_cluster)
    operator_image, trainer_image = built_images["operator"], built_images["trainer"]
    repository, tag = operator_image.rsplit(":", 1)
    values = [
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never", "--set", f"trainerImage={trainer_image}",
        "--set", f"metrics.port={free_port()}", "--set", f"healthPort={free_port()}",
        "--set", "resyncSeconds=2", "--set", "logFormat=plain", "--set", f"trainerMetricsPort={free_port()}",
    ]  # fmt: skip
    rendered = helm("template", RELEASE, str(CHART), *values, "--set", "metrics.podMonitor.enabled=true")
    (pod_monitor,) = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "PodMonitor"]
    start = time.monotonic()
    helm("install", RELEASE, str(CHART), "--create-namespace", "--wait", "--timeout=3m", *values)
    print(f"helm install -> operator Ready: {time.monotonic() - start:.1f} s")
    with helm_cluster.api_client() as api:
        (pod,) = _operator_pods(api)
        assert _ready(pod) and pod.spec.service_account_name == "finetune-operator"
        assert pod.status.container_statuses[0].image == operator_image
        running = _podman("ps", "--format", "{{.Image}} {{.Names}}")
        assert f"{operator_image} {_container_name(pod)}" in running, running
        first_uid = pod.metadata.uid

        namespace = helm_cluster.create_namespace("helm")
        volumes = claims(helm_cluster, api, namespace)
        jobs = Jobs(api, namespace, Operator(Path("/dev/null"), tmp_path / "none.log", 0, 0))
        jobs.create(minilm_job("minilm", volumes))
        created = time.monotonic()
        jobs.create(fake_job("paced", "finetune-test/paced:1", tmp_path))  # not in the image store: process mode
        # Both training curves reach Prometheus through the chart's PodMonitor (selector, port name), scraped
        # from the moment both trainer pods run: a quick MiniLM run can end a few seconds after its first step.
        deadline = time.monotonic() + 180
        while not all(_trainer_pods_running(api, namespace, job) for job in ("minilm", "paced")):
            assert time.monotonic() < deadline, "the trainer pods never ran"
            time.sleep(0.5)
        with prometheus(scrape_config(pod_monitor, api), tmp_path) as port:
            # The real trainer runs in the trainer image, as the chart's securityContext asks.
            trainer = _trainer_pod(api, namespace, "minilm")
            assert trainer.status.container_statuses[0].image == trainer_image
            inspected = json.loads(_podman("inspect", _container_name(trainer)))[0]
            assert inspected["ImageName"] == trainer_image
            assert inspected["HostConfig"]["ReadonlyRootfs"] is True
            assert inspected["Config"]["User"].split(":")[0] not in ("", "0", "root"), inspected["Config"]["User"]

            _scraped(port, 'max_over_time(finetune_trainer_step{finetune_job="minilm"}[5m]) > 0', tmp_path, 180)
            _scraped(port, 'max_over_time(fake_trainer_step{finetune_job="paced"}[5m]) > 0', tmp_path)

        # A changed value rolls the operator; the jobs it was watching carry on.
        helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "resyncSeconds=3", "--wait", "--timeout=3m")
        (pod,) = _operator_pods(api)
        assert pod.metadata.uid != first_uid and _ready(pod)
        assert "--resync-seconds=3" in pod.spec.containers[0].args
        done = jobs.wait_condition("paced", "Complete", timeout=120)
        status = done["status"]
        assert status["progress"]["step"] == status["progress"]["totalSteps"] == 60
        assert status["best"]["step"] == 60 and status["best"]["value"] == pytest.approx(0.8)

        real = jobs.wait_condition("minilm", "Complete", "Succeeded", timeout=300)["status"]
        print(f"MiniLM ({N_TRAIN} reviews, {EPOCHS} epochs) in the trainer image: {time.monotonic() - created:.0f} s")
        steps = EPOCHS * (N_TRAIN // BATCH)
        assert real["progress"]["step"] == real["progress"]["totalSteps"] == steps
        assert [e["step"] for e in real["evaluations"]] == [steps // EPOCHS, steps]
        best = real["best"]
        assert best["metric"] == "accuracy" and 0 < best["value"] <= 1
        assert best["value"] == max(e["metrics"]["accuracy"] for e in real["evaluations"])
        assert best["checkpoint"].startswith("pvc://outputs/minilm/checkpoints/checkpoint-")
        assert (volumes / "outputs" / "minilm" / "model" / "config.json").exists()
        print(f"best {best}")

        helm("uninstall", RELEASE, "--wait", "--timeout=2m")
        assert not _operator_pods(api)
        assert not client.AppsV1Api(api).list_namespaced_deployment(SYSTEM).items
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
        for name, kept_status in (("paced", status), ("minilm", real)):
            kept = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            assert json.dumps(kept["status"]["best"]) == json.dumps(kept_status["best"])


def _owned_containers(cluster: LocalCluster) -> dict[str, str]:
    """name -> id of the podman containers of this cluster's node agent."""
    owner = containers.owner_id(cluster.state_dir, NODE_NAME)
    listed = _podman(
        "ps", "--all", "--filter", f"label={containers.OWNER_LABEL}={owner}", "--format", "{{.Names}} {{.ID}}"
    )
    return dict(line.split() for line in listed.splitlines())


def test_a_sigkilled_node_agent_leaves_no_container_behind(helm_cluster: LocalCluster) -> None:
    """The next agent removes the containers of the killed one before it runs pods again: else the
    old container keeps running unseen and the pod's new container collides with its name."""
    namespace = helm_cluster.create_namespace("sweep")
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper", "namespace": namespace},
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "sleep", "image": images.base_image(), "command": ["sleep", "3600"]}],
        },
    }

    def running_container(other_than: str = "") -> str:
        """The id of the one container the pod runs in, once it is not ``other_than``."""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            pod = client.CoreV1Api(api).read_namespaced_pod("sleeper", namespace)
            states = [s.state for s in pod.status.container_statuses or []]
            prefix = f"ftl-{pod.metadata.uid[:13]}"
            ours = [i for n, i in _owned_containers(helm_cluster).items() if n.startswith(prefix)]
            if states and states[0].running and len(ours) == 1 and ours[0] != other_than:
                return ours[0]
            time.sleep(0.5)
        raise AssertionError(f"sleeper never ran in one new container: {pod.status}\n{_owned_containers(helm_cluster)}")

    with helm_cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_pod(namespace, manifest)
        before = running_container()
        helm_cluster.cluster.restart("node-agent", kill=True)
        running_container(other_than=before)  # the old one removed, the pod running again in a new one
        client.CoreV1Api(api).delete_namespaced_pod("sleeper", namespace, grace_period_seconds=0)

"""The operator as a real process (kopf) against the local control plane, plus helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import obstore
import pytest
import yaml
from kubernetes import client

from finetune_devtools.seaweedfs import S3Endpoint
from finetune_localcluster import procs
from finetune_localcluster.cluster import free_port
from finetune_localcluster.kubeconfig import service_account_kubeconfig
from finetune_operator.api.job import GROUP, PLURAL, VERSION
from finetune_operator.generators.rbac import cluster_role
from finetune_testsupport.pytest_plugin import LocalCluster
from finetune_trainer import s3
from finetune_trainer.contract import s3_env_prefix
from finetune_trainer.manifest import MANIFEST_NAME
from finetune_trainer.spec import LocalSecretRef, S3Storage
from tests.trainer import tiny

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
BROKEN_ENV_TRAINER = Path(__file__).with_name("broken_env_trainer.py")


def pytest_configure(config: pytest.Config) -> None:
    """Map the fake trainer images to local commands before the node agent starts."""
    image_map = Path(config.rootpath) / ".pytest_cache" / "finetune-image-map.yaml"
    image_map.parent.mkdir(parents=True, exist_ok=True)
    image_map.write_text(
        yaml.safe_dump(
            [
                {"match": rf"finetune-test/{mode}(:|$)", "entrypoint": [sys.executable, str(FAKE_TRAINER), mode]}
                for mode in (
                    "stubborn",
                    "plateau",
                    "crash-once",
                    "steady",
                    "silent",
                    "forger",
                    "paced",
                    "sweep",
                    "resumable",
                )
            ]
            + [
                {
                    "match": rf"finetune-test/exit-{code}(:|$)",
                    "entrypoint": [sys.executable, str(FAKE_TRAINER), "exit", str(code)],
                }
                for code in (0, 1, 2, 3, 4, 6)
            ]
            + [
                {
                    "match": rf"finetune-test/real-{mode}(:|$)",
                    "entrypoint": [sys.executable, str(BROKEN_ENV_TRAINER), mode],
                }
                for mode in ("no-cuda", "port-taken")
            ]
        )
    )
    os.environ["FINETUNE_IMAGE_MAP"] = str(image_map)


@dataclass
class Operator:
    """A `finetune-operator run` process; restartable, killable."""

    kubeconfig: Path
    log: Path
    metrics_port: int
    health_port: int
    resync_seconds: float = 2
    extra_args: tuple[str, ...] = ()
    """More flags of `finetune-operator run` (``--namespace``, ``--operator-namespace``)."""
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "finetune_operator.controller.cli",
            "run",
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            "--bind-address",
            "127.0.0.1",
            "--resync-seconds",
            str(self.resync_seconds),
            "--report-interval-seconds",
            "1",
            *self.extra_args,
        ]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"operator exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"operator never became healthy:\n{self.tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@contextlib.contextmanager
def running_operator(
    cluster: LocalCluster, directory: Path, resync_seconds: float = 2, extra_args: tuple[str, ...] = ()
) -> Iterator[Operator]:
    """The operator on ``cluster``, running with only the permissions the Helm chart grants it."""
    running = Operator(
        kubeconfig=service_account_kubeconfig(
            cluster.kubeconfig, cluster_role(), "finetune-system", directory / "operator-kubeconfig.yaml"
        ),
        log=directory / "operator.log",
        metrics_port=free_port(),
        health_port=free_port(),
        resync_seconds=resync_seconds,
        extra_args=extra_args,
    )
    running.start()
    try:
        yield running
    finally:
        running.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def operator(local_cluster: LocalCluster, crd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator, running with only the permissions the Helm chart grants it."""
    with running_operator(local_cluster, tmp_path_factory.mktemp("operator")) as running:
        yield running


@dataclass
class Jobs:
    """FineTuneJob helpers for one namespace."""

    api: client.ApiClient
    namespace: str
    operator: Operator

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, manifest
        )
        return created

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return found

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, patch)

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def wait(
        self, name: str, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        current: dict[str, Any] = {}
        while time.monotonic() < deadline:
            current = self.get(name)
            if predicate(current):
                return current
            time.sleep(0.5)
        raise AssertionError(
            f"{name}: timed out waiting for {what}\nstatus: {yaml.safe_dump(current.get('status'))}\n"
            f"operator log:\n{self.operator.tail()}"
        )

    def wait_condition(self, name: str, type_: str, reason: str | None = None, timeout: float = 120) -> dict[str, Any]:
        def holds(body: dict[str, Any]) -> bool:
            for condition in (body.get("status") or {}).get("conditions", []):
                if condition["type"] == type_ and condition["status"] == "True":
                    return reason is None or condition["reason"] == reason
            return False

        return self.wait(name, f"condition {type_}={reason or 'True'}", holds, timeout)

    def events(self, name: str) -> list[str]:
        listed = client.CoreV1Api(self.api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [event.reason for event in listed.items]

    def wait_event(self, name: str, reason: str, timeout: float = 30) -> None:
        """Wait for an Event with ``reason`` about ``name``: the operator posts it after the status write."""
        deadline = time.monotonic() + timeout
        while reason not in (seen := self.events(name)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {reason} event within {timeout} s (events: {seen})")
            time.sleep(0.5)

    def children(self, name: str) -> dict[str, int]:
        selector = f"finetune.dev/job={name}"
        core, batch, rbac = (
            client.CoreV1Api(self.api),
            client.BatchV1Api(self.api),
            client.RbacAuthorizationV1Api(self.api),
        )
        return {
            "Job": len(batch.list_namespaced_job(self.namespace, label_selector=selector).items),
            "ConfigMap": len(core.list_namespaced_config_map(self.namespace, label_selector=selector).items),
            "ServiceAccount": len(core.list_namespaced_service_account(self.namespace, label_selector=selector).items),
            "Role": len(rbac.list_namespaced_role(self.namespace, label_selector=selector).items),
            "RoleBinding": len(rbac.list_namespaced_role_binding(self.namespace, label_selector=selector).items),
            "Pod": len(core.list_namespaced_pod(self.namespace, label_selector=selector).items),
        }


@pytest.fixture
def jobs(local_cluster: LocalCluster, operator: Operator, namespace: str) -> Iterator[Jobs]:
    with local_cluster.api_client() as api:
        yield Jobs(api, namespace, operator)


def container_pid(cluster: LocalCluster, pod: client.V1Pod, container: str = "trainer") -> int:
    """The pid of a running pod's container process on its local node: what kubelet signals (SIGTERM)."""
    node = pod.spec.node_name
    pids = cluster.state_dir / "run" / ("pods" if node == "local-node" else f"pods-{node}")
    pid = procs.read_pidfile(pids / f"{pod.metadata.uid}_{container}.pid")
    assert pid is not None, f"{pod.metadata.name} runs no {container} container"
    return pid


def fake_job(name: str, image: str, tmp: Path, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob whose trainer is one of the fake images (see fake_trainer.py)."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": f"file://{tmp}/model", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": f"file://{tmp}/data"},
            "evaluation": {"metrics": ["loss", "accuracy"]},
            "output": {"location": f"file://{tmp}/{name}"},
            "resources": {"image": image, "gpusPerNode": 1},
            "stopGracePeriodSeconds": 3,
        },
    }
    body["spec"].update(spec)
    return body


def real_job(name: str, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob for the real trainer on the ``volumes`` claims; ``spec`` sections merge over the defaults."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/tiny-bert", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "pvc://datasets/sentiment", "validation": "validation.jsonl", "maxSeqLength": 32},
            "freeze": {"strategy": "bottom-layers", "layers": 1},
            "hyperparameters": {"learningRate": 1e-3, "batchSize": 8, "epochs": 2, "weightDecay": 0.0},
            "evaluation": {"strategy": "epoch", "metrics": ["loss", "accuracy"]},
            "output": {"location": f"pvc://outputs/{name}"},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return body


def claims(cluster: LocalCluster, api: client.ApiClient, namespace: str) -> Path:
    """Claims ``models``, ``datasets`` and ``outputs`` in ``namespace``; returns the host directory the local
    node backs them with (``<root>/<claim>``), where a test puts models and data and reads outputs."""
    for claim in ("models", "datasets", "outputs"):
        client.CoreV1Api(api).create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )
    return cluster.state_dir / "volumes" / namespace


def tiny_volumes(cluster: LocalCluster, api: client.ApiClient, namespace: str) -> Path:
    """Claims ``models`` (tiny-bert), ``datasets`` (sentiment, noisy, memorise) and ``outputs`` (returned).

    The local node backs a claim with a host directory and mounts it at /mnt/pvc/<claim>, as the operator asks,
    so the pvc:// path of a real cluster is the one exercised."""
    root = claims(cluster, api, namespace)
    tiny.save_model(root / "models" / "tiny-bert")
    tiny.write_sentiment(root / "datasets" / "sentiment", n_train=64, n_val=32)
    tiny.write_sentiment(root / "datasets" / "noisy", n_train=64, n_val=32, noisy=True)
    # 16 randomly labelled training texts and a disjoint validation split: only memorising lowers the training loss
    tiny.write_sentiment(root / "datasets" / "memorise", n_train=16, n_val=64, seed=1, noisy=True)
    return root / "outputs"


@pytest.fixture
def volumes(local_cluster: LocalCluster, jobs: Jobs) -> Path:
    """``tiny_volumes`` in the test's namespace."""
    return tiny_volumes(local_cluster, jobs.api, jobs.namespace)


@dataclass
class RealNamespace:
    """A namespace shared by a module's real-trainer jobs: its ``jobs`` and the outputs ``volumes``."""

    jobs: Jobs
    volumes: Path


@pytest.fixture(scope="module")
def real_namespace(local_cluster: LocalCluster, operator: Operator) -> Iterator[RealNamespace]:
    """A module's real-trainer jobs in one namespace (``tiny_volumes``), so that the module can create them all
    at once: each real trainer spends about 10 s of a core importing torch and transformers, and two of them
    overlap on two cores instead of queueing."""
    namespace = local_cluster.create_namespace("real")
    with local_cluster.api_client() as api:
        yield RealNamespace(Jobs(api, namespace, operator), tiny_volumes(local_cluster, api, namespace))
        client.CoreV1Api(api).delete_namespace(namespace)


def s3_secret(
    api: client.ApiClient, namespace: str, server: S3Endpoint, name: str, secret_key: str | None = None
) -> None:
    """A credentials Secret for the project's S3 server (``secret_key``: a wrong one, for the fault's test)."""
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            string_data={
                "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or server.secret_key,
            },
        ),
    )


def s3_test_env(env: pytest.MonkeyPatch, server: S3Endpoint) -> S3Storage:
    """Settings (naming the Secret ``s3-credentials``) and the test process's env to read the bucket as pods do."""
    for role in ("model", "dataset", "output"):
        env.setenv(s3_env_prefix(role) + "AWS_ACCESS_KEY_ID", server.access_key)
        env.setenv(s3_env_prefix(role) + "AWS_SECRET_ACCESS_KEY", server.secret_key)
    return S3Storage(endpoint=server.endpoint, credentials_secret_ref=LocalSecretRef(name="s3-credentials"))


def s3_published(settings: S3Storage, prefix: str, timeout: float = 300) -> str:
    """Wait until a checkpoint under ``prefix`` (s3://bucket/.../checkpoints) is published; its name."""
    root = s3.S3Location.parse(prefix, settings, "output")
    store = root.store()
    deadline = time.monotonic() + timeout
    while True:
        names = [
            str(meta["path"]).split("/")[-2]
            for chunk in obstore.list(store, f"{root.prefix}/")
            for meta in chunk
            if str(meta["path"]).endswith(f"/{MANIFEST_NAME}")
        ]
        if names:
            return sorted(names)[0]
        assert time.monotonic() < deadline, f"no checkpoint was published under {prefix}"
        time.sleep(0.2)

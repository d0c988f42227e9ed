"""Session-scoped ``local_cluster`` fixture: one real control plane per test session.

Opt in with ``pytest_plugins = ["finetune_testsupport.pytest_plugin"]``.

By default the fixture starts a fresh cluster in a temporary state dir and stops it at
the end of the session. With ``FINETUNE_TEST_CLUSTER=reuse`` it uses (or starts, and then
leaves running) the cluster in the default state dir (``$FINETUNE_CLUSTER_DIR`` or
``~/.cache/finetune-operator/cluster``) -- handy while iterating.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from finetune_devtools.kueue import Kueue
from finetune_devtools.mlflow_server import MlflowServer
from finetune_devtools.seaweedfs import S3Endpoint, SeaweedFS
from finetune_localcluster import build, kubeconfig
from finetune_localcluster.cluster import Cluster, default_state_dir


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike its base class, the message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


@dataclass
class LocalCluster:
    """What tests get: paths plus small helpers."""

    cluster: Cluster

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def state_dir(self) -> Path:
        return self.cluster.state_dir

    @property
    def server(self) -> str:
        return str(self.cluster.info()["server"])

    def api_client(self) -> client.ApiClient:
        """A new admin ApiClient (the caller may close it)."""
        return kubeconfig.api_client(self.kubeconfig)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the bundled kubectl against this cluster.

        Each call gets an empty discovery cache: a cache shared across calls would hide
        CRDs created after the first call (``kubectl explain`` does not refresh it).
        """
        kubectl = build.ensure(log=False).path("kubectl")
        with tempfile.TemporaryDirectory(prefix="kubectl-cache-") as cache:
            res = subprocess.run(
                [str(kubectl), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={cache}", *args],
                input=input,
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
        if check and res.returncode != 0:
            raise KubectlError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def create_namespace(self, prefix: str = "t", labels: dict[str, str] | None = None) -> str:
        """Create a uniquely named namespace and wait for its default ServiceAccount
        and kube-root-ca.crt (pods are rejected or stuck until the controllers add them)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        with self.api_client() as api:
            v1 = client.CoreV1Api(api)
            v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels or {})))
            deadline = time.monotonic() + 30
            while True:
                try:
                    v1.read_namespaced_service_account("default", name)
                    v1.read_namespaced_config_map("kube-root-ca.crt", name)
                    return name
                except client.ApiException as e:
                    if e.status != 404 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


@contextlib.contextmanager
def own_cluster(state_dir: Path, nodes: int = 1, gpus: int = 4) -> Iterator[LocalCluster]:
    """A fresh control plane in ``state_dir``, stopped afterwards: for the session, or for tests
    whose cluster-wide objects (CRDs, ClusterRoles, admission) must never meet other tests, or
    that need ``nodes`` nodes (``local-node``, ``local-node-2``, ...; each with ``gpus`` GPUs)."""
    c = Cluster(state_dir, nodes=nodes, gpus=gpus)
    c.start(reuse=False)
    try:
        yield LocalCluster(c)
    finally:
        c.stop()


@pytest.fixture(scope="module")
def kueue_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of its own with the real Kueue running against it: Kueue's CRDs, queues and
    cluster-wide objects never meet the other tests (its manager is built once per machine). Six GPUs: the
    quota of every queue of tests/e2e/test_kueue.py's scenarios, which run at once."""
    with own_cluster(tmp_path_factory.mktemp("kueue-cluster"), gpus=6) as cluster:
        kueue = Kueue(cluster.state_dir)
        kueue.up()
        try:
            yield cluster
        finally:
            kueue.down()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A running local control plane with a Ready node (shared by the whole session)."""
    if os.environ.get("FINETUNE_TEST_CLUSTER") == "reuse":
        c = Cluster(default_state_dir())
        c.start(reuse=True)
        yield LocalCluster(c)
        return
    # Unix sockets and log paths stay short: use a short base dir.
    with own_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (SQLite, artifacts proxied) on a free port, for the session; a test may
    ``stop()`` and ``start()`` it (same port, same database) to take it away mid-run."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """The project's S3 server (SeaweedFS, authentication on) for the session, built once per machine."""
    server = SeaweedFS(tmp_path_factory.mktemp("s3"))
    try:
        yield server.up()
    finally:
        server.down()

"""Shared helpers for the control-plane integration tests (`local_cluster` comes from tests/conftest.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client

from finetune_testsupport.pytest_plugin import LocalCluster

T = TypeVar("T")
Obj = dict[str, Any]


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.1) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Kube:
    """Thin helpers over the official client and kubectl, bound to one namespace."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.cluster = cluster
        self.ns = namespace
        self.api = cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)

    def apply(self, *objs: Obj) -> None:
        """Create objects with kubectl (JSON on stdin)."""
        doc = {"apiVersion": "v1", "kind": "List", "items": list(objs)}
        self.cluster.kubectl("-n", self.ns, "create", "-f", "-", input=json.dumps(doc))

    def pod(self, name: str) -> Obj:
        return dict(self.api.sanitize_for_serialization(self.core.read_namespaced_pod(name, self.ns)))

    def pod_phase(self, name: str, *phases: str, timeout: float = 60.0) -> Obj:
        def check() -> Obj | None:
            p = self.pod(name)
            return p if p.get("status", {}).get("phase") in phases else None

        return wait_for(f"pod {self.ns}/{name} in {phases}", check, timeout)

    def job(self, name: str) -> Obj:
        return dict(self.api.sanitize_for_serialization(self.batch.read_namespaced_job(name, self.ns)))

    def job_condition(self, name: str, cond: str, timeout: float = 90.0) -> Obj:
        def check() -> Obj | None:
            j = self.job(name)
            conds = j.get("status", {}).get("conditions") or []
            return j if any(c["type"] == cond and c["status"] == "True" for c in conds) else None

        return wait_for(f"job {self.ns}/{name} condition {cond}", check, timeout)

    def gone(self, name: str, timeout: float = 60.0) -> None:
        def check() -> bool:
            try:
                self.core.read_namespaced_pod(name, self.ns)
                return False
            except client.ApiException as e:
                return bool(e.status == 404)

        wait_for(f"pod {self.ns}/{name} to be deleted", check, timeout)

    def logs(self, pod: str, container: str | None = None) -> str:
        uid = self.pod(pod)["metadata"]["uid"]
        d = self.cluster.state_dir / "pods" / f"{self.ns}_{pod}_{uid}"
        name = container or self.pod(pod)["spec"]["containers"][0]["name"]
        f = d / f"{name}.log"
        return f.read_text() if f.exists() else ""


@pytest.fixture
def kube(local_cluster: LocalCluster) -> Iterator[Kube]:
    """A fresh namespace on the session cluster, with helpers."""
    k = Kube(local_cluster, local_cluster.create_namespace("cp"))
    yield k
    k.core.delete_namespace(k.ns)  # the namespace controller and the agent clean up
    k.api.close()


def pod(name: str, command: list[str], **spec: Any) -> Obj:
    """A minimal pod manifest running ``command`` in a busybox-like image."""
    container = {"name": spec.pop("container_name", "main"), "image": "busybox:1.36", "command": command}
    container.update(spec.pop("container", {}))
    body: Obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}
    body["spec"].setdefault("restartPolicy", "Never")
    body["spec"].update(spec)
    return body


def pvc(name: str) -> Obj:
    """A claim for the default (local) StorageClass."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }

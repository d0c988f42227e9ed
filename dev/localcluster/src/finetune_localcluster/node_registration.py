"""The Node object of a local node agent: registration, status, Lease heartbeat.

Parametrised by node name and capacity (:func:`local_capacity`), so that several agents can
register several Nodes against one control plane.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
from pathlib import Path

from finetune_localcluster.agentlog import log, now, now_micro
from finetune_localcluster.rest import ApiError, Obj, Rest

HEARTBEAT_SECONDS = 10.0
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


def local_capacity(state_dir: Path, gpus: int, pods: int = 110) -> dict[str, str]:
    """cpu/memory/disk of this machine, ``gpus`` as ``nvidia.com/gpu`` and ``pods`` slots."""
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{mem_kib}Ki",
        "ephemeral-storage": f"{shutil.disk_usage(state_dir).total // 1024}Ki",
        "pods": str(pods),
        "nvidia.com/gpu": str(gpus),
    }


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class NodeRegistration:
    """Creates (or adopts) one Node, keeps it Ready with status updates and a Lease: the node lifecycle
    controller turns a Node whose Lease is not renewed Ready=Unknown, as in a real cluster."""

    def __init__(self, api: Rest, node_name: str, allocatable: dict[str, str]) -> None:
        self.api = api
        self.node_name = node_name
        self.allocatable = allocatable
        self.log_port = 0  # the kubelet endpoint (``kubectl logs``), set before register()
        self.started = now()
        self.node: Obj = {}

    def node_status(self) -> Obj:
        ts = now()

        def cond(t: str, status: str, reason: str, msg: str) -> Obj:
            return {
                "type": t,
                "status": status,
                "reason": reason,
                "message": msg,
                "lastHeartbeatTime": ts,
                "lastTransitionTime": self.started,
            }

        return {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "finetune local node agent is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": platform.platform(),
                "containerRuntimeVersion": "local-process://1",
                "kubeletVersion": "finetune-node-agent",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _arch(),
            },
        }

    def register(self) -> None:
        """Create (or adopt) the Node object and post a Ready status."""
        self.started = now()
        arch = _arch()
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": arch,
            "node.kubernetes.io/instance-type": "local",
            "finetune.dev/local-node": "true",
        }
        body: Obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.node = self.api.post("/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
            self.node = self.api.patch(f"/api/v1/nodes/{self.node_name}", {"metadata": {"labels": labels}})
        # The TaintNodesByCondition admission plugin adds node.kubernetes.io/not-ready at
        # creation; the node-lifecycle controller lifts it once Ready, a few seconds later: lifted
        # here at once, so the first pods need not wait for its next pass.
        taints = self.node.get("spec", {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != "node.kubernetes.io/not-ready"]
        if kept != taints:
            self.node = self.api.patch(
                f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": kept or None}}, kind="merge-patch"
            )
        self.post_status()
        self.renew_lease()
        log(f"registered node {self.node_name} with {self.allocatable}")

    def post_status(self) -> None:
        self.api.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})

    def renew_lease(self) -> None:
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.api.patch(f"{LEASE_PATH}/{self.node_name}", {"spec": spec}, kind="merge-patch")
        except ApiError as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self.node["metadata"]["uid"]}
            self.api.post(
                LEASE_PATH,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.node_name, "ownerReferences": [owner]},
                    "spec": spec,
                },
            )

    def heartbeat(self, stopping: threading.Event) -> None:
        """Renew the Lease every ``HEARTBEAT_SECONDS``, re-post the status every third beat."""
        n = 0
        while not stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.renew_lease()
                n += 1
                if n % 3 == 0:
                    self.post_status()
            except (ApiError, OSError) as e:
                log(f"heartbeat failed: {e}")

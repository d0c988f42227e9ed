"""PersistentVolumeClaims of the local node: a default StorageClass and a hostPath provisioner.

The agent creates a default StorageClass ``local`` and, acting as its provisioner, answers every
pending claim of that class (or of no class) with a pre-bound hostPath PersistentVolume pointing
at ``volumes/<ns>/<claimName>/`` under the cluster state dir; the persistentvolume-binder
controller then binds them, so the scheduler's VolumeBinding plugin sees Bound claims exactly as
on a real cluster.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from finetune_localcluster.agentlog import log
from finetune_localcluster.rest import ApiError, Obj, Rest

STORAGE_CLASS = "local"
PROVISIONER = "finetune.dev/local-node"
RESYNC_SECONDS = 300


def claim_dir(state_dir: Path, namespace: str, claim: str) -> Path:
    """Host directory backing a PersistentVolumeClaim (kept after the pod ends)."""
    return state_dir / "volumes" / namespace / claim


class ClaimProvisioner:
    """Provisions host directories for the claims of the ``local`` (or no) StorageClass."""

    def __init__(self, api: Rest, state_dir: Path) -> None:
        self.api = api
        self.state_dir = state_dir

    def ensure_storage_class(self) -> None:
        """A default StorageClass whose claims this agent provisions as host dirs."""
        sc: Obj = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate",
        }
        try:
            self.api.post("/apis/storage.k8s.io/v1/storageclasses", sc)
        except ApiError as e:
            if e.status != 409:
                raise

    def provision(self, pvc: Obj) -> None:
        """Create a pre-bound hostPath PV for a pending claim of our (or no) class."""
        meta, spec = pvc["metadata"], pvc.get("spec", {})
        cls = spec.get("storageClassName") or ""
        if spec.get("volumeName") or (pvc.get("status") or {}).get("phase") not in (None, "Pending"):
            return
        if cls not in ("", STORAGE_CLASS) or meta.get("deletionTimestamp"):
            return
        host = claim_dir(self.state_dir, meta["namespace"], meta["name"])
        host.mkdir(parents=True, exist_ok=True)
        pv: Obj = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": cls,
                "hostPath": {"path": str(host), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.api.post("/api/v1/persistentvolumes", pv)
            log(f"provisioned {pv['metadata']['name']} for {meta['namespace']}/{meta['name']} at {host}")
        except ApiError as e:
            if e.status != 409:
                log(f"provisioning {meta['namespace']}/{meta['name']} failed: {e}")

    def watch(self, stopping: threading.Event) -> None:
        """List then watch every claim, provisioning as they come, until ``stopping``."""
        base = "/api/v1/persistentvolumeclaims"
        while not stopping.is_set():
            try:
                lst = self.api.get(base)
                rv = lst["metadata"]["resourceVersion"]
                for pvc in lst.get("items", []):
                    self.provision(pvc)
                while not stopping.is_set():
                    for ev in self.api.watch(f"{base}?resourceVersion={rv}", timeout=RESYNC_SECONDS):
                        obj = ev.get("object", {})
                        if ev["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), json.dumps(obj))
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev["type"] in ("ADDED", "MODIFIED"):
                            self.provision(obj)
            except (ApiError, OSError, ValueError, KeyError) as e:
                if stopping.is_set():
                    return
                if not (isinstance(e, ApiError) and e.status == 410):
                    log(f"claim watch restarting: {e}")
                    time.sleep(0.5)

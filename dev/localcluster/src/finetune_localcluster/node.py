"""Local node agent: a tiny kubelet that runs the pods bound to its Node.

Each part lives in its own module:

- :mod:`node_registration` registers the Node (cpu/memory of this machine, a configurable
  ``nvidia.com/gpu`` count, 110 pods) and keeps it Ready with a status heartbeat and a Lease in
  ``kube-node-lease``;
- :mod:`provisioner` is the default StorageClass ``local`` and its hostPath provisioner;
- :mod:`podworker` runs each pod with ``spec.nodeName=<node>`` in a worker thread that polls its
  containers and reports status like a kubelet;
- :mod:`projection` materialises volumes, tokens and env;
- :mod:`runtime` is the runtime interface: :mod:`runtime_podman` runs a container whose image is
  in the local podman store (``make images``) as a real container; :mod:`runtime_process` runs
  any other image as a local process (the image map, :mod:`podspec`).

Probes are honoured (:mod:`probes`), and pods reach the API server as ``kubernetes.default.svc``
(:mod:`apiservice`) as well as by ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and
``KUBERNETES_SERVICE_PORT`` of the real API server. Resource requests/limits are recorded by the
scheduler, not enforced. ``kubectl logs`` is served by :mod:`logserver`.

Run: ``python -m finetune_localcluster.node --state-dir DIR --kubeconfig FILE``
(the cluster module starts it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from finetune_localcluster import apiservice, procs
from finetune_localcluster.agentlog import log
from finetune_localcluster.containers import Podman, owner_id
from finetune_localcluster.logserver import LogServer
from finetune_localcluster.node_registration import NodeRegistration, local_capacity
from finetune_localcluster.podworker import PodWorker
from finetune_localcluster.provisioner import RESYNC_SECONDS, ClaimProvisioner
from finetune_localcluster.rest import ApiError, Obj, Rest, q
from finetune_localcluster.runtime import USE_MOUNT_NAMESPACES, Runtime
from finetune_localcluster.runtime_podman import PodmanRuntime
from finetune_localcluster.runtime_process import ProcessRuntime

__all__ = ["USE_MOUNT_NAMESPACES", "Agent", "main"]


class Agent:
    """Registers the Node, heartbeats, and dispatches pods to workers."""

    def __init__(self, api: Rest, state_dir: Path, node_name: str, gpus: int, secondary: bool = False) -> None:
        self.api = api
        self.secondary = secondary
        """One of several nodes, not the first: the cluster-wide services (the ``kubernetes`` Service
        stand-in, the StorageClass and its provisioner) are the first node's; volumes are shared."""
        self.state_dir = state_dir
        self.node_name = node_name
        self.gpus = gpus
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.allocatable = local_capacity(state_dir, gpus)
        self.registration = NodeRegistration(api, node_name, self.allocatable)
        self.provisioner = ClaimProvisioner(api, state_dir)
        self.pids_dir = state_dir / "run" / (f"pods-{node_name}" if secondary else "pods")
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_file: Path | None = None  # set once the kubernetes Service stand-in listens
        self.api_service: apiservice.Forwarder | None = None
        self.process_runtime = ProcessRuntime()
        self.podman_runtime = PodmanRuntime(Podman(owner_id(state_dir, node_name)), None)

    def runtime_for(self, image: str) -> Runtime:
        """Podman for an image in the local store (needs mount namespaces' privileges), else a process."""
        if USE_MOUNT_NAMESPACES and self.podman_runtime.has_image(image):
            return self.podman_runtime
        return self.process_runtime

    def serve_api_service(self) -> None:
        """``kubernetes.default.svc:443`` for in-cluster clients (see :mod:`apiservice`)."""
        if not USE_MOUNT_NAMESPACES:
            log("no mount namespaces: pods reach the API server by KUBERNETES_SERVICE_HOST only")
            return
        address = apiservice.service_address(self.api.port)
        if not self.secondary:  # the first node's forwarder serves every node's pods (one loopback address)
            try:
                self.api_service = apiservice.Forwarder(address, (self.api.host, self.api.port))
            except OSError as e:
                log(f"cannot listen on {address}:{apiservice.SERVICE_PORT} ({e}): no kubernetes.default.svc in pods")
                return
        self.podman_runtime.service_address = address
        self.hosts_file = apiservice.write_hosts(self.state_dir / "run" / f"hosts-{self.node_name}", address)

    def container_running(self, ns: str, pod: str, container: str) -> bool:
        """Whether a container still runs (``kubectl logs -f`` follows until it stops)."""
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            if (w.ns, w.pod_name) == (ns, pod):
                return any(c.name == container and not c.done for c in w.init + w.main)
        return False

    def serve_logs(self) -> None:
        """Serve /containerLogs for the API server (``kubectl logs``)."""
        pki = self.state_dir / "pki"
        server = LogServer(
            self.state_dir, pki / "kubelet.crt", pki / "kubelet.key", pki / "ca.crt", self.container_running
        )
        server.start()
        self.registration.log_port = server.port

    def pidfile(self, uid: str, container: str) -> Path:
        return self.pids_dir / f"{uid}_{container}.pid"

    def forget(self, uid: str) -> None:
        """Drop a finished worker; later (stale) events for its pod must not rerun it."""
        with self.lock:
            self.workers.pop(uid, None)
            self.finished.add(uid)

    # -------------------------------------------------------------- pods

    def handle(self, pod: Obj, deleted: bool = False) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            finished = uid in self.finished
        if w is not None:
            if deleted:
                w.removed.set()
                w.deleting.set()
            else:
                w.update(pod)
            return
        if deleted:
            return
        phase = (pod.get("status") or {}).get("phase")
        if finished or phase in ("Succeeded", "Failed"):
            if pod["metadata"].get("deletionTimestamp"):
                try:
                    self.api.delete(
                        f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}",
                        {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                    )
                except ApiError as e:
                    if e.status not in (404, 409):
                        log(f"delete of terminal pod failed: {e}")
            return
        w = PodWorker(self, pod)
        if pod["metadata"].get("deletionTimestamp"):
            w.deleting.set()
        with self.lock:
            self.workers[uid] = w
        w.start()

    def watch_pods(self) -> None:
        base = f"/api/v1/pods?fieldSelector={q('spec.nodeName=' + self.node_name)}"
        while not self.stopping.is_set():
            try:
                lst = self.api.get(base)
                rv = lst["metadata"]["resourceVersion"]
                seen = set()
                for pod in lst.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self.handle(pod)
                with self.lock:
                    gone = [w for uid, w in self.workers.items() if uid not in seen]
                for w in gone:
                    self.handle(w.pod, deleted=True)
                while not self.stopping.is_set():
                    for ev in self.api.watch(f"{base}&resourceVersion={rv}", timeout=RESYNC_SECONDS):
                        obj = ev.get("object", {})
                        if ev["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), json.dumps(obj))
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev["type"] == "BOOKMARK":
                            continue
                        self.handle(obj, deleted=ev["type"] == "DELETED")
            except (ApiError, OSError, ValueError, KeyError) as e:
                if self.stopping.is_set():
                    return
                if not (isinstance(e, ApiError) and e.status == 410):
                    log(f"pod watch restarting: {e}")
                    time.sleep(0.5)

    def shutdown(self) -> None:
        """Kill every pod process (the pods stay in the API, as on a node reboot)."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        threads = [threading.Thread(target=w.kill_all, args=(2.0,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for f in self.pids_dir.glob("*.pid"):
            pid = procs.read_pidfile(f)
            if pid is not None:
                procs.kill_group(pid, 1.0)
            f.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--node-name", default="local-node")
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--secondary", action="store_true", help="not the first node: no cluster-wide services")
    a = p.parse_args(argv)
    agent = Agent(Rest.from_kubeconfig(a.kubeconfig), a.state_dir.resolve(), a.node_name, a.gpus, a.secondary)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        left = agent.podman_runtime.podman.sweep()
        if left:
            log(f"removed {len(left)} container(s) an earlier agent of this node left behind: {', '.join(left)}")
        agent.serve_logs()
        agent.serve_api_service()
        agent.registration.register()
        threading.Thread(
            target=agent.registration.heartbeat, args=(agent.stopping,), name="heartbeat", daemon=True
        ).start()
        if not agent.secondary:
            agent.provisioner.ensure_storage_class()
            threading.Thread(target=agent.provisioner.watch, args=(agent.stopping,), name="claims", daemon=True).start()
        agent.watch_pods()
    finally:
        log("shutting down: stopping pod processes")
        agent.shutdown()
        log("stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()

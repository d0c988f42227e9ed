"""One pod on the local node: a worker thread that runs its containers like kubelet does.

Init containers in order (sidecars with ``restartPolicy: Always`` stay), then the main
containers; restarts with back-off per the pod's restartPolicy; probes (:mod:`probes`);
``activeDeadlineSeconds``; graceful termination on deletion; the pod status PATCHed whenever it
changes. Containers run through a :class:`runtime.Runtime` chosen per image by the agent.

Host layout (under the cluster state dir)::

    pods/<ns>_<pod>_<uid>/<container>.log     container output (appended across restarts)
    pods/<ns>_<pod>_<uid>/volumes/<volume>/   see :mod:`projection`
    pods/<ns>_<pod>_<uid>/rootfs/<workingDir> a workingDir that is neither mounted nor on the host
    run/pods/<uid>_<container>.pid            live container processes (for cleanup)
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import subprocess
import threading
import time
import traceback

from finetune_localcluster import poddns, podspec, procs
from finetune_localcluster.agentlog import log, now
from finetune_localcluster.podhost import PodHost
from finetune_localcluster.probes import ContainerProbes
from finetune_localcluster.projection import NotReadyError, PodProjection
from finetune_localcluster.rest import ApiError, Obj
from finetune_localcluster.runtime import BACKOFF_MAX, USE_MOUNT_NAMESPACES, Container, PodContext


class PodWorker(threading.Thread):
    """Runs one pod to completion (or deletion), reporting status as it goes."""

    def __init__(self, agent: PodHost, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = agent.state_dir / "pods" / f"{self.ns}_{self.pod_name}_{self.uid}"
        self.lock = threading.Lock()
        self.deleting = threading.Event()
        self.removed = threading.Event()
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init: list[Container] = [
            Container(c, init=True, sidecar=c.get("restartPolicy") == "Always") for c in spec.get("initContainers", [])
        ]
        self.main: list[Container] = [Container(c) for c in spec.get("containers", [])]
        self.start_time = (pod.get("status") or {}).get("startTime") or now()
        self.pod_ip = podspec.pod_ip(pod)
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.volumes_ready = False
        self.initialized = not any(not c.sidecar for c in self.init)
        self._last_status: str = ""
        self._transitions: dict[str, tuple[str, str]] = {}
        self.projection = PodProjection(
            agent.api, self.snapshot, self.dir, agent.state_dir, agent.node_name, agent.allocatable
        )
        self.context = PodContext(self.projection, agent.api.port, agent.state_dir)

    # -------------------------------------------------------------- API helpers

    def _resolve_dns(self) -> None:
        """The pod's cluster DNS names and, for a Job's pods, its rendezvous port (see :mod:`poddns`)."""
        pod = self.snapshot()
        if not pod["spec"].get("subdomain") or self.projection.dns_names:
            return
        job = poddns.owner_job(pod)
        completions = None
        if job is not None:
            try:
                found = self.agent.api.get(f"/apis/batch/v1/namespaces/{self.ns}/jobs/{job[0]}")
                completions = int(found["spec"].get("completions") or 1)
            except (ApiError, OSError) as e:  # gone or unreadable: the pod's own names still resolve
                log(f"{self.ns}/{self.pod_name}: cannot read Job {job[0]}: {e}")
            self.projection.rendezvous_port = poddns.rendezvous_port(job[1])
        self.projection.dns_names = poddns.host_names(pod, completions)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}"

    def snapshot(self) -> Obj:
        """The newest pod object, with the pod IP this node gave it (downward API ``status.podIP``)."""
        with self.lock:
            pod = self.pod
        return {**pod, "status": {**(pod.get("status") or {}), "podIP": self.pod_ip}}

    def update(self, pod: Obj) -> None:
        """Called by the watch loop with the newest object."""
        with self.lock:
            self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def report(self) -> bool:
        """PATCH the pod status if it changed since the last report; False when that failed."""
        ready = self.phase == "Running" and all(c.ready for c in self.main)
        terminal = self.phase in ("Succeeded", "Failed")

        def cond(t: str, ok: bool, reason: str | None = None) -> Obj:
            c: Obj = {"type": t, "status": "True" if ok else "False", "lastProbeTime": None}
            if reason and not ok:
                c["reason"] = reason
            return c

        not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        status: Obj = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": [
                cond("PodReadyToStartContainers", self.volumes_ready and not terminal),
                cond("Initialized", self.initialized or terminal, "ContainersNotInitialized"),
                cond("ContainersReady", ready, not_ready_reason),
                cond("Ready", ready, not_ready_reason),
            ],
            "containerStatuses": [c.status() for c in self.main],
        }
        if self.init:
            status["initContainerStatuses"] = [c.status() for c in self.init]
        if self.reason:
            status["reason"] = self.reason
            status["message"] = self.message or ""
        key = json.dumps(status, sort_keys=True)
        if key == self._last_status:
            return True
        for c in status["conditions"]:  # a condition's time changes only when its status does
            prev = self._transitions.get(c["type"])
            if prev is None or prev[0] != c["status"]:
                prev = (c["status"], now())
                self._transitions[c["type"]] = prev
            c["lastTransitionTime"] = prev[1]
        try:
            self.agent.api.patch(f"{self.path}/status", {"status": status})
            self._last_status = key
            return True
        except ApiError as e:
            if e.status == 404:
                self.removed.set()
            else:
                log(f"{self.ns}/{self.pod_name}: status update failed: {e}")
        except (OSError, http.client.HTTPException) as e:  # the API server restarts: report again later
            log(f"{self.ns}/{self.pod_name}: status update failed: {e}")
        return False

    def start_container(self, c: Container) -> None:
        """Spawn the container with its runtime (its own process group either way)."""
        c.runtime = self.agent.runtime_for(str(c.spec.get("image", "")))
        c.podman_name = None
        try:
            launch = c.runtime.launch(self.context, c)
        except (NotReadyError, ValueError) as e:  # ValueError: a securityContext podman must refuse
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.next_start = time.monotonic() + 1.0
            return
        except (OSError, KeyError) as e:
            self._terminated(c, 127, "StartError", str(e), started=now())
            return
        logf = (self.dir / f"{c.name}.log").open("ab")
        try:
            c.proc = subprocess.Popen(
                launch.argv,
                cwd=launch.cwd,
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            self._terminated(c, 128, "StartError", str(e), started=now())
            return
        finally:
            logf.close()
        procs.write_pidfile(self.agent.pidfile(self.uid, c.name), c.proc.pid)
        c.state = {"running": {"startedAt": now()}}
        c.env = launch.env
        c.probes = ContainerProbes(c.spec, time.monotonic(), self.pod_ip)

    def exec_in(self, c: Container, argv: list[str], timeout: float) -> int:
        """Run ``argv`` as the container would (its env and mounts): exec probes."""
        assert c.runtime is not None
        return c.runtime.exec(self.context, c, argv, timeout)

    def probe(self, c: Container, mono: float) -> None:
        """Run the container's due probes; a failed liveness/startup probe kills it (then restart policy)."""
        if c.probes is None or c.proc is None or "running" not in c.state:
            return
        why = c.probes.tick(mono, lambda argv, timeout: self.exec_in(c, argv, timeout))
        if why is None:
            return
        log(f"{self.ns}/{self.pod_name}: container {c.name}: {why}; killing it")
        grace = c.spec.get("livenessProbe", {}).get("terminationGracePeriodSeconds")
        self.kill(c, float(grace if grace is not None else self._grace()))
        rc = c.proc.wait()
        self._terminated(c, rc, "Error", why, c.state["running"]["startedAt"])
        c.proc = None

    def _terminated(self, c: Container, code: int, reason: str | None, message: str | None, started: str) -> None:
        t: Obj = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": started,
            "finishedAt": now(),
        }
        if code < 0:  # killed by a signal: report it the way runtimes do
            t["signal"] = -code
            t["exitCode"] = 128 - code
        if message:
            t["message"] = message
        elif t["exitCode"] != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            t["message"] = procs.tail(self.dir / f"{c.name}.log", 80)[-4096:]
        if c.proc is not None:
            t["containerID"] = f"local://{c.proc.pid}"
            self.agent.pidfile(self.uid, c.name).unlink(missing_ok=True)
        c.state = {"terminated": t}

    def poll(self, c: Container) -> bool:
        """Reap an exited process; return True if it exited just now."""
        if c.proc is None or "running" not in c.state:
            return False
        rc = c.proc.poll()
        if rc is None:
            return False
        self._terminated(c, rc, None, None, c.state["running"]["startedAt"])
        c.proc = None
        return True

    def should_restart(self, c: Container) -> bool:
        code = int(c.state["terminated"]["exitCode"])
        if c.sidecar:
            return True
        if c.init:
            return code != 0 and self.restart_policy != "Never"
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)

    def kill(self, c: Container, grace: float) -> None:
        """SIGTERM the container's process group, SIGKILL after ``grace``; then no container is left."""
        if c.proc is not None:
            procs.kill_group(c.proc.pid, grace)
        if c.runtime is not None:
            c.runtime.stopped(c)

    def kill_all(self, grace: float, containers: list[Container] | None = None) -> None:
        """SIGTERM every running container's process group, SIGKILL after ``grace``."""
        targets = [c for c in (containers or self.init + self.main) if c.proc is not None and "running" in c.state]
        threads = [threading.Thread(target=self.kill, args=(c, grace)) for c in targets if c.proc]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in targets:
            if c.proc is not None:
                rc = c.proc.wait()
                self._terminated(c, rc, None, None, c.state["running"]["startedAt"])
                c.proc = None
            c.done = True
        for c in self.init + self.main:
            if "waiting" in c.state:
                c.done = True

    # -------------------------------------------------------------- lifecycle

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log(f"{self.ns}/{self.pod_name}: worker crashed:\n{traceback.format_exc()}")
            self.kill_all(1.0)
        finally:
            for c in self.init + self.main:
                self.agent.pidfile(self.uid, c.name).unlink(missing_ok=True)
            self.agent.forget(self.uid)

    def _deadline(self) -> float | None:
        """Wall-clock end of ``activeDeadlineSeconds`` (re-read: it may be lowered later)."""
        with self.lock:
            ads = self.pod["spec"].get("activeDeadlineSeconds")
        if ads is None:
            return None
        started = dt.datetime.strptime(self.start_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        return started.timestamp() + int(ads)

    def _grace(self) -> float:
        with self.lock:
            meta, spec = self.pod["metadata"], self.pod["spec"]
        g = meta.get("deletionGracePeriodSeconds")
        if g is None:
            g = spec.get("terminationGracePeriodSeconds", 30)
        return float(g)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        status = self.pod.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            self.phase = status["phase"]
        elif self.restart_policy == "Never" and any(
            "running" in (cs.get("state") or {}) for cs in status.get("containerStatuses") or []
        ):
            # A previous agent ran this pod; its processes are gone and may not rerun.
            self.phase, self.reason = "Failed", "NodeAgentRestarted"
            self.message = "the node agent restarted while the pod was running"
            self.report()
        while self.phase not in ("Succeeded", "Failed"):
            if self.deleting.is_set() or self.removed.is_set():
                break
            deadline = self._deadline()
            if deadline is not None and time.time() >= deadline:
                self.kill_all(self._grace())
                self.phase, self.reason = "Failed", "DeadlineExceeded"
                self.message = "Pod was active on the node longer than the specified deadline"
                self.report()
                break
            if not self.volumes_ready:
                try:
                    self._resolve_dns()
                    self.projection.prepare_volumes(
                        [c.spec for c in self.init + self.main], self.agent.hosts_file, USE_MOUNT_NAMESPACES
                    )
                    self.volumes_ready = True
                except NotReadyError as e:
                    for c in self.init + self.main:
                        c.state = {"waiting": {"reason": "ContainerCreating", "message": str(e)}}
                    self.report()
                    self.deleting.wait(0.5)
                    continue
            self.step()
            self.projection.refresh_tokens()
            self.report()
            self.deleting.wait(0.1)
        # The final state must reach the API server, also across its restart (else the pod runs forever).
        while not self.report() and not (self.removed.is_set() or self.agent.stopping.is_set()):
            self.agent.stopping.wait(1.0)
        if self.deleting.is_set() and not self.removed.is_set():
            self.kill_all(self._grace())
            if self.phase not in ("Succeeded", "Failed"):
                self.phase = self._final_phase()
            self.report()
            try:
                self.agent.api.delete(self.path, {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
            except ApiError as e:
                if e.status not in (404, 409):
                    log(f"{self.ns}/{self.pod_name}: final delete failed: {e}")
        elif self.removed.is_set():
            self.kill_all(0.0)

    def _final_phase(self) -> str:
        codes = [int(c.state.get("terminated", {}).get("exitCode", 1)) for c in self.main]
        return "Succeeded" if codes and all(x == 0 for x in codes) else "Failed"

    def step(self) -> None:
        """One pass of the per-pod state machine."""
        mono = time.monotonic()
        # Init containers, in order; sidecars (restartPolicy Always) start and stay.
        if not self.initialized:
            for c in self.init:
                self.poll(c)
                if c.sidecar and "running" in c.state:
                    continue
                if "terminated" in c.state:
                    if c.sidecar or int(c.state["terminated"]["exitCode"]) != 0:
                        if not self.should_restart(c):
                            self.kill_all(1.0)
                            self.phase = "Failed"
                            return
                        self._backoff(c, mono)
                        return
                    continue  # succeeded: next one
                if "waiting" in c.state and mono >= c.next_start:
                    self.start_container(c)
                return
            self.initialized = True
        for c in self.init:  # sidecars keep running
            if c.sidecar and not c.done:
                self._tick(c, mono)
        for c in self.main:
            if not c.done:
                self._tick(c, mono)
        if all(c.done for c in self.main):
            sidecars = [c for c in self.init if c.sidecar]
            self.kill_all(self._grace(), sidecars)
            self.phase = self._final_phase()
        elif any("running" in c.state or "terminated" in c.state for c in self.main):
            self.phase = "Running"

    def _backoff(self, c: Container, mono: float) -> None:
        if c.next_start <= mono:  # schedule the restart once per termination
            c.last_state = {"terminated": c.state["terminated"]}
            c.restart_count += 1
            c.next_start = mono + c.backoff
            c.backoff = min(c.backoff * 2, BACKOFF_MAX)
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {c.next_start - mono:.0f}s restarting failed container",
                }
            }

    def _tick(self, c: Container, mono: float) -> None:
        if not self.poll(c):
            self.probe(c, mono)
        if "terminated" in c.state:
            if self.should_restart(c):
                self._backoff(c, mono)
            else:
                c.done = True
        elif "waiting" in c.state and mono >= c.next_start:
            self.start_container(c)

"""Local node agent: a tiny kubelet that runs the pods bound to its Node.

A container whose image is in the local podman store (``make images``) runs as a real container
(:mod:`containers`); any other image runs as a local process (the image map, :mod:`podspec`).
Probes are honoured (:mod:`probes`), and pods reach the API server as ``kubernetes.default.svc``
(:mod:`apiservice`).

It registers the Node (cpu/memory of this machine, a configurable ``nvidia.com/gpu``
count, 110 pods), keeps it Ready with a status heartbeat and a Lease in
``kube-node-lease``, watches pods with ``spec.nodeName=<node>`` and runs each one in a
worker thread that polls its processes and reports status like a kubelet.

Host layout (under the cluster state dir)::

    pods/<ns>_<pod>_<uid>/<container>.log     container output (appended across restarts)
    pods/<ns>_<pod>_<uid>/volumes/<volume>/   emptyDir/configMap/secret/downwardAPI/projected
    pods/<ns>_<pod>_<uid>/rootfs/<workingDir> a workingDir that is neither mounted nor on the host
    volumes/<ns>/<claimName>/                 persistentVolumeClaim volumes (kept across pods)

Claims: the agent creates a default StorageClass ``local`` and, acting as its
provisioner, answers every pending claim of that class (or of no class) with a
pre-bound hostPath PersistentVolume pointing at ``volumes/<ns>/<claimName>/``; the
persistentvolume-binder controller then binds them, so the scheduler's VolumeBinding
plugin sees Bound claims exactly as on a real cluster.
    run/pods/<uid>_<container>.pid            live container processes (for cleanup)

See :mod:`finetune_localcluster.podspec` for the path and image rules. Every container
process gets ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and ``KUBERNETES_SERVICE_PORT`` of the
real API server. Resource requests/limits are recorded by the scheduler, not enforced.
``kubectl logs`` is served by :mod:`finetune_localcluster.logserver`.

Run: ``python -m finetune_localcluster.node --state-dir DIR --kubeconfig FILE``
(the cluster module starts it).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import apiservice, mountns, podspec, procs
from .containers import Podman
from .images import podman_env
from .logserver import LogServer
from .probes import ContainerProbes
from .rest import ApiError, Obj, Rest, q

PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
RESYNC_SECONDS = 300
# Volumes appear at their real mount paths (a private mount namespace per container), so programs
# with fixed paths (in-cluster clients, /mnt/pvc) work. Without the privilege for it, or with
# FINETUNE_NODE_MOUNT_NAMESPACES=0, mount paths in command/args/env are rewritten instead.
USE_MOUNT_NAMESPACES = os.environ.get("FINETUNE_NODE_MOUNT_NAMESPACES", "1") != "0" and mountns.available()
STORAGE_CLASS = "local"
PROVISIONER = "finetune.dev/local-node"


def claim_dir(state_dir: Path, namespace: str, claim: str) -> Path:
    """Host directory backing a PersistentVolumeClaim (kept after the pod ends)."""
    return state_dir / "volumes" / namespace / claim


HEARTBEAT_SECONDS = 10.0
BACKOFF_START, BACKOFF_MAX = 1.0, 10.0


def now() -> str:
    """RFC 3339 time, seconds precision."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """RFC 3339 with microseconds (for Lease renewTime, a MicroTime)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(msg: str) -> None:
    print(f"{now()} node-agent: {msg}", flush=True)


class NotReadyError(RuntimeError):
    """A referenced object (configMap, secret, SA token) is missing; retry later."""


@dataclass
class Container:
    """Runtime state of one container of a pod."""

    spec: Obj
    init: bool = False
    sidecar: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    next_start: float = 0.0
    backoff: float = BACKOFF_START
    done: bool = False  # terminated and will not restart
    env: dict[str, str] = field(default_factory=dict)  # of the running process (exec probes use it)
    probes: ContainerProbes | None = None  # of the current run
    podman_name: str | None = None  # when it runs as a podman container (image in the local store)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def ready(self) -> bool:
        """Running and passing its startup and readiness probes (if it has them)."""
        return "running" in self.state and (self.probes is None or self.probes.ready)

    def status(self) -> Obj:
        running = "running" in self.state
        s: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "local://" + str(self.spec.get("image", "")),
            "ready": self.ready,
            "started": running and (self.probes is None or self.probes.started),
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            s["containerID"] = f"local://{self.proc.pid}"
        return s


class PodWorker(threading.Thread):
    """Runs one pod to completion (or deletion), reporting status as it goes."""

    def __init__(self, agent: Agent, pod: Obj) -> None:
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
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.volumes_ready = False
        self.initialized = not any(not c.sidecar for c in self.init)
        self.tokens: list[tuple[Path, Obj, float]] = []  # (file, request, refresh_at)
        self._last_status: str = ""
        self._transitions: dict[str, tuple[str, str]] = {}
        self.mounts: dict[str, list[tuple[str, str]]] = {}
        self.binds: dict[str, list[tuple[str, str, bool]]] = {}

    # -------------------------------------------------------------- API helpers

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}"

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
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
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

    # -------------------------------------------------------------- volumes

    def _write_files(self, base: Path, files: dict[str, bytes], mode: int) -> None:
        base.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            f = base / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp")
            tmp.write_bytes(data)
            tmp.chmod(mode)
            tmp.replace(f)

    def _object_files(self, kind: str, name: str, items: list[Obj] | None, optional: bool) -> dict[str, bytes]:
        plural = "configmaps" if kind == "configMap" else "secrets"
        try:
            obj = self.agent.api.get(f"/api/v1/namespaces/{self.ns}/{plural}/{q(name)}")
        except ApiError as e:
            if e.status == 404 and optional:
                return {}
            raise NotReadyError(f"{kind} {self.ns}/{name} not found") from e
        data: dict[str, bytes] = {}
        if kind == "configMap":
            data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        if items:
            picked = {}
            for it in items:
                if it["key"] not in data:
                    if optional:
                        continue
                    raise NotReadyError(f"{kind} {self.ns}/{name} has no key {it['key']}")
                picked[it["path"]] = data[it["key"]]
            return picked
        return data

    def _downward_files(self, items: list[Obj]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with self.lock:
            pod = self.pod
        for it in items:
            if "fieldRef" in it:
                out[it["path"]] = podspec.field_value(pod, it["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in it:
                ref = it["resourceFieldRef"]
                out[it["path"]] = podspec.resource_value(
                    pod, ref, ref.get("containerName", ""), self.agent.allocatable
                ).encode()
        return out

    def _token(self, src: Obj) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        req: Obj = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [src["audience"]] if src.get("audience") else [],
                "expirationSeconds": int(src.get("expirationSeconds") or 3600),
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.pod_name, "uid": self.uid},
            },
        }
        try:
            resp = self.agent.api.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{q(sa)}/token", req)
        except ApiError as e:
            raise NotReadyError(f"token for serviceaccount {self.ns}/{sa}: {e}") from e
        return str(resp["status"]["token"])

    def prepare_volumes(self) -> None:
        """Materialise every volume under the pod dir (raises NotReadyError to retry)."""
        vols: dict[str, Path] = {}
        for v in self.pod["spec"].get("volumes", []):
            name = v["name"]
            d = self.dir / "volumes" / name
            if "hostPath" in v:
                d = Path(v["hostPath"]["path"])
                if v["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                    d.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in v:
                d = claim_dir(self.agent.state_dir, self.ns, v["persistentVolumeClaim"]["claimName"])
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o777)  # writable by a container's non-root user, like a fresh volume
            elif "emptyDir" in v:
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o777)  # kubelet creates emptyDirs world-writable
            elif "configMap" in v or "secret" in v:
                kind = "configMap" if "configMap" in v else "secret"
                src = v[kind]
                name_key = "name" if kind == "configMap" else "secretName"
                files = self._object_files(kind, src[name_key], src.get("items"), bool(src.get("optional")))
                self._write_files(d, files, int(src.get("defaultMode", 0o644)))
            elif "downwardAPI" in v:
                src = v["downwardAPI"]
                self._write_files(d, self._downward_files(src.get("items", [])), int(src.get("defaultMode", 0o644)))
            elif "projected" in v:
                mode = int(v["projected"].get("defaultMode", 0o644))
                for s in v["projected"].get("sources", []):
                    if "serviceAccountToken" in s:
                        st = s["serviceAccountToken"]
                        self._write_files(d, {st["path"]: self._token(st).encode()}, mode)
                        ttl = int(st.get("expirationSeconds") or 3600)
                        self.tokens.append((d / st["path"], st, time.monotonic() + 0.8 * ttl))
                    elif "configMap" in s or "secret" in s:
                        kind = "configMap" if "configMap" in s else "secret"
                        src = s[kind]
                        files = self._object_files(kind, src["name"], src.get("items"), bool(src.get("optional")))
                        self._write_files(d, files, mode)
                    elif "downwardAPI" in s:
                        self._write_files(d, self._downward_files(s["downwardAPI"].get("items", [])), mode)
            else:
                d.mkdir(parents=True, exist_ok=True)  # unsupported type: an empty dir
            vols[name] = d
        for c in self.init + self.main:
            mounts = []
            binds: list[tuple[str, str, bool]] = []
            for m in c.spec.get("volumeMounts", []):
                host = vols.get(m["name"])
                if host is None:
                    raise NotReadyError(f"container {c.name}: no volume named {m['name']}")
                if m.get("subPath"):
                    host = host / m["subPath"]
                    host.mkdir(parents=True, exist_ok=True)
                mounts.append((str(m["mountPath"]), str(host)))
                binds.append((str(host), str(m["mountPath"]), bool(m.get("readOnly"))))
            if self.agent.hosts_file is not None:  # kubernetes.default.svc -> the agent's forwarder
                binds.append((str(self.agent.hosts_file), "/etc/hosts", True))
            # With mount namespaces the volumes are at their real paths, so nothing is rewritten
            # (rewriting would also mangle host paths that merely lie under a mount path, such as
            # a checkout in /tmp when a pod mounts /tmp).
            self.mounts[c.name] = [] if USE_MOUNT_NAMESPACES else mounts
            self.binds[c.name] = binds

    def refresh_tokens(self) -> None:
        """Rotate projected tokens at 80% of their lifetime, like kubelet."""
        for i, (f, st, at) in enumerate(self.tokens):
            if time.monotonic() >= at:
                try:
                    self._write_files(f.parent, {f.name: self._token(st).encode()}, 0o644)
                    ttl = int(st.get("expirationSeconds") or 3600)
                    self.tokens[i] = (f, st, time.monotonic() + 0.8 * ttl)
                except (NotReadyError, OSError) as e:
                    log(f"{self.ns}/{self.pod_name}: token refresh failed: {e}")

    # -------------------------------------------------------------- processes

    def _lookup(self, kind: str, name: str, key: str, optional: bool) -> str | None:
        files = self._object_files(kind, name, [{"key": key, "path": key}], optional)
        return files[key].decode(errors="replace") if key in files else None

    def build_env(self, c: Container) -> dict[str, str]:
        """The process environment: passthrough, service env, envFrom, then env."""
        mounts = self.mounts.get(c.name, [])
        port = str(self.agent.api.port)
        env: dict[str, str] = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.update(
            {
                "HOSTNAME": str(self.pod["spec"].get("hostname") or self.pod_name),
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
                "KUBERNETES_PORT_443_TCP": f"tcp://127.0.0.1:{port}",
                "KUBERNETES_PORT_443_TCP_ADDR": "127.0.0.1",
                "KUBERNETES_PORT_443_TCP_PORT": port,
                "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
                "FINETUNE_POD_DIR": str(self.dir),
                "FINETUNE_NODE_NAME": self.agent.node_name,
            }
        )
        env.update(podspec.gpu_env(c.spec))
        env.update(podspec.mounts_env(mounts))
        for ef in c.spec.get("envFrom", []):
            prefix = ef.get("prefix", "")
            for kind in ("configMap", "secret"):
                ref = ef.get(f"{kind}Ref")
                if ref:
                    files = self._object_files(kind, ref["name"], None, bool(ref.get("optional")))
                    env.update({prefix + k: v.decode(errors="replace") for k, v in files.items()})
        with self.lock:
            pod = self.pod
        for e in c.spec.get("env", []):
            name = e["name"]
            if "value" in e:
                val: str | None = podspec.expand(str(e["value"]), env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    val = podspec.field_value(pod, vf["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in vf:
                    val = podspec.resource_value(pod, vf["resourceFieldRef"], c.name, self.agent.allocatable)
                elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                    kind = "configMap" if "configMapKeyRef" in vf else "secret"
                    ref = vf[f"{kind}KeyRef"]
                    val = self._lookup(kind, ref["name"], ref["key"], bool(ref.get("optional")))
                else:
                    val = None
            else:
                val = ""
            if val is not None:
                env[name] = podspec.rewrite_paths(val, mounts)
        return env

    def argv(self, c: Container, env: dict[str, str]) -> list[str]:
        """Resolve command/args (with the image map when command is empty)."""
        command = [podspec.expand(str(a), env) for a in c.spec.get("command", [])]
        args = [podspec.expand(str(a), env) for a in c.spec.get("args", [])]
        if not command:
            mapped = podspec.image_command(str(c.spec.get("image", "")))
            if mapped:
                entry, default_cmd = mapped
                command, args = entry, args or default_cmd
        argv = [podspec.rewrite_paths(a, self.mounts.get(c.name, [])) for a in command + args]
        if not argv:
            raise NotReadyError(
                f"image {c.spec.get('image')!r} is not in the image map and the container has no command"
            )
        if "/" not in argv[0]:
            found = shutil.which(argv[0], path=env.get("PATH"))
            if not found:
                raise FileNotFoundError(f"{argv[0]!r} not found on PATH")
            argv[0] = found
        return argv

    def workdir(self, c: Container) -> Path:
        wd = c.spec.get("workingDir")
        if not wd:
            d = self.dir / "work"
        else:
            rewritten = podspec.rewrite_paths(str(wd), self.mounts.get(c.name, []))
            d = Path(rewritten)
            if rewritten == wd and not d.is_dir():
                d = self.dir / "rootfs" / str(wd).lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def podman_argv(self, c: Container, image_user: str) -> tuple[list[str], dict[str, str]]:
        """``podman run`` for ``c`` and the environment podman runs with (it passes env by name)."""
        env = {k: v for k, v in self.build_env(c).items() if k not in PASSTHROUGH_ENV}  # the image's own
        c.podman_name = f"ftl-{self.uid[:13]}-{c.name}-{c.restart_count}"
        binds = [b for b in self.binds.get(c.name, []) if b[1] != "/etc/hosts"]
        hosts = {}
        if self.agent.api_service is not None:
            hosts = dict.fromkeys(apiservice.SERVICE_NAMES, self.agent.api_service.address)
        with self.lock:
            pod = self.pod
        argv = self.agent.podman.run_argv(c.podman_name, pod, c.spec, sorted(env), binds, hosts, image_user)
        return argv, {**podman_env(), **env}

    def start_container(self, c: Container) -> None:
        """Spawn the container: a podman container when its image is in the local store, else a
        process (its own process group either way)."""
        image_user = self.agent.podman.image_user(str(c.spec.get("image", ""))) if USE_MOUNT_NAMESPACES else None
        c.podman_name = None
        try:
            if image_user is not None:
                argv, env = self.podman_argv(c, image_user)
                cwd = self.dir
            else:
                env = self.build_env(c)
                argv = self.argv(c, env)
                cwd = self.workdir(c)
            if USE_MOUNT_NAMESPACES and image_user is None:
                binds = mountns.plan(self.binds.get(c.name, []), [self.agent.state_dir.resolve()])
                wd = c.spec.get("workingDir")
                inside = bool(wd) and mountns.under_binds(str(wd), binds)
                argv = mountns.wrap(argv, binds, workdir=str(wd) if inside else None)
                cwd = self.dir if inside else cwd
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
                argv,
                cwd=cwd,
                env=env,
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
        c.env = env
        c.probes = ContainerProbes(c.spec, time.monotonic())

    def exec_in(self, c: Container, argv: list[str], timeout: float) -> int:
        """Run ``argv`` as the container would (its env and mounts): exec probes."""
        if c.podman_name is not None:
            argv = self.agent.podman.exec_argv(c.podman_name, argv)
            done = subprocess.run(argv, env=podman_env(), capture_output=True, timeout=timeout, check=False)
            return done.returncode
        if argv and "/" not in argv[0]:
            argv = [shutil.which(argv[0], path=c.env.get("PATH")) or argv[0], *argv[1:]]
        if USE_MOUNT_NAMESPACES and c.proc is not None:
            # Into the container's own mount namespace, as kubelet's exec does: no interpreter to
            # start (a probe's 1 s default timeout is for the command, not for setting it up).
            argv = ["nsenter", f"--target={c.proc.pid}", "--mount", "--", *argv]
        done = subprocess.run(argv, env=c.env, cwd=self.dir, capture_output=True, timeout=timeout, check=False)
        return done.returncode

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
        if c.podman_name is not None:
            self.agent.podman.remove(c.podman_name)

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
                    self.prepare_volumes()
                    self.volumes_ready = True
                except NotReadyError as e:
                    for c in self.init + self.main:
                        c.state = {"waiting": {"reason": "ContainerCreating", "message": str(e)}}
                    self.report()
                    self.deleting.wait(0.5)
                    continue
            self.step()
            self.refresh_tokens()
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


class Agent:
    """Registers the Node, heartbeats, and dispatches pods to workers."""

    def __init__(self, api: Rest, state_dir: Path, node_name: str, gpus: int) -> None:
        self.api = api
        self.state_dir = state_dir
        self.node_name = node_name
        self.gpus = gpus
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.log_port = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        mem_kib = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        self.allocatable = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{mem_kib}Ki",
            "ephemeral-storage": f"{shutil.disk_usage(state_dir).total // 1024}Ki",
            "pods": "110",
            "nvidia.com/gpu": str(gpus),
        }
        (state_dir / "run" / "pods").mkdir(parents=True, exist_ok=True)
        self.hosts_file: Path | None = None  # set once the kubernetes Service stand-in listens
        self.api_service: apiservice.Forwarder | None = None
        self.podman = Podman()

    def serve_api_service(self) -> None:
        """``kubernetes.default.svc:443`` for in-cluster clients (see :mod:`apiservice`)."""
        if not USE_MOUNT_NAMESPACES:
            log("no mount namespaces: pods reach the API server by KUBERNETES_SERVICE_HOST only")
            return
        address = apiservice.service_address(self.api.port)
        try:
            self.api_service = apiservice.Forwarder(address, (self.api.host, self.api.port))
        except OSError as e:
            log(f"cannot listen on {address}:{apiservice.SERVICE_PORT} ({e}): no kubernetes.default.svc in pods")
            return
        self.hosts_file = apiservice.write_hosts(self.state_dir / "run" / "hosts", address)

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
        self.log_port = server.port

    def pidfile(self, uid: str, container: str) -> Path:
        return self.state_dir / "run" / "pods" / f"{uid}_{container}.pid"

    def forget(self, uid: str) -> None:
        """Drop a finished worker; later (stale) events for its pod must not rerun it."""
        with self.lock:
            self.workers.pop(uid, None)
            self.finished.add(uid)

    # -------------------------------------------------------------- node

    def node_status(self) -> Obj:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
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
                "architecture": arch,
            },
        }

    def register(self) -> None:
        """Create (or adopt) the Node object and post a Ready status."""
        self.started = now()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
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
        # creation; the node-lifecycle controller (not run here) would lift it once Ready.
        taints = self.node.get("spec", {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != "node.kubernetes.io/not-ready"]
        if kept != taints:
            self.node = self.api.patch(
                f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": kept or None}}, kind="merge-patch"
            )
        self.api.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})
        self.renew_lease()
        log(f"registered node {self.node_name} with {self.allocatable}")

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.api.patch(path, {"spec": spec}, kind="merge-patch")
        except ApiError as e:
            if e.status != 404:
                raise
            self.api.post(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node_name,
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.node_name,
                                "uid": self.node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": spec,
                },
            )

    def heartbeat(self) -> None:
        n = 0
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.renew_lease()
                n += 1
                if n % 3 == 0:
                    self.api.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()})
            except (ApiError, OSError) as e:
                log(f"heartbeat failed: {e}")

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

    # -------------------------------------------------------------- volumes

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

    def watch_claims(self) -> None:
        base = "/api/v1/persistentvolumeclaims"
        while not self.stopping.is_set():
            try:
                lst = self.api.get(base)
                rv = lst["metadata"]["resourceVersion"]
                for pvc in lst.get("items", []):
                    self.provision(pvc)
                while not self.stopping.is_set():
                    for ev in self.api.watch(f"{base}?resourceVersion={rv}", timeout=RESYNC_SECONDS):
                        obj = ev.get("object", {})
                        if ev["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), json.dumps(obj))
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev["type"] in ("ADDED", "MODIFIED"):
                            self.provision(obj)
            except (ApiError, OSError, ValueError, KeyError) as e:
                if self.stopping.is_set():
                    return
                if not (isinstance(e, ApiError) and e.status == 410):
                    log(f"claim watch restarting: {e}")
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
        for f in (self.state_dir / "run" / "pods").glob("*.pid"):
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
    a = p.parse_args(argv)
    agent = Agent(Rest.from_kubeconfig(a.kubeconfig), a.state_dir.resolve(), a.node_name, a.gpus)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        agent.serve_logs()
        agent.serve_api_service()
        agent.register()
        agent.ensure_storage_class()
        threading.Thread(target=agent.heartbeat, name="heartbeat", daemon=True).start()
        threading.Thread(target=agent.watch_claims, name="claims", daemon=True).start()
        agent.watch_pods()
    finally:
        log("shutting down: stopping pod processes")
        agent.shutdown()
        log("stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()

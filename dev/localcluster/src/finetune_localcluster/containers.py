"""The container runtime of the local node: podman, for pods whose image is in the local store.

A pod whose image was built here (``make images``) runs as a real container, so what users
install is what the tests run; any other image keeps the process runtime (image map, see
:mod:`podspec`). The container is started attached (``podman run`` in the foreground, signals
proxied), so the node agent treats it like a process: its output is the container log, its exit
status the container's, and SIGTERM reaches the container's PID 1. After the grace period the
container is removed with ``podman rm --force``.

- host network: the API server on loopback is reachable, ports are the node's;
- volumes (emptyDir, configMap, secret, projected token, PVC) bind-mounted at their real paths,
  read-only where asked; ``kubernetes.default.svc`` resolves through ``--add-host``;
- env (passed by name from podman's environment, so values never appear in ``ps``);
- ``securityContext``: runAsUser/runAsGroup, runAsNonRoot (refused with a clear message when the
  image would run as root), readOnlyRootFilesystem, capabilities, allowPrivilegeEscalation.

Every container carries the label ``finetune.dev/node-agent=<owner>`` (a hash of the cluster's
state dir and the node name): a node agent that was SIGKILLed cannot remove its containers, so the
next agent of the same node removes them (:meth:`Podman.sweep`) before it runs pods, without
touching the containers of other local clusters on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from finetune_localcluster.rest import Obj

_STORE_TTL = 10.0
OWNER_LABEL = "finetune.dev/node-agent"
CONTAINERS_CONF = Path(__file__).resolve().parents[3] / "containers.conf"
"""dev/containers.conf: the project's podman configuration."""


def podman_env() -> dict[str, str]:
    """The environment podman/buildah run with: the project's containers.conf, nothing machine-wide."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def owner_id(state_dir: Path, node_name: str) -> str:
    """The label value of one node agent's containers: stable across its restarts."""
    return hashlib.sha256(f"{state_dir.resolve()}\0{node_name}".encode()).hexdigest()[:16]


class Podman:
    """Asks the local image store, builds ``podman run`` command lines, removes containers."""

    def __init__(self, owner: str) -> None:
        self.binary = shutil.which("podman")
        self.owner = owner
        self._known: dict[str, tuple[float, str | None]] = {}  # image -> (checked at, user or None)
        self._lock = threading.Lock()

    def image_user(self, image: str) -> str | None:
        """The image's configured user when the image is in the local store, else None."""
        if not self.binary or not image:
            return None
        with self._lock:
            hit = self._known.get(image)
            if hit and time.monotonic() - hit[0] < _STORE_TTL:
                return hit[1]
        proc = subprocess.run(
            [self.binary, "image", "inspect", "--format", "{{json .Config.User}}", image],
            env=podman_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        user = str(json.loads(proc.stdout.strip() or '""')) if proc.returncode == 0 else None
        with self._lock:
            self._known[image] = (time.monotonic(), user)
        return user

    def run_argv(
        self,
        name: str,
        pod: Obj,
        container: Obj,
        env_names: list[str],
        binds: list[tuple[str, str, bool]],
        hosts: dict[str, str],
        image_user: str,
    ) -> list[str]:
        """``podman run`` for one container of a pod (raises ValueError for a spec it must refuse)."""
        assert self.binary
        pod_sc: Obj = pod["spec"].get("securityContext") or {}
        sc: Obj = container.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            effective = str(uid) if uid is not None else (image_user.split(":", maxsplit=1)[0] or "root")
            if effective in ("0", "root"):
                raise ValueError("container has runAsNonRoot and image will run as root")
        argv = [self.binary, "run", "--rm", f"--name={name}", f"--label={OWNER_LABEL}={self.owner}"]
        argv += ["--network=host", "--pull=never", "--sig-proxy=true"]
        if uid is not None:
            argv.append(f"--user={uid}" + (f":{gid}" if gid is not None else ""))
        for group in pod_sc.get("supplementalGroups", []) + ([pod_sc["fsGroup"]] if "fsGroup" in pod_sc else []):
            argv.append(f"--group-add={group}")
        if sc.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        caps = sc.get("capabilities") or {}
        argv += [f"--cap-drop={c}" for c in caps.get("drop", [])]
        argv += [f"--cap-add={c}" for c in caps.get("add", [])]
        if sc.get("allowPrivilegeEscalation") is False:
            argv.append("--security-opt=no-new-privileges")
        if sc.get("privileged"):
            argv.append("--privileged")
        argv += [f"--env={k}" for k in env_names]
        argv += [f"--volume={host}:{path}" + (":ro" if ro else "") for host, path, ro in binds]
        argv += [f"--add-host={host}:{ip}" for host, ip in hosts.items()]
        if container.get("workingDir"):
            argv.append(f"--workdir={container['workingDir']}")
        if container.get("command"):
            argv.append("--entrypoint=" + json.dumps([str(a) for a in container["command"]]))
        return [*argv, str(container["image"]), *(str(a) for a in container.get("args", []))]

    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        """An exec probe inside the running container."""
        assert self.binary
        return [self.binary, "exec", name, *argv]

    def remove(self, name: str) -> None:
        """Make sure the container is gone (after SIGKILL reached only the attached podman)."""
        if self.binary:
            subprocess.run(
                [self.binary, "rm", "--force", "--time=0", "--ignore", name],
                env=podman_env(),
                capture_output=True,
                check=False,
            )

    def sweep(self) -> list[str]:
        """Remove every container of this owner (left by a killed agent); their names."""
        if not self.binary:
            return []
        listed = subprocess.run(
            [self.binary, "ps", "--all", "--filter", f"label={OWNER_LABEL}={self.owner}", "--format", "{{.Names}}"],
            env=podman_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        names = listed.stdout.split() if listed.returncode == 0 else []
        for name in names:
            self.remove(name)
        return names

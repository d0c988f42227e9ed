"""The one interface between a pod worker and the two container runtimes of the local node.

A runtime turns a container spec into a :class:`Launch` (command line, environment, working
directory) that the worker spawns in its own process group; it runs exec probes inside the
container and cleans up after the process group was killed. :mod:`runtime_process` runs host
processes (the image map, private mount namespaces); :mod:`runtime_podman` runs podman
containers for images in the local store.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from finetune_localcluster import mountns
from finetune_localcluster.probes import ContainerProbes
from finetune_localcluster.projection import PodProjection
from finetune_localcluster.rest import Obj

# Volumes appear at their real mount paths (a private mount namespace per container), so programs
# with fixed paths (in-cluster clients, /mnt/pvc) work. Without the privilege for it, or with
# FINETUNE_NODE_MOUNT_NAMESPACES=0, mount paths in command/args/env are rewritten instead.
USE_MOUNT_NAMESPACES = os.environ.get("FINETUNE_NODE_MOUNT_NAMESPACES", "1") != "0" and mountns.available()
BACKOFF_START, BACKOFF_MAX = 1.0, 10.0


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
    runtime: Runtime | None = None  # of the current run
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


@dataclass(frozen=True)
class PodContext:
    """What a runtime needs of the pod and the node."""

    projection: PodProjection
    api_port: int
    state_dir: Path


@dataclass(frozen=True)
class Launch:
    """A container's process: spawned by the worker in its own session, output to the log."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


class Runtime(Protocol):
    def launch(self, pod: PodContext, c: Container) -> Launch:
        """The process for ``c`` (NotReadyError/ValueError: config error; OSError/KeyError: start error)."""

    def exec(self, pod: PodContext, c: Container, argv: list[str], timeout: float) -> int:
        """Run ``argv`` inside the running container (exec probes); its exit status."""

    def stopped(self, c: Container) -> None:
        """After the container's process group was killed: leave no container behind."""

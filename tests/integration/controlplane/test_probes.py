"""Probes on the local node: Ready means the readiness probe passes; a failing liveness probe restarts."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from .conftest import Kube, pod, wait_for

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(kube: Kube, name: str) -> tuple[str, bool]:
    status = kube.pod(name)["status"]
    conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
    statuses = status.get("containerStatuses") or [{}]
    return conds.get("Ready", "False"), bool(statuses[0].get("ready"))


def test_pod_is_ready_only_once_its_http_readiness_probe_passes(kube: Kube, tmp_path: Path) -> None:
    port, flag = _free_port(), tmp_path / "serve"
    # The server comes up only when the test says so: until then the process runs but cannot serve.
    script = f"while [ ! -f {flag} ]; do sleep 0.1; done; exec {sys.executable} -m http.server {port} --bind 0.0.0.0"
    probe = {"httpGet": {"path": "/", "port": "web"}, "periodSeconds": 1, "failureThreshold": 1}
    kube.apply(
        pod(
            "web",
            ["sh", "-c", script],
            restartPolicy="Always",
            terminationGracePeriodSeconds=1,
            container={"ports": [{"name": "web", "containerPort": port}], "readinessProbe": probe},
        )
    )
    kube.pod_phase("web", "Running")
    for _ in range(3):  # three probe periods: the probe runs and fails while nothing listens
        assert _ready(kube, "web") == ("False", False)
        time.sleep(1)
    flag.touch()
    wait_for("Ready after the server starts", lambda: _ready(kube, "web") == ("True", True), 20)


def test_failing_liveness_probe_restarts_the_container(kube: Kube) -> None:
    # The initial delay lets each run print before it is probed (process start-up is slow under load).
    probe = {
        "exec": {"command": ["sh", "-c", "exit 1"]},
        "initialDelaySeconds": 4,
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    kube.apply(
        pod(
            "sick",
            ["sh", "-c", "echo up; exec sleep 300"],
            restartPolicy="Always",
            terminationGracePeriodSeconds=1,
            container={"livenessProbe": probe},
        )
    )

    def restarted() -> dict[str, object] | None:
        cs = (kube.pod("sick")["status"].get("containerStatuses") or [{}])[0]
        return cs if cs.get("restartCount", 0) >= 1 else None

    cs = wait_for("a restart after the liveness probe fails", restarted, 30)
    last = cs["lastState"]["terminated"]  # type: ignore[index]
    assert "Liveness probe failed 2 times" in last["message"]
    wait_for("the container to run again (after the back-off)", lambda: kube.logs("sick").split().count("up") >= 2, 60)


def test_exec_probe_runs_inside_the_containers_mounts(kube: Kube) -> None:
    # /data exists only in the container's mount namespace: a probe run on the host never passes.
    probe = {"exec": {"command": ["test", "-f", "/data/ready"]}, "periodSeconds": 1}
    kube.apply(
        pod(
            "mounted",
            ["sh", "-c", "sleep 1; touch /data/ready; exec sleep 300"],
            restartPolicy="Always",
            terminationGracePeriodSeconds=1,
            container={"readinessProbe": probe, "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            volumes=[{"name": "data", "emptyDir": {}}],
        )
    )
    wait_for(
        "Ready once the file exists in the container's volume", lambda: _ready(kube, "mounted") == ("True", True), 30
    )

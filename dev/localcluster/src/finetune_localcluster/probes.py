"""Startup, readiness and liveness probes, run by the node agent the way kubelet runs them.

Without them a pod is "Ready" the moment its process starts, which is not what Ready means in a
cluster: a Deployment would report ``1/1`` while the program inside still cannot serve. Probes
are evaluated on the pod worker's loop (each probe is bounded by its ``timeoutSeconds``):

- ``httpGet`` (HTTP or HTTPS without verification, like kubelet; 200-399 passes), ``tcpSocket``
  (a connect) and ``exec`` (exit status 0) are supported; a ``grpc`` probe always fails, with a
  message saying so, rather than passing unchecked;
- the host is the pod IP (loopback: pods share the node's network), ports may be named;
- ``initialDelaySeconds``, ``periodSeconds``, ``timeoutSeconds``, ``successThreshold`` and
  ``failureThreshold`` mean what they mean to kubelet; a liveness or startup probe that reaches
  its failure threshold asks for the container to be killed (then the restart policy decides).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from finetune_localcluster.rest import Obj

ExecRunner = Callable[[list[str], float], int]
"""Runs a probe's command for the container (its environment and mounts) with a timeout."""

KINDS = ("startupProbe", "livenessProbe", "readinessProbe")


def _port(value: object, container: Obj) -> int:
    """A probe port: a number, or the name of one of the container's ports."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    for p in container.get("ports", []):
        if p.get("name") == value:
            return int(p["containerPort"])
    raise ValueError(f"no container port named {value!r}")


def check(probe: Obj, container: Obj, run_exec: ExecRunner, pod_ip: str = "127.0.0.1") -> tuple[bool, str]:
    """Run one probe once: ``(passed, why it failed)``; httpGet and tcpSocket go to ``pod_ip``."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host = get.get("host") or pod_ip
            port = _port(get["port"], container)
            conn: http.client.HTTPConnection
            if str(get.get("scheme", "HTTP")).upper() == "HTTPS":
                conn = http.client.HTTPSConnection(
                    host,
                    port,
                    timeout=timeout,
                    context=ssl._create_unverified_context(),
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                conn.request("GET", get.get("path", "/"), headers={"User-Agent": "kube-probe/local", **headers})
                code = conn.getresponse().status
            finally:
                conn.close()
            return (200 <= code < 400), f"HTTP probe failed with statuscode: {code}"
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            with socket.create_connection((tcp.get("host") or pod_ip, _port(tcp["port"], container)), timeout):
                return True, ""
        if "exec" in probe:
            rc = run_exec([str(a) for a in probe["exec"].get("command", [])], timeout)
            return rc == 0, f"exec probe exited with {rc}"
        if "grpc" in probe:
            return False, "grpc probes are not supported by the local node agent"
        return False, "probe has no handler (httpGet, tcpSocket or exec)"
    except (OSError, ValueError, http.client.HTTPException, subprocess.SubprocessError) as e:
        return False, f"probe failed: {e}"


@dataclass
class _Probe:
    spec: Obj
    due: float
    successes: int = 0
    failures: int = 0
    passing: bool = False
    message: str = ""


@dataclass
class ContainerProbes:
    """The probes of one container run (reset when the container restarts)."""

    container: Obj
    started_at: float
    pod_ip: str = "127.0.0.1"
    probes: dict[str, _Probe] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in KINDS:
            spec = self.container.get(kind)
            if spec:
                self.probes[kind] = _Probe(spec, self.started_at + float(spec.get("initialDelaySeconds", 0)))

    @property
    def started(self) -> bool:
        """Startup probe passed (or there is none): liveness and readiness begin only then."""
        startup = self.probes.get("startupProbe")
        return startup is None or startup.passing

    @property
    def ready(self) -> bool:
        """Started and, with a readiness probe, passing it (kubelet's ``ready``)."""
        readiness = self.probes.get("readinessProbe")
        return self.started and (readiness is None or readiness.passing)

    def tick(self, now: float, run_exec: ExecRunner) -> str | None:
        """Run the probes that are due; return why the container must be killed, or None."""
        for kind in KINDS:
            probe = self.probes.get(kind)
            if probe is None or now < probe.due or (kind != "startupProbe" and not self.started):
                continue
            if kind == "startupProbe" and probe.passing:
                continue  # a startup probe stops once it has passed
            spec = probe.spec
            ok, why = check(spec, self.container, run_exec, self.pod_ip)
            probe.due = now + float(spec.get("periodSeconds", 10))
            if ok:
                probe.failures = 0
                probe.successes += 1
                # Liveness and startup probes must have successThreshold 1 (the API enforces it).
                if probe.successes >= int(spec.get("successThreshold", 1)):
                    probe.passing = True
                continue
            probe.successes = 0
            probe.failures += 1
            probe.message = why
            if probe.failures >= int(spec.get("failureThreshold", 3)):
                probe.passing = False
                if kind != "readinessProbe":
                    label = "Liveness" if kind == "livenessProbe" else "Startup"
                    return f"{label} probe failed {probe.failures} times: {why}"
        return None

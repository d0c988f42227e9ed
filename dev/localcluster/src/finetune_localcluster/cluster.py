"""Start and stop the local control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the node agent, all bound to 127.0.0.1 on free ports.

State directory (``FINETUNE_CLUSTER_DIR``, default ``~/.cache/finetune-operator/cluster``)::

    kubeconfig             admin kubeconfig (system:masters) -- the stable path to use
    cluster.json           ports, pids and versions of the running cluster
    pki/                   CA, serving/client certs, service-account key pair
    etcd/                  etcd data (kept across down/up; ``down --purge`` wipes it)
    logs/<component>.log   each component's stdout+stderr
    run/<component>.pid    "PID STARTTIME" of each component (process-group leaders)
    start.lock             serialises concurrent starts
    pods/, volumes/        see finetune_localcluster.node

Starting a cluster that already runs in the same state dir reuses it (``reuse=True``,
the default) or raises :class:`AlreadyRunningError`. A component that exits or never gets
healthy raises :class:`ComponentFailedError`, naming it and quoting the tail of its log.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_assets import project_cache
from finetune_localcluster import build, kubeconfig, pki, procs
from finetune_localcluster.containers import Podman, owner_id

# Start order; stop runs in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent")
"""The components of a one-node cluster; a cluster of N nodes adds node-agent-2 ... node-agent-N."""
NODE_NAME = "local-node"
ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = [
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "job-controller",
    "cronjob-controller",
    "ttl-after-finished-controller",
    "replicaset-controller",
    "deployment-controller",
    "statefulset-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
    "persistentvolume-binder-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    # Reports each ValidatingAdmissionPolicy's type checking in its status (the trainer-status policy).
    "validatingadmissionpolicy-status-controller",
    # A node whose agent stops renewing its Lease (kube-node-lease) turns Ready=Unknown and is tainted
    # unreachable, so nothing new is scheduled there; its pods are evicted after their toleration (5 min).
    "node-lifecycle-controller",
    "taint-eviction-controller",
]


class ClusterError(RuntimeError):
    """Something about the local cluster is wrong; the message says what."""


class AlreadyRunningError(ClusterError):
    """A healthy cluster already runs in this state dir (and reuse was refused)."""


class ComponentFailedError(ClusterError):
    """A component exited or never became healthy."""

    def __init__(self, component: str, reason: str, log: Path) -> None:
        self.component = component
        self.log = log
        super().__init__(f"{component} {reason}; last lines of {log}:\n{procs.tail(log)}")


def default_state_dir() -> Path:
    """``$FINETUNE_CLUSTER_DIR`` or ``<project cache>/cluster``."""
    env = os.environ.get("FINETUNE_CLUSTER_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return project_cache() / "cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A local control plane rooted at ``state_dir``."""

    state_dir: Path = field(default_factory=default_state_dir)
    gpus: int = 4
    """``nvidia.com/gpu`` capacity of each node."""
    node_name: str = NODE_NAME
    nodes: int = 0
    """Node agents to run (0: as many as the running cluster has, else 1); nodes after the first are
    ``<node_name>-2`` ... (see :meth:`node_names`)."""
    quiet: bool = False
    _popen: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _commands: dict[str, tuple[list[str], dict[str, str] | None]] = field(default_factory=dict, repr=False)

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (cluster-admin via system:masters)."""
        return self.state_dir / "kubeconfig"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def log(self, component: str) -> Path:
        """Log file of ``component``."""
        return self.state_dir / "logs" / f"{component}.log"

    def _pidfile(self, component: str) -> Path:
        return self.state_dir / "run" / f"{component}.pid"

    def node_count(self) -> int:
        return self.nodes or int(self.info().get("nodes", 1))

    def node_names(self) -> list[str]:
        """One per node agent: ``local-node``, ``local-node-2``, ..."""
        return [self.node_name] + [f"{self.node_name}-{i}" for i in range(2, self.node_count() + 1)]

    def components(self) -> tuple[str, ...]:
        agents = tuple("node-agent" if i == 1 else f"node-agent-{i}" for i in range(1, self.node_count() + 1))
        return COMPONENTS[:-1] + agents

    def info(self) -> dict[str, Any]:
        """Contents of cluster.json (ports, versions); empty if never started."""
        try:
            return dict(json.loads(self.info_file.read_text()))
        except (OSError, ValueError):
            return {}

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[localcluster] {msg}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- status

    def pids(self) -> dict[str, int | None]:
        """Live pid of each component (None if not running)."""
        out: dict[str, int | None] = {}
        for c in self.components():
            p = self._popen.get(c)
            if p is not None and p.poll() is not None:
                out[c] = None
                continue
            out[c] = procs.read_pidfile(self._pidfile(c))
        return out

    def status(self) -> dict[str, str]:
        """Per component: "running (pid N)", "healthy", or why not."""
        pids = self.pids()
        info = self.info()
        out: dict[str, str] = {}
        for c, pid in pids.items():
            if pid is None:
                out[c] = "not running"
                continue
            ok = self._healthy(c, info.get("ports", {}))
            out[c] = f"healthy (pid {pid})" if ok else f"running but not healthy (pid {pid})"
        return out

    def is_running(self) -> bool:
        """True if every component runs and the API server is healthy."""
        pids = self.pids()
        return all(pids.values()) and self._healthy("kube-apiserver", self.info().get("ports", {}))

    def check(self) -> None:
        """Raise :class:`ComponentFailedError` for the first component that is not running."""
        pids = self.pids()
        for c in self.components():
            if pids[c] is None:
                raise ComponentFailedError(c, "is not running", self.log(c))

    def _ssl(self, client_cert: bool) -> ssl.SSLContext:
        p = pki.Pki(self.state_dir / "pki")
        if client_cert:
            ctx = ssl.create_default_context(cafile=str(p.ca_cert))
            crt, key = p.client("admin")
            ctx.load_cert_chain(str(crt), str(key))
        else:  # controller-manager/scheduler serve self-signed certs on /healthz
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _get(self, url: str, ctx: ssl.SSLContext | None = None) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")
        except (OSError, ValueError):
            return 0, ""

    def _healthy(self, component: str, ports: dict[str, int]) -> bool:
        if component == "etcd":
            code, body = self._get(f"http://127.0.0.1:{ports.get('etcd')}/health")
            return code == 200 and '"true"' in body
        if component == "kube-apiserver":
            code, _ = self._get(f"https://127.0.0.1:{ports.get('apiserver')}/readyz", self._ssl(True))
            return code == 200
        if component in ("kube-controller-manager", "kube-scheduler"):
            key = "controller-manager" if component == "kube-controller-manager" else "scheduler"
            code, _ = self._get(f"https://127.0.0.1:{ports.get(key)}/healthz", self._ssl(False))
            return code == 200
        if component.startswith("node-agent"):
            index = 0 if component == "node-agent" else int(component.rsplit("-", 1)[1]) - 1
            return self._node_ready(ports, self.node_names()[index])
        return False

    def _node_ready(self, ports: dict[str, int], node: str) -> bool:
        url = f"https://127.0.0.1:{ports.get('apiserver')}/api/v1/nodes/{node}"
        code, body = self._get(url, self._ssl(True))
        if code != 200:
            return False
        conds = json.loads(body).get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

    def _remove_departed_nodes(self, ports: dict[str, int]) -> None:
        """Delete the Nodes of local agents this cluster no longer runs (it ran more nodes before, in this
        state dir): left in place, they would look Ready until the node lifecycle controller's grace
        period ends. Their pods are then orphans, which the pod garbage collector deletes."""
        base = f"https://127.0.0.1:{ports['apiserver']}/api/v1/nodes"
        code, body = self._get(f"{base}?labelSelector=finetune.dev%2Flocal-node%3Dtrue", self._ssl(True))
        if code != 200:
            raise ClusterError(f"could not list the nodes ({code}): {body[:200]}")
        for item in json.loads(body).get("items", []):
            name = str(item["metadata"]["name"])
            if name in self.node_names():
                continue
            request = urllib.request.Request(f"{base}/{name}", method="DELETE")
            try:
                urllib.request.urlopen(request, timeout=5, context=self._ssl(True)).close()
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
            self._say(f"removed node {name}: this cluster runs {self.node_count()} node(s)")

    # ---------------------------------------------------------------- start

    def start(self, *, reuse: bool = True, timeout: float = 90.0) -> Cluster:
        """Start all components and wait until the node is Ready.

        If a healthy cluster already runs here: return it when ``reuse``, else raise
        :class:`AlreadyRunningError`. If only some components run, raise :class:`ClusterError`
        (run :meth:`stop` first) rather than guess. Concurrent starts in the same state
        dir are serialised by a lock file; the later one then finds the cluster running.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "start.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start_locked(reuse, timeout)

    def _start_locked(self, reuse: bool, timeout: float) -> Cluster:
        pids = self.pids()
        running = [c for c, p in pids.items() if p]
        if running:
            if len(running) == len(self.components()) and self.is_running():
                if reuse:
                    self._say(f"cluster already running in {self.state_dir}; reusing it")
                    return self
                raise AlreadyRunningError(
                    f"a cluster is already running in {self.state_dir} "
                    f"(pids {', '.join(f'{c}={pids[c]}' for c in running)}); "
                    "stop it first or reuse it"
                )
            dead = [c for c in self.components() if not pids[c]]
            details = "\n".join(f"--- {c}: last lines of {self.log(c)}:\n{procs.tail(self.log(c), 10)}" for c in dead)
            raise ClusterError(
                f"cluster in {self.state_dir} is partially running (running: {', '.join(running)}; "
                f"not running: {', '.join(dead)}). Run `finetune-dev down` first.\n{details}"
            )
        t0 = time.monotonic()
        bins = build.ensure()
        for d in ("logs", "run", "pods", "volumes"):
            (self.state_dir / d).mkdir(parents=True, exist_ok=True)
        for f in (self.state_dir / "run").glob("*.pid"):
            f.unlink()
        certs = pki.ensure(self.state_dir / "pki")
        ports = {k: free_port() for k in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")}
        info: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "kubeconfig": str(self.kubeconfig),
            "server": f"https://127.0.0.1:{ports['apiserver']}",
            "ports": ports,
            "node_name": self.node_name,
            "nodes": self.node_count(),
            "k8s_version": bins.k8s_version,
            "etcd_version": bins.etcd_version,
            "binaries": str(bins.dir),
        }
        self.info_file.write_text(json.dumps(info, indent=2) + "\n")
        try:
            self._start_all(bins, certs, ports, t0, timeout)
        except BaseException:
            self.stop(quiet=True)
            raise
        info["started_seconds"] = round(time.monotonic() - t0, 2)
        self.info_file.write_text(json.dumps(info, indent=2) + "\n")
        self._say(f"cluster ready in {info['started_seconds']} s; KUBECONFIG={self.kubeconfig}")
        return self

    def _spawn(self, component: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        extra = os.environ.get("FINETUNE_CLUSTER_EXTRA_ARGS_" + component.upper().replace("-", "_"))
        if extra:
            argv = argv + shlex.split(extra)
        logf = self.log(component).open("ab")
        logf.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {shlex.join(argv)}\n".encode())
        logf.flush()
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills the whole group
            env=env,
            cwd=self.state_dir,
        )
        logf.close()
        self._popen[component] = p
        self._commands[component] = (argv, env)
        procs.write_pidfile(self._pidfile(component), p.pid)

    def restart(self, component: str, *, kill: bool = False, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Stop one component (SIGTERM, or SIGKILL with ``kill``), keep it down ``down_seconds``,
        start it again with the same command line and wait until it is healthy: fault injection
        for tests and benchmarks (an API server or etcd restart). Only for a cluster this process
        started (``start`` records the command lines)."""
        if component not in self._commands:
            raise ClusterError(f"{component} was not started by this process; cannot restart it")
        pid = procs.read_pidfile(self._pidfile(component))
        if pid is not None:
            procs.kill_group(pid, 0.0 if kill else 10.0)
        process = self._popen.pop(component, None)
        if process is not None:
            process.wait(timeout=30)
        time.sleep(down_seconds)
        argv, env = self._commands[component]
        self._spawn(component, argv, env)
        self._wait(component, self.info().get("ports", {}), time.monotonic() + timeout)
        self._say(f"{component} restarted")

    def _wait(self, component: str, ports: dict[str, int], deadline: float) -> None:
        while True:
            p = self._popen[component]
            if p.poll() is not None:
                raise ComponentFailedError(
                    component, f"exited with code {p.returncode} during startup", self.log(component)
                )
            if self._healthy(component, ports):
                return
            if time.monotonic() > deadline:
                raise ComponentFailedError(component, "did not become healthy in time", self.log(component))
            time.sleep(0.1)

    def _start_all(
        self, bins: build.Binaries, certs: pki.Pki, ports: dict[str, int], t0: float, timeout: float
    ) -> None:
        deadline = t0 + timeout
        sd = self.state_dir
        self._spawn(
            "etcd",
            [
                str(bins.path("etcd")),
                "--name=local",
                f"--data-dir={sd / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-cluster=local=http://127.0.0.1:{ports['etcd-peer']}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
        )
        # The API server retries etcd itself; starting both at once saves a round trip.
        self._spawn(
            "kube-apiserver",
            [
                str(bins.path("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['apiserver']}",
                f"--tls-cert-file={certs.serving_cert}",
                f"--tls-private-key-file={certs.serving_key}",
                f"--client-ca-file={certs.ca_cert}",
                # Request-header authn config: published to kube-system/extension-apiserver-
                # authentication, which the controller-manager and scheduler read (without
                # it they log an error every few seconds). No front-proxy cert is issued.
                f"--requestheader-client-ca-file={certs.ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--kubelet-client-certificate={certs.client('apiserver-kubelet-client')[0]}",
                f"--kubelet-client-key={certs.client('apiserver-kubelet-client')[1]}",
                # The node's Hostname address is not resolvable; logs go to its InternalIP.
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={certs.sa_pub}",
                f"--service-account-signing-key-file={certs.sa_key}",
                "--authorization-mode=Node,RBAC",
                # PodSecurity is in the default-on set as well; naming it makes the intent explicit.
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,PodSecurity,NodeRestriction,DefaultStorageClass,ResourceQuota,LimitRanger,"
                # As strict as OpenShift: blockOwnerDeletion needs `update` on the owner's finalizers.
                "OwnerReferencesPermissionEnforcement",
                f"--service-cluster-ip-range={pki.SERVICE_CIDR}",
                "--allow-privileged=true",
                # The "kubernetes" Endpoints may not point at a loopback address.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                f"--cert-dir={sd / 'run' / 'apiserver-certs'}",
            ],
        )
        self._wait("etcd", ports, deadline)
        self._say(f"etcd healthy ({time.monotonic() - t0:.1f} s)")
        self._wait("kube-apiserver", ports, deadline)
        self._say(f"kube-apiserver ready ({time.monotonic() - t0:.1f} s)")
        self._remove_departed_nodes(ports)

        server = f"https://127.0.0.1:{ports['apiserver']}"

        def kc(path: Path, client: str, user: str) -> Path:
            crt, key = certs.client(client)
            return kubeconfig.write(path, server, certs.ca_cert, cert=crt, key=key, user=user)

        kc(self.kubeconfig, "admin", "admin")
        cm_kc = kc(sd / "run" / "controller-manager.kubeconfig", "controller-manager", "system:kube-controller-manager")
        sched_kc = kc(sd / "run" / "scheduler.kubeconfig", "scheduler", "system:kube-scheduler")
        self._spawn(
            "kube-controller-manager",
            [
                str(bins.path("kube-controller-manager")),
                f"--kubeconfig={cm_kc}",
                f"--authentication-kubeconfig={cm_kc}",
                f"--authorization-kubeconfig={cm_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['controller-manager']}",
                f"--cert-dir={sd / 'run' / 'controller-manager-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={certs.sa_key}",
                f"--root-ca-file={certs.ca_cert}",
                f"--cluster-signing-cert-file={certs.ca_cert}",
                f"--cluster-signing-key-file={certs.ca_key}",
                f"--service-cluster-ip-range={pki.SERVICE_CIDR}",
                "--controllers=" + ",".join(CONTROLLERS),
                "--concurrent-gc-syncs=5",
            ],
        )
        sched_cfg = sd / "run" / "scheduler-config.yaml"
        sched_cfg.write_text(_scheduler_config(sched_kc))
        self._spawn(
            "kube-scheduler",
            [
                str(bins.path("kube-scheduler")),
                f"--config={sched_cfg}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={sd / 'run' / 'scheduler-certs'}",
            ],
        )
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        agents = self.components()[len(COMPONENTS) - 1 :]
        for index, (agent, node) in enumerate(zip(agents, self.node_names(), strict=True)):
            self._spawn(
                agent,
                [
                    sys.executable,
                    "-m",
                    "finetune_localcluster.node",
                    f"--state-dir={sd}",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--node-name={node}",
                    f"--gpus={self.gpus}",
                    *(["--secondary"] if index else []),
                ],
                env=env,
            )
        for c in ("kube-controller-manager", "kube-scheduler", *agents):
            self._wait(c, ports, deadline)
            self._say(f"{c} healthy ({time.monotonic() - t0:.1f} s)")

    # ---------------------------------------------------------------- stop

    def stop(self, *, purge: bool = False, quiet: bool = False) -> list[str]:
        """Stop every component (SIGTERM, then SIGKILL after a grace period).

        Returns the components that were running. Pod processes left behind by a
        killed node agent are killed too. ``purge`` also deletes etcd data, pods and
        volumes (the PKI is kept so kubeconfigs stay valid).
        """
        stopped: list[str] = []
        for c in reversed(self.components()):
            pid = procs.read_pidfile(self._pidfile(c))
            p = self._popen.pop(c, None)
            if pid is not None:
                grace = 15.0 if c.startswith("node-agent") else 10.0
                if procs.kill_group(pid, grace) and not quiet:
                    self._say(f"{c} (pid {pid}) needed SIGKILL")
                stopped.append(c)
            if p is not None:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self._pidfile(c).unlink(missing_ok=True)
        # Pods whose agent died without cleaning up (pid files are written by the agent).
        for f in (self.state_dir / "run").glob("pods*/*.pid"):  # run/pods, run/pods-<node> (see node.Agent)
            pid = procs.read_pidfile(f)
            if pid is not None:
                procs.kill_group(pid, 2.0)
            f.unlink(missing_ok=True)
        # Their containers too: SIGKILL reached only the `podman run` clients.
        Podman(owner_id(self.state_dir, NODE_NAME)).sweep()
        if purge:
            for d in ("etcd", "pods", "volumes", "logs"):
                shutil.rmtree(self.state_dir / d, ignore_errors=True)
            self.info_file.unlink(missing_ok=True)
        if not quiet:
            self._say(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        return stopped


def _scheduler_config(kubeconfig_path: Path) -> str:
    return (
        "apiVersion: kubescheduler.config.k8s.io/v1\n"
        "kind: KubeSchedulerConfiguration\n"
        "clientConnection:\n"
        f"  kubeconfig: {kubeconfig_path}\n"
        "leaderElection:\n"
        "  leaderElect: false\n"
    )

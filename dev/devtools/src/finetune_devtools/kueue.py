"""Kueue, the real one: built from the Go module proxy, run beside a local control plane.

``go install sigs.k8s.io/kueue/cmd/kueue@VERSION`` builds the manager (a few minutes on 2 cores,
once per machine and version) into ``~/.cache/finetune-operator/kueue/VERSION/kueue``; the CRDs
come from the same module (``config/components/crd/bases``, stored as v1beta2) and are cached
next to it.

How it runs here, and why:

- As a host process with the admin kubeconfig, not as a pod: it needs no image, and the local
  node runs pods as processes anyway.
- Without webhooks. The API server cannot reach a webhook Service (no kube-proxy, and Endpoints
  cannot point at loopback), and none is needed: the operator creates queued Jobs already
  suspended, which is all Kueue's Job webhook would add. Kueue's webhook server still starts
  (its readiness waits for it) on 127.0.0.1 with a certificate from the cluster's CA, but no
  webhook configuration points at it, so nothing in the cluster depends on it.
- Kueue's own certificate management is off (it would patch webhook configurations and Secrets
  that do not exist); the manager then reads its metrics certificate from the fixed path
  ``/etc/kueue/metrics/certs``. That path is given to it honestly, in a private mount namespace
  (``finetune_localcluster.mountns``), so the host's ``/etc`` is never touched.
- The visibility API server is off (``--feature-gates=VisibilityOnDemand=false``): it wants a
  certificate at ``/visibility`` and an APIService, and nothing here uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune_localcluster import build, mountns, pki, procs
from finetune_localcluster.build import cache_root, go_build_into_cache, go_module_dir
from finetune_localcluster.cluster import ClusterError, free_port

KUEUE_VERSION = "v0.17.0"
MODULE = "sigs.k8s.io/kueue"
METRICS_CERTS = "/etc/kueue/metrics/certs"
"""Where Kueue's manager reads its metrics certificate when it does not manage certificates itself."""


def kueue_dir(version: str = KUEUE_VERSION) -> Path:
    """Where Kueue ``version`` lives once built: the binary ``kueue`` and its CRDs under ``crds/``."""
    return cache_root().parent / "kueue" / version


def _copy_crds(version: str, into: Path) -> None:
    """Kueue's CRDs from the module source the Go module proxy serves (the same one ``go install`` builds)."""
    bases = go_module_dir(MODULE, version, into.parent) / "config" / "components" / "crd" / "bases"
    into.mkdir(parents=True)
    for crd in sorted(bases.glob("*.yaml")):
        shutil.copyfile(crd, into / crd.name)


def ensure_kueue(version: str = KUEUE_VERSION, *, log: bool = True) -> Path:
    """The cached Kueue directory, building the manager and copying its CRDs first if needed."""
    final = kueue_dir(version)
    if (final / "kueue").is_file() and any((final / "crds").glob("*.yaml")):
        return final
    if log:
        print(f"[kueue build] go install {MODULE}/cmd/kueue@{version} (minutes, once; cached)", file=sys.stderr)
    start = time.monotonic()

    def command(tmp: Path) -> tuple[list[str], dict[str, str]]:
        _copy_crds(version, tmp / "crds")
        return (
            ["install", "-ldflags=-s -w", f"{MODULE}/cmd/kueue@{version}"],
            {"GOBIN": str(tmp), "CGO_ENABLED": "0", "GOFLAGS": "-trimpath"},
        )

    go_build_into_cache(final, f"kueue {version}", command)
    if log:
        print(f"[kueue build] built in {time.monotonic() - start:.0f} s -> {final}", file=sys.stderr)
    return final


@dataclass(frozen=True)
class Kueue:
    """Kueue's manager for the local cluster rooted at ``state_dir`` (its files under ``kueue/``)."""

    state_dir: Path
    version: str = KUEUE_VERSION

    @property
    def directory(self) -> Path:
        return self.state_dir / "kueue"

    @property
    def log(self) -> Path:
        return self.directory / "kueue.log"

    @property
    def _pidfile(self) -> Path:
        return self.directory / "kueue.pid"

    def running(self) -> bool:
        pid = procs.read_pidfile(self._pidfile)
        return pid is not None and procs.alive(pid)

    def kubectl(self, *args: str) -> str:
        kubectl = build.ensure(log=False).path("kubectl")
        proc = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.state_dir / 'kubeconfig'}", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def up(self, *, timeout: float = 120.0) -> None:
        """Install Kueue's CRDs and start its manager; returns once it is ready. Idempotent."""
        if self.running():
            return
        if not mountns.available():
            raise ClusterError(
                f"Kueue reads its metrics certificate from the fixed path {METRICS_CERTS}; giving it that path "
                "without touching the host needs a private mount namespace (root and util-linux unshare)"
            )
        built = ensure_kueue(self.version)
        crds = built / "crds"
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))
        self.directory.mkdir(parents=True, exist_ok=True)
        certs = self.directory / "certs"
        pki.issue_serving(
            pki.Pki(self.state_dir / "pki"), certs / "tls.crt", certs / "tls.key", "kueue", ["localhost"], ["127.0.0.1"]
        )
        health = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
        }
        config_file = self.directory / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        argv = mountns.wrap(
            [str(built / "kueue"), f"--config={config_file}", "--feature-gates=VisibilityOnDemand=false"],
            [(str(certs), METRICS_CERTS, True)],
        )
        env = {**os.environ, "KUBECONFIG": str(self.state_dir / "kubeconfig")}
        with self.log.open("ab") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        procs.write_pidfile(self._pidfile, process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterError(
                    f"kueue exited with {process.returncode}; last lines of {self.log}:\n{procs.tail(self.log)}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        self.down()
        raise ClusterError(
            f"kueue was not ready within {timeout:.0f} s; last lines of {self.log}:\n{procs.tail(self.log)}"
        )

    def down(self) -> bool:
        """Stop the manager (its CRDs and objects stay, with the cluster's data). True if it ran."""
        pid = procs.read_pidfile(self._pidfile)
        if pid is None:
            return False
        procs.kill_group(pid, 10.0)
        self._pidfile.unlink(missing_ok=True)
        return True

"""Build (or reuse) the control-plane binaries from the Go module in dev/controlplane.

One multi-call binary ``kube`` holds etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kubectl. It is cached outside the repository under
``~/.cache/finetune-operator/controlplane/<key>/`` where the key names the Kubernetes and
etcd versions plus a hash of go.mod, go.sum and the Go sources, so only the first run on
a machine pays for the (long) build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune_assets import project_cache

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


class BuildError(RuntimeError):
    """The Go build failed or no Go toolchain is available."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control plane; every component is a symlink to ``kube``."""

    dir: Path
    kube: Path
    k8s_version: str
    etcd_version: str

    def path(self, component: str) -> Path:
        """Return the path that runs ``component`` (a symlink named after it)."""
        return self.dir / component

    @property
    def build_info(self) -> dict[str, object]:
        """What the build recorded (duration, size, versions); empty if absent."""
        f = self.dir / "build-info.json"
        return dict(json.loads(f.read_text())) if f.exists() else {}


def source_dir() -> Path:
    """Locate the Go module; ``FINETUNE_CONTROLPLANE_SRC`` overrides the checkout layout."""
    env = os.environ.get("FINETUNE_CONTROLPLANE_SRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "controlplane"


def cache_root() -> Path:
    """Root of the binary cache, shared by all checkouts on the machine."""
    return project_cache() / "controlplane"


def _versions(src: Path) -> tuple[str, str]:
    gomod = (src / "go.mod").read_text()
    k8s = re.search(r"^\s*k8s\.io/kubernetes\s+(v\S+)", gomod, re.M)
    etcd = re.search(r"^\s*go\.etcd\.io/etcd/server/v3\s+(v\S+)", gomod, re.M)
    if not k8s or not etcd:
        raise BuildError(f"{src}/go.mod does not pin k8s.io/kubernetes and etcd server")
    return k8s.group(1), etcd.group(1)


def version_key(src: Path | None = None) -> str:
    """Cache key: versions plus a hash of everything that feeds the build."""
    src = src or source_dir()
    k8s, etcd = _versions(src)
    h = hashlib.sha256()
    files = [src / "go.mod", src / "go.sum", *sorted(src.glob("cmd/**/*.go"))]
    for f in files:
        h.update(f.relative_to(src).as_posix().encode())
        h.update(f.read_bytes())
    return f"k8s-{k8s}_etcd-{etcd}_{h.hexdigest()[:12]}"


def _ldflags(k8s: str) -> str:
    m = re.match(r"v(\d+)\.(\d+)", k8s)
    major, minor = (m.group(1), m.group(2)) if m else ("", "")
    pkg = "k8s.io/component-base/version"
    # Reproducible: the build date is the module's publish time, not "now".
    build_date = _module_time(k8s)
    return " ".join(
        [
            "-s -w",
            f"-X {pkg}.gitVersion={k8s}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={build_date}",
        ]
    )


def _module_time(k8s: str) -> str:
    gomodcache = Path(os.environ.get("GOMODCACHE") or Path.home() / "go" / "pkg" / "mod")
    info = gomodcache / "cache/download/k8s.io/kubernetes/@v" / f"{k8s}.info"
    try:
        return str(json.loads(info.read_text())["Time"])
    except (OSError, ValueError, KeyError):
        return "1970-01-01T00:00:00Z"


def find(src: Path | None = None) -> Binaries | None:
    """Return cached binaries for the current sources, or None if not built yet."""
    override = os.environ.get("FINETUNE_CONTROLPLANE_BIN")
    src = src or source_dir()
    if override:
        d = Path(override)
        k8s, etcd = _versions(src) if (src / "go.mod").exists() else ("unknown", "unknown")
        return Binaries(d, d / "kube", k8s, etcd)
    k8s, etcd = _versions(src)
    d = cache_root() / version_key(src)
    if (d / "kube").exists() and all((d / c).exists() for c in COMPONENTS):
        return Binaries(d, d / "kube", k8s, etcd)
    return None


def ensure(src: Path | None = None, *, log: bool = True) -> Binaries:
    """Return the binaries, building them first if the cache lacks them."""
    src = src or source_dir()
    found = find(src)
    if found:
        return found
    return build(src, log=log)


def _say(msg: str) -> None:
    print(f"[controlplane build] {msg}", file=sys.stderr, flush=True)


def build(src: Path | None = None, *, log: bool = True) -> Binaries:
    """Run ``go build`` (slow: many minutes cold) and install into the cache."""
    src = src or source_dir()
    go = shutil.which("go")
    if not go:
        raise BuildError("the Go toolchain ('go') is not on PATH; it is needed once to build the control plane")
    k8s, etcd = _versions(src)
    key = version_key(src)
    final = cache_root() / key
    tmp = cache_root() / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [go, "build", "-v", "-trimpath", "-ldflags", _ldflags(k8s), "-o", str(tmp / "kube"), "./cmd/kube"]
    if log:
        _say(f"building {key} (cold builds take 10-30 min on 2 cores; cached afterwards)")
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-mod=readonly")
    start = time.monotonic()
    logfile = tmp / "build.log"
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=src, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def progress() -> None:
            while not done.wait(30):
                last = _last_line(logfile)
                if log:
                    _say(f"still building... {time.monotonic() - start:.0f} s (last package: {last})")

        t = threading.Thread(target=progress, daemon=True)
        t.start()
        rc = proc.wait()
        done.set()
    elapsed = time.monotonic() - start
    if rc != 0:
        tail = "\n".join(logfile.read_text().splitlines()[-40:])
        raise BuildError(f"go build failed (exit {rc}); see {logfile}\n{tail}")
    for c in COMPONENTS:
        (tmp / c).symlink_to("kube")
    size = (tmp / "kube").stat().st_size
    # `go build -v` names each package it compiles: ~2000 on a cold Go cache, ~1 when warm.
    compiled = sum(1 for line in logfile.read_text().splitlines() if line and " " not in line)
    info = {
        "key": key,
        "k8s_version": k8s,
        "etcd_version": etcd,
        "build_seconds": round(elapsed, 1),
        "binary_bytes": size,
        "packages_compiled": compiled,
        "go_version": subprocess.run(
            [go, "env", "GOVERSION"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():  # a concurrent build won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)
    if log:
        _say(f"built in {elapsed:.0f} s, {size / 2**20:.0f} MiB -> {final}")
    return Binaries(final, final / "kube", k8s, etcd)


def _last_line(f: Path) -> str:
    try:
        lines = f.read_text().splitlines()
    except OSError:
        return "?"
    return lines[-1] if lines else "(resolving)"


def go_build_into_cache(
    final: Path, what: str, command: Callable[[Path], tuple[list[str], dict[str, str]]], cwd: Path | None = None
) -> None:
    """Build with ``go`` into a temporary sibling of ``final``, then rename it into place.

    ``command(tmp)`` gives the go arguments and extra environment that write into ``tmp``. A
    concurrent build that finished first keeps its copy; a failed one leaves nothing and raises.
    """
    go = shutil.which("go")
    if not go:
        raise BuildError(f"cannot build {what}: the Go toolchain ('go') is not on PATH (install Go >= 1.24)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args, env = command(tmp)
    proc = subprocess.run([go, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"could not build {what} with `go {args[0]}` (is the Go module proxy reachable?): {last}")
    if final.exists():  # a concurrent build won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)


def go_module_dir(module: str, version: str, cwd: Path) -> Path:
    """The (read-only) module cache directory of ``module@version``, downloaded through the Go module proxy."""
    go = shutil.which("go")
    if not go:
        raise BuildError(f"cannot fetch {module}: the Go toolchain ('go') is not on PATH (install Go >= 1.24)")
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"], cwd=cwd, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BuildError(f"could not download {module}@{version} (is the Go module proxy reachable?): {proc.stderr}")
    return Path(json.loads(proc.stdout)["Dir"])

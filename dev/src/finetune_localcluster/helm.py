"""Helm, built from the Go module proxy and cached like the control plane.

No registry or release download is reachable on the machines that build this project, but the Go
module proxy is: ``go install helm.sh/helm/v3/cmd/helm@VERSION`` builds the real helm (about
4 min on 2 cores, once per machine and version) into
``~/.cache/finetune-operator/helm/VERSION/helm``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .build import BuildError, cache_root

HELM_VERSION = "v3.22.0"


def helm_dir(version: str = HELM_VERSION) -> Path:
    """Where helm ``version`` lives once built (next to the control-plane cache)."""
    return cache_root().parent / "helm" / version


def find_helm(version: str = HELM_VERSION) -> Path | None:
    """The cached helm binary, or None when it was never built; ``FINETUNE_HELM`` overrides."""
    override = os.environ.get("FINETUNE_HELM")
    if override:
        return Path(override)
    binary = helm_dir(version) / "helm"
    return binary if binary.is_file() else None


def ensure_helm(version: str = HELM_VERSION, *, log: bool = True) -> Path:
    """Return the helm binary, building it from the Go module proxy first if needed."""
    found = find_helm(version)
    if found:
        return found
    go = shutil.which("go")
    if not go:
        raise BuildError("cannot build helm: the Go toolchain ('go') is not on PATH (install Go >= 1.24)")
    final = helm_dir(version)
    tmp = final.parent / f".{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if log:
        print(f"[helm build] go install helm.sh/helm/v3/cmd/helm@{version} (~4 min once; cached)", file=sys.stderr)
    env = {**os.environ, "GOBIN": str(tmp), "CGO_ENABLED": "0", "GOFLAGS": "-trimpath"}
    start = time.monotonic()
    proc = subprocess.run(
        [go, "install", "-ldflags=-s -w", f"helm.sh/helm/v3/cmd/helm@{version}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(
            f"could not build helm {version} with `go install` (is the Go module proxy reachable?): {last}"
        )
    if final.exists():  # a concurrent build won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)
    if log:
        print(f"[helm build] built in {time.monotonic() - start:.0f} s -> {final / 'helm'}", file=sys.stderr)
    return final / "helm"

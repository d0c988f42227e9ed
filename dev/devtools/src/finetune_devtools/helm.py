"""Helm, built from the Go module proxy and cached like the control plane.

No registry or release download is reachable on the machines that build this project, but the Go
module proxy is: ``go install helm.sh/helm/v3/cmd/helm@VERSION`` builds the real helm (about
4 min on 2 cores, once per machine and version) into
``~/.cache/finetune-operator/helm/VERSION/helm``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from finetune_localcluster.build import cache_root, go_build_into_cache

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
    final = helm_dir(version)
    if log:
        print(f"[helm build] go install helm.sh/helm/v3/cmd/helm@{version} (~4 min once; cached)", file=sys.stderr)
    start = time.monotonic()
    go_build_into_cache(
        final,
        f"helm {version}",
        lambda tmp: (
            ["install", "-ldflags=-s -w", f"helm.sh/helm/v3/cmd/helm@{version}"],
            {"GOBIN": str(tmp), "CGO_ENABLED": "0", "GOFLAGS": "-trimpath"},
        ),
    )
    if log:
        print(f"[helm build] built in {time.monotonic() - start:.0f} s -> {final / 'helm'}", file=sys.stderr)
    return final / "helm"

"""Build (or reuse) the Go GitOps harness in dev/gitops-harness and run it.

The harness computes a FineTuneJob's health with the GitOps tools' own libraries (kstatus,
Argo CD's gopher-lua VM, Flux's cel-go). Like the control plane it is built once from the Go
module proxy and cached under ``~/.cache/finetune-operator/gitops-harness/<hash>/``, keyed by
a hash of go.mod, go.sum and the Go sources.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from finetune_localcluster.build import cache_root, go_build_into_cache

REPO = Path(__file__).resolve().parents[4]
SOURCE = REPO / "dev" / "gitops-harness"
ARGOCD_DIR = REPO / "gitops" / "argocd" / "resource_customizations" / "finetune.dev" / "FineTuneJob"
FLUX_KUSTOMIZATION = REPO / "gitops" / "flux" / "kustomization.yaml"


def version_key(src: Path = SOURCE) -> str:
    h = hashlib.sha256()
    for f in [src / "go.mod", src / "go.sum", *sorted(src.glob("*.go"))]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def ensure(src: Path = SOURCE) -> Path:
    """The harness binary for the current sources, built first if the cache lacks it."""
    final = cache_root().parent / "gitops-harness" / version_key(src)
    binary = final / "gitops-harness"
    if binary.exists():
        return binary
    go_build_into_cache(
        final,
        "the GitOps harness",
        lambda tmp: (["build", "-trimpath", "-o", str(tmp / "gitops-harness"), "."], {"GOFLAGS": "-mod=readonly"}),
        cwd=src,
    )
    return binary


def report(dumps: list[Path], lua: Path = ARGOCD_DIR / "health.lua", flux: Path = FLUX_KUSTOMIZATION) -> dict[str, Any]:
    """{dump file name: {"kstatus": ..., "argocd": ..., "flux": ...}} for FineTuneJob dumps."""
    run = subprocess.run(
        [str(ensure()), "report", "--lua", str(lua), "--flux", str(flux), *map(str, dumps)],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise AssertionError(f"gitops-harness report failed:\n{run.stderr}")
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    return {Path(line.pop("file")).name: line for line in lines}


def argocd_test(directory: Path = ARGOCD_DIR) -> subprocess.CompletedProcess[str]:
    """Run Argo CD's health_test.yaml of ``directory`` against its health.lua."""
    return subprocess.run([str(ensure()), "argocd-test", str(directory)], capture_output=True, text=True, check=False)

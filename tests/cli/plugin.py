"""``kubectl finetune ...`` as a user runs it: the real kubectl finding the installed ``kubectl-finetune`` on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from finetune_localcluster import build
from finetune_testsupport.pytest_plugin import LocalCluster


def kubectl_finetune(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """Run it against ``cluster`` ($KUBECONFIG, as the plugin honours it); never raises on a non-zero exit."""
    kubectl = build.ensure(log=False).path("kubectl")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["KUBECONFIG"] = str(cluster.kubeconfig)
    return subprocess.run(
        [str(kubectl), "finetune", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )

"""In-pod Kubernetes client config that also works on the local node agent.

Pods run by the local node agent cannot see /var/run/secrets/kubernetes.io/serviceaccount;
the agent sets ``FINETUNE_SA_DIR`` to the host directory holding ``token``, ``ca.crt`` and
``namespace`` instead (plus ``KUBERNETES_SERVICE_HOST``/``PORT`` of the real API server).
Code that must run in both places calls :func:`load_config`.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client, config
from kubernetes.config.incluster_config import InClusterConfigLoader

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def sa_dir() -> Path:
    """Directory of the pod's service-account token, CA and namespace."""
    return Path(os.environ.get("FINETUNE_SA_DIR") or SA_DIR)


def namespace() -> str:
    """The pod's namespace (from the service-account volume)."""
    return (sa_dir() / "namespace").read_text().strip()


def load_config(configuration: client.Configuration | None = None) -> None:
    """Like ``config.load_incluster_config()``, honouring ``FINETUNE_SA_DIR``."""
    d = sa_dir()
    if d == SA_DIR:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call,unused-ignore]
        return
    loader = InClusterConfigLoader(  # type: ignore[no-untyped-call,unused-ignore]
        token_filename=str(d / "token"), cert_filename=str(d / "ca.crt")
    )
    loader.load_and_set(configuration)  # type: ignore[no-untyped-call,unused-ignore]

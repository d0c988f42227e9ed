"""Kubeconfig files and API clients for the local control plane."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import client, config

CONTEXT = "finetune-local"


def write(path: Path, server: str, ca: Path, *, cert: Path, key: Path, user: str) -> Path:
    """Write a kubeconfig that uses absolute paths to the PEM files (no embedded secrets)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user}}],
        "current-context": CONTEXT,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def api_client(kubeconfig: Path, pool: int = 16) -> client.ApiClient:
    """A fresh ApiClient for ``kubeconfig`` (never touches the global default config)."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call,unused-ignore]
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)

"""Cluster DNS for pods with a ``subdomain``, the local way: names in the pod's own ``/etc/hosts``.

In a cluster, a headless Service named like a pod's ``spec.subdomain`` makes cluster DNS answer
``<hostname>.<subdomain>.<namespace>.svc.cluster.local`` (and the search-path short forms
``<hostname>.<subdomain>``, ``...<namespace>``, ``...<namespace>.svc``) with the pod's IP. Here
every pod shares the host's network, so each such name honestly means 127.0.0.1: the node agent
writes the names into a hosts file of the pod's own, bind-mounted on ``/etc/hosts`` in its mount
namespace (podman: ``--add-host``). For a pod of an Indexed Job every hostname of the Job,
``<job>-0`` ... ``<job>-<completions-1>``, is written up front, so a pod resolves peers that have
not started yet (torchrun's workers retry until the master's store answers, as they would in a
cluster while the master pod is still pulling its image).

One thing a shared network adds: in a cluster each pod has its own ports, and torchrun's fixed
rendezvous port (``MASTER_PORT``, 29500) never collides. Here two multi-node jobs on one host would
fight over it, so the agent gives the pods of each Job a ``MASTER_PORT`` of their own, derived from
the Job's uid (the same on every node, different between Jobs). Nothing else is rewritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune_localcluster.rest import Obj

CLUSTER_DOMAIN = "cluster.local"
RENDEZVOUS_PORTS = range(20000, 30000)
"""Where per-Job rendezvous ports are taken from: below the usual ephemeral range (32768-60999)."""
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def owner_job(pod: Obj) -> tuple[str, str] | None:
    """(name, uid) of the Job that owns ``pod``, if a Job does."""
    for ref in pod["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("apiVersion", "").startswith("batch/"):
            return str(ref["name"]), str(ref["uid"])
    return None


def host_names(pod: Obj, completions: int | None) -> list[str]:
    """The DNS names cluster DNS would give ``pod`` (and its Indexed Job's peers); none without a subdomain."""
    spec, meta = pod["spec"], pod["metadata"]
    subdomain = spec.get("subdomain")
    if not subdomain:
        return []
    hostnames = [str(spec.get("hostname") or meta["name"])]
    job = owner_job(pod)
    if job is not None and completions and INDEX_ANNOTATION in (meta.get("annotations") or {}):
        hostnames = [f"{job[0]}-{i}" for i in range(completions)]
    namespace = meta["namespace"]
    suffixes = ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.{CLUSTER_DOMAIN}")
    return [f"{host}.{subdomain}{suffix}" for host in hostnames for suffix in suffixes]


def rendezvous_port(job_uid: str) -> int:
    """The Job's own ``MASTER_PORT`` on this shared host network (stable: every node computes the same)."""
    digest = int.from_bytes(hashlib.sha256(job_uid.encode()).digest()[:4], "big")
    return RENDEZVOUS_PORTS.start + digest % len(RENDEZVOUS_PORTS)


def write_hosts(base: Path, target: Path, names: list[str]) -> Path:
    """``base`` (the node's hosts file) plus ``names`` at 127.0.0.1, written to ``target``."""
    lines = [base.read_text().rstrip(), "# the pod's cluster DNS names (finetune_localcluster.poddns)"]
    lines += [f"127.0.0.1\t{name}" for name in names]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    return target

"""The node agent's stand-in for cluster DNS and per-Job rendezvous ports (pure; no cluster needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_localcluster import poddns


def _pod(index: int | None, subdomain: str | None = "ddp-rendezvous") -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"ddp-trainer-{index}-abcde",
        "namespace": "ml",
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "ddp-trainer", "uid": "u-1"}],
    }
    if index is not None:
        meta["annotations"] = {poddns.INDEX_ANNOTATION: str(index)}
    spec: dict[str, Any] = {"hostname": f"ddp-trainer-{index}"}
    if subdomain:
        spec["subdomain"] = subdomain
    return {"metadata": meta, "spec": spec}


def test_an_indexed_jobs_pod_resolves_every_peer_in_all_the_forms_cluster_dns_answers() -> None:
    names = poddns.host_names(_pod(1), completions=2)
    for host in ("ddp-trainer-0", "ddp-trainer-1"):
        assert f"{host}.ddp-rendezvous" in names
        assert f"{host}.ddp-rendezvous.ml" in names
        assert f"{host}.ddp-rendezvous.ml.svc" in names
        assert f"{host}.ddp-rendezvous.ml.svc.cluster.local" in names
    assert len(names) == 8
    assert poddns.host_names(_pod(1, subdomain=None), completions=2) == [], "no subdomain: no DNS names"


def test_rendezvous_ports_are_per_job_and_the_same_on_every_node() -> None:
    port = poddns.rendezvous_port("u-1")
    assert port == poddns.rendezvous_port("u-1") and port in poddns.RENDEZVOUS_PORTS
    ports = {poddns.rendezvous_port(f"uid-{i}") for i in range(50)}
    assert len(ports) >= 49, "different Jobs get different ports (a collision is rare and only retried)"


def test_the_pods_hosts_file_keeps_the_nodes_entries(tmp_path: Path) -> None:
    base = tmp_path / "hosts"
    base.write_text("127.0.0.1\tlocalhost\n127.1.2.1\tkubernetes.default.svc\n")
    written = poddns.write_hosts(base, tmp_path / "pod" / "hosts", ["a.b", "a.b.ml"])
    lines = written.read_text().splitlines()
    assert lines[:2] == ["127.0.0.1\tlocalhost", "127.1.2.1\tkubernetes.default.svc"]
    assert lines[-2:] == ["127.0.0.1\ta.b", "127.0.0.1\ta.b.ml"]

"""Starting twice, stopping, and a crashing component give clear outcomes (own clusters)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_localcluster import procs
from finetune_localcluster.cluster import (
    COMPONENTS,
    AlreadyRunningError,
    Cluster,
    ClusterError,
    ComponentFailedError,
)
from finetune_localcluster.kubeconfig import api_client

pytestmark = pytest.mark.integration


@pytest.fixture
def spare(tmp_path: Path) -> Iterator[Cluster]:
    """A second, private cluster (the session one must not be disturbed)."""
    c = Cluster(tmp_path / "spare", quiet=True)
    yield c
    c.stop(quiet=True)


def test_start_twice_stop_and_crash(spare: Cluster) -> None:
    spare.start()
    pids = spare.pids()
    assert all(pids.values())
    assert spare.start(reuse=True) is spare  # reuse: same processes
    assert spare.pids() == pids
    with pytest.raises(AlreadyRunningError, match="already running"):
        Cluster(spare.state_dir, quiet=True).start(reuse=False)

    sched = pids["kube-scheduler"]
    assert sched is not None
    os.kill(sched, signal.SIGKILL)
    with pytest.raises(ComponentFailedError, match="kube-scheduler is not running") as e:
        for _ in range(100):
            spare.check()
    assert "kube-scheduler.log" in str(e.value)
    assert spare.status()["kube-scheduler"] == "not running"
    with pytest.raises(ClusterError, match=r"partially running .*not running: kube-scheduler"):
        Cluster(spare.state_dir, quiet=True).start()

    stopped = spare.stop(quiet=True)
    assert set(stopped) == set(COMPONENTS) - {"kube-scheduler"}
    assert not any(procs.alive(p) for p in pids.values() if p)
    assert spare.pids() == dict.fromkeys(COMPONENTS)


def test_component_failing_at_startup_is_named(spare: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CLUSTER_EXTRA_ARGS_KUBE_CONTROLLER_MANAGER", "--no-such-flag")
    with pytest.raises(ComponentFailedError) as e:
        spare.start()
    assert e.value.component == "kube-controller-manager"
    assert "exited with code" in str(e.value)
    assert "unknown flag: --no-such-flag" in str(e.value)
    # Whatever had started was stopped again.
    assert spare.pids() == dict.fromkeys(COMPONENTS)


def _node(cluster: Cluster, name: str) -> Any:
    with api_client(cluster.kubeconfig) as api:
        try:
            return client.CoreV1Api(api).read_node(name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise


def test_a_silent_agent_is_seen_as_gone_and_departed_nodes_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make cluster-up NODES=2`, `make cluster-down`, `make cluster-up` once left local-node-2 Ready forever,
    and new pods were bound to it. Now: an agent that stops renewing its Lease is Ready=Unknown and tainted
    unreachable (the real node lifecycle controller, its grace period shortened for the test), and a start
    removes the Nodes of agents the cluster no longer runs."""
    grace = "--node-monitor-grace-period=24s --node-monitor-period=2s"  # real default 50s, renewals 10s
    monkeypatch.setenv("FINETUNE_CLUSTER_EXTRA_ARGS_KUBE_CONTROLLER_MANAGER", grace)
    two = Cluster(tmp_path / "c", nodes=2, quiet=True)
    try:
        two.start(reuse=False)
        agent = two.pids()["node-agent-2"]
        assert agent is not None
        os.killpg(agent, signal.SIGKILL)  # the machine is gone: no goodbye
        deadline = time.monotonic() + 120
        while True:
            node = _node(two, "local-node-2")
            ready = next(c for c in node.status.conditions if c.type == "Ready")
            taints = {(t.key, t.effect) for t in node.spec.taints or []}
            if ready.status == "Unknown" and ("node.kubernetes.io/unreachable", "NoSchedule") in taints:
                break
            assert time.monotonic() < deadline, f"local-node-2 still {ready.status}, taints {taints}"
            time.sleep(1)
        assert {c.status for c in _node(two, "local-node").status.conditions if c.type == "Ready"} == {"True"}
    finally:
        two.stop(quiet=True)
    one = Cluster(tmp_path / "c", nodes=1, quiet=True)
    try:
        one.start(reuse=False)
        assert _node(one, "local-node-2") is None, "a node this cluster does not run is gone"
        assert _node(one, "local-node") is not None
    finally:
        one.stop(quiet=True)

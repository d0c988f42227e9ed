"""Starting twice, stopping, and a crashing component give clear outcomes (own clusters)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_localcluster import procs
from finetune_localcluster.cluster import (
    COMPONENTS,
    AlreadyRunningError,
    Cluster,
    ClusterError,
    ComponentFailedError,
)

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

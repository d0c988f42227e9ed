"""A small chaos run (benchmarks/chaos.py) on a control plane of its own: it restarts the API
server and etcd, which would disturb every other test on the shared one."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.chaos import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_faults_lose_nothing_duplicate_nothing_and_converge(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        jobs=6,
        operator_kills=2,
        apiserver_restarts=1,
        etcd_restarts=1,
        trainer_seconds=15,
        resync=3,
        seed=7,
        say=lambda line: print(line, flush=True),
    )
    print("\n".join(report.lines()))
    assert report.lost == []
    assert report.duplicates == []
    assert report.not_converged == []
    assert all(seconds is not None for _, seconds in report.convergence), report.lines()

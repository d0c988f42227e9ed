"""The resync's check of the watches' caches, against the real API server.

After a watch relist (410 Gone) kopf sends no DELETED for what vanished in the gap: a
FineTuneJob deleted then stayed a ghost with its metrics series, and a Job deleted then was
trusted forever. The resync now lists what exists and drops the rest (driven in-process here;
tests/e2e/test_hardening.py restarts the whole operator)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from prometheus_client import generate_latest

from finetune_operator.api import FineTuneJobStatus, Progress
from finetune_operator.clients import Kube, login
from finetune_operator.handlers import Reconciler
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import Settings

if TYPE_CHECKING:
    from finetune_localcluster.pytest_plugin import LocalCluster

pytestmark = pytest.mark.usefixtures("crd")


async def _ghosts_are_dropped(namespace: str) -> tuple[set[tuple[str, str]], str]:
    kube = Kube(login)
    metrics = OperatorMetrics()
    reconciler = Reconciler(kube, Settings(), metrics)
    try:
        ghost = (namespace, "deleted-during-the-gap")
        reconciler.known.add(ghost)
        reconciler.saw_trainer_job(ghost, {"metadata": {"name": "x-trainer", "namespace": namespace}, "status": {}})
        metrics.observe_job(*ghost, FineTuneJobStatus(phase="Running", progress=Progress(percent=50.0)))
        missing = await reconciler.verify_caches()
        return missing | reconciler.known, generate_latest(metrics.registry).decode()
    finally:
        await kube.close()


def test_a_finetunejob_deleted_while_the_watch_relisted_leaves_no_ghost(
    local_cluster: LocalCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    remembered, exposition = asyncio.run(_ghosts_are_dropped(namespace))
    assert (namespace, "deleted-during-the-gap") not in remembered
    assert "deleted-during-the-gap" not in exposition, "its metrics series went with it"

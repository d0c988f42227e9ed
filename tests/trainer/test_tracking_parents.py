"""A sweep's trials agree on one MLflow parent run (issue 28): the trial-side logic of many trials at once, against
the real MLflow server, with no trainer and no cluster. Every round a fresh sweep's trials all find no parent,
make theirs at the same moment, and keep their runs open together (as trials train); once they all ended, one
parent is left and every trial's run, and every trial's ``status.tracking.parentRunId``, points at it.

The trials' client is MLflow's, slowed as on a busy machine (CI's 2 cores, trial pods starting together; see
``BusyClient``): the interleaving that CI once hit is then the common case, not a one-in-three chance."""

from __future__ import annotations

import io
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from finetune_devtools.mlflow_server import MlflowServer
from finetune_trainer.contract import TrackingStatus
from finetune_trainer.reporting import JsonLines
from finetune_trainer.spec import TrackingSpec
from finetune_trainer.tracking import JOB_UID_TAG, PARENT_TAG, SWEEP_UID_TAG, JobIdentity, Tracker

TRIALS = 3
ROUNDS = 6
EXPERIMENT = "parent-race"
LATENCY = 0.3
"""The most a request to make a run waits before it is sent (seconds)."""


class BusyClient(MlflowClient):
    """The real client as trials on a busy machine use it: every trial's first look for the sweep's run is answered
    before any trial makes one, and a request to make a run reaches the server a random while after the run's
    start time is taken (so runs are written in another order than their start times)."""

    def __init__(self, uri: str, looked: threading.Barrier) -> None:
        super().__init__(tracking_uri=uri)
        self.looked, self.first = looked, True

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        found = super().search_runs(*args, **kwargs)
        if self.first and SWEEP_UID_TAG in str(kwargs.get("filter_string")):
            self.first = False
            self.looked.wait(timeout=60)
        return found

    def create_run(
        self,
        experiment_id: str,
        start_time: int | None = None,
        tags: dict[str, Any] | None = None,
        run_name: str | None = None,
    ) -> Run:
        start_time = start_time or time.time_ns() // 1_000_000  # as the client takes it, before sending
        time.sleep(random.uniform(0, LATENCY))
        return super().create_run(experiment_id, start_time, tags, run_name)


def _trial(uri: str, sweep_uid: str, index: int, looked: threading.Barrier, end: threading.Barrier) -> TrackingStatus:
    identity = JobIdentity(f"t{index}", "race", f"{sweep_uid}-t{index}", {}, sweep_name="race", sweep_uid=sweep_uid)
    tracker = Tracker(
        TrackingSpec(uri=uri, experiment=EXPERIMENT),
        identity,
        lambda _: None,
        JsonLines(io.StringIO()),
        backoff=0.1,
        client_factory=lambda uri: BusyClient(uri, looked),
    )
    tracker.log_params({"index": str(index)})
    deadline = time.monotonic() + 60
    while tracker.status.run_id is None and time.monotonic() < deadline:  # attached: the trial trains now
        time.sleep(0.02)
    end.wait()
    return tracker.close("FINISHED", wait=60)


def test_trials_that_start_at_once_end_under_one_parent_run(mlflow_server: MlflowServer) -> None:
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    lost: list[str] = []
    for round_ in range(ROUNDS):
        sweep_uid = f"sweep-{uuid.uuid4()}"
        looked, end = threading.Barrier(TRIALS), threading.Barrier(TRIALS)
        with ThreadPoolExecutor(TRIALS) as pool:
            statuses = list(
                pool.map(lambda i: _trial(mlflow_server.uri, sweep_uid, i, looked, end), range(TRIALS))  # noqa: B023
            )
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None
        parents = [
            r.info.run_id
            for r in client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_UID_TAG}` = '{sweep_uid}'")
        ]
        children = {
            r.data.tags[JOB_UID_TAG]: r.data.tags.get(PARENT_TAG)
            for r in client.search_runs([experiment.experiment_id], f"tags.`{JOB_UID_TAG}` LIKE '{sweep_uid}-%'")
        }
        assert len(children) == TRIALS, children
        assert all(s.run_id and not s.behind for s in statuses), statuses
        if (
            len(parents) != 1
            or set(children.values()) != set(parents)
            or {s.parent_run_id for s in statuses} != set(parents)
        ):
            lost.append(
                f"round {round_}: parents {parents}, children's parents {sorted(map(str, children.values()))}, "
                f"statuses' parents {sorted(str(s.parent_run_id) for s in statuses)}"
            )
    assert not lost, f"{len(lost)} of {ROUNDS} rounds did not end under one parent:\n" + "\n".join(lost)

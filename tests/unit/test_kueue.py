"""Kueue: queued Jobs are created suspended and left to Kueue; the status repeats Kueue's words."""

from __future__ import annotations

from datetime import timedelta

import pytest

from finetune_operator.api.job import KUEUE_HOLDS, REASONS, FineTuneJob
from finetune_operator.reconcile import Observed, ObservedJob, decide
from finetune_operator.reconcile.children import batch_job
from finetune_operator.reconcile.observe import observe_admission
from finetune_operator.reconcile.status import ObservedAdmission
from tests.unit.test_reconcile import NOW, SETTINGS, conditions, job

QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor f, 1 more needed"
)
TOO_BIG = (
    "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor f, previously "
    "considered podsets requests (0) + current podset request (8) > maximum capacity (4)"
)


def labelled(**labels: str) -> FineTuneJob:
    ftj = job()
    ftj.metadata.labels.update(labels)
    return ftj


def test_a_queued_job_is_created_suspended_with_kueues_labels() -> None:
    queued = batch_job(job(queueName="gpu-queue"), SETTINGS)
    assert queued["spec"]["suspend"] is True
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    plain = batch_job(job(), SETTINGS)
    assert plain["spec"]["suspend"] is False
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_the_queue_label_and_a_workload_priority_class_on_the_finetunejob_reach_the_job() -> None:
    ftj = labelled(**{"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "urgent"})
    assert ftj.queue_name == "team-a"
    labels = batch_job(ftj, SETTINGS)["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/priority-class"] == "urgent"
    pod = batch_job(job(queueName="q", resources={"priorityClassName": "high"}), SETTINGS)["spec"]["template"]
    assert pod["spec"]["priorityClassName"] == "high"  # what Kueue reads without a WorkloadPriorityClass


def held(ftj: FineTuneJob, admission: ObservedAdmission | None, **observed: int) -> dict[str, tuple[str, str]]:
    decision = decide(ftj, Observed(job=ObservedJob(suspended=True, **observed), admission=admission), NOW)
    assert decision.status.phase == "Suspended"
    assert not decision.halt_trainer_job
    return conditions(decision.status)


def test_waiting_for_quota_says_kueues_message() -> None:
    got = held(job(queueName="q"), ObservedAdmission(reason="Pending", message=QUOTA))
    assert got["Suspended"] == ("True", "Queued")
    assert got["Running"] == ("False", "Queued")
    assert got["Reconciling"] == ("True", "Queued")
    assert "Stalled" not in got or got["Stalled"][0] == "False"
    status = decide(job(queueName="q"), Observed(job=ObservedJob(suspended=True)), NOW).status
    assert "no Workload yet" in (status.message or "")


def test_the_message_is_kueues_own() -> None:
    status = decide(
        job(queueName="q"),
        Observed(job=ObservedJob(suspended=True), admission=ObservedAdmission(reason="Pending", message=QUOTA)),
        NOW,
    ).status
    assert status.message == f"LocalQueue q: {QUOTA}"


def test_no_such_queue_and_too_large_for_the_quota_are_stalled_with_kueues_reason() -> None:
    for admission in (
        ObservedAdmission(reason="Inadmissible", message="LocalQueue nope doesn't exist"),
        ObservedAdmission(reason="Pending", message=TOO_BIG),
    ):
        decision = decide(job(queueName="q"), Observed(job=ObservedJob(suspended=True), admission=admission), NOW)
        got = conditions(decision.status)
        assert got["Suspended"] == ("True", "Inadmissible")
        assert got["Stalled"] == ("True", "Inadmissible")
        assert got["Ready"][0] == "False"
        assert "Failed" not in got
        assert admission.message in (decision.status.message or "")
        assert [e.reason for e in decision.events if e.type == "Warning"] == ["Inadmissible"]


@pytest.mark.parametrize(
    ("resources", "resource", "fix"),
    [
        ({"ephemeralStorage": "5Gi"}, "ephemeral-storage", "unset spec.resources.ephemeralStorage"),
        ({"cpu": 4}, "cpu", "unset spec.resources.cpu"),
        ({}, "nvidia.com/gpu", "set spec.resources.gpuResourceName"),
    ],
)
def test_a_resource_the_cluster_queue_does_not_cover_is_inadmissible_with_the_fix(
    resources: dict[str, object], resource: str, fix: str
) -> None:
    """Kueue says so as a Pending reason: it would stay Queued forever, where nothing but a change helps."""
    said = f"couldn't assign flavors to pod set main: resource {resource} unavailable in ClusterQueue"
    admission = ObservedAdmission(reason="Pending", message=said)
    decision = decide(
        job(queueName="q", resources=resources), Observed(job=ObservedJob(suspended=True), admission=admission), NOW
    )
    got = conditions(decision.status)
    assert got["Suspended"] == ("True", "Inadmissible") and got["Stalled"] == ("True", "Inadmissible")
    message = decision.status.message or ""
    assert (
        said in message
        and fix in message
        and f"have {resource} added to the ClusterQueue's coveredResources" in message
    )


def test_a_preempted_job_is_suspended_not_failed_and_resumes_when_readmitted() -> None:
    ftj = job(queueName="q")
    running = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)
    assert conditions(running.status)["Running"] == ("True", "TrainerRunning")
    ftj.status = running.status
    evicted = ObservedAdmission(
        reason="Pending", evicted_reason="Preempted", evicted_message="Preempted to accommodate a higher priority"
    )
    later = NOW + timedelta(seconds=30)
    preempted = decide(ftj, Observed(job=ObservedJob(suspended=True, terminating=1), admission=evicted), later)
    got = conditions(preempted.status)
    assert got["Suspended"] == ("True", "Preempted")
    assert got["Reconciling"] == ("True", "Preempted")
    assert "Failed" not in got and got.get("Complete", ("False",))[0] == "False"
    assert "saving a checkpoint" in (preempted.status.message or "")
    assert "Preempted to accommodate" in (preempted.status.message or "")
    assert [e.reason for e in preempted.events] == ["Preempted"]
    ftj.status = preempted.status
    again = decide(ftj, Observed(job=ObservedJob(suspended=True), admission=evicted), later)
    assert again.events == []  # said once
    ftj.status = again.status
    resumed = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=later)), later)
    got = conditions(resumed.status)
    assert got["Suspended"] == ("False", "Resumed")
    assert got["Running"] == ("True", "TrainerRunning")


def test_the_users_suspend_wins_over_the_queue() -> None:
    decision = decide(job(queueName="q", suspend=True), Observed(job=ObservedJob(suspended=True)), NOW)
    got = conditions(decision.status)
    assert got["Suspended"] == ("True", "Suspended")
    assert got["Ready"] == ("True", "Suspended")  # a pause the user asked for, not work in progress
    assert batch_job(job(queueName="q", suspend=True), SETTINGS)["spec"]["suspend"] is True


def test_a_queued_status_stays_put_without_events() -> None:
    ftj = job(queueName="q")
    admission = ObservedAdmission(reason="Pending", message=QUOTA)
    first = decide(ftj, Observed(job=ObservedJob(suspended=True), admission=admission), NOW)
    assert [e.reason for e in first.events] == ["Queued"]
    ftj.status = first.status
    second = decide(ftj, Observed(job=ObservedJob(suspended=True), admission=admission), NOW + timedelta(seconds=5))
    assert second.events == []
    assert second.status.conditions == first.status.conditions


def test_observe_admission_reads_the_workloads_conditions() -> None:
    assert observe_admission([]) is None
    workload = {
        "metadata": {"name": "job-x-1", "namespace": "ml"},
        "status": {
            "conditions": [
                {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": QUOTA},
                {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate"},
                {"type": "Admitted", "status": "False", "reason": "NoReservation", "message": ""},
            ]
        },
    }
    seen = observe_admission([workload])
    assert seen == ObservedAdmission(
        admitted=False,
        reason="Pending",
        message=QUOTA,
        evicted_reason="Preempted",
        evicted_message="Preempted to accommodate",
    )


def test_every_kueue_reason_is_in_the_table() -> None:
    assert set(KUEUE_HOLDS) <= set(REASONS)


def test_a_workload_deactivated_for_the_users_suspend_is_not_called_preempted() -> None:
    ftj = job(queueName="q")
    ftj.status.start_time = NOW  # it ran before the user suspended it
    deactivated = ObservedAdmission(reason="Pending", message=QUOTA, evicted_reason="Deactivated", evicted_message="x")
    got = held(ftj, deactivated)
    assert got["Suspended"] == ("True", "Queued")

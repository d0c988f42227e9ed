"""Ready / Reconciling / Stalled, as kstatus, Flux and Argo CD read them (the pure core).

The Go harness (tests/e2e/test_gitops.py) runs the real kstatus, health.lua and CEL on dumps of
real jobs; these tests pin the table of issue #14 on the reconcile core itself.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from finetune_operator.api.job import REASONS, Condition, FineTuneJob, FineTuneJobStatus, Progress
from finetune_operator.reconcile import Observed, ObservedJob, ObservedPod, decide, invalid_spec
from finetune_operator.reconcile.health import derive_health
from finetune_operator.reconcile.status import Decision, set_condition
from tests.unit.test_reconcile import NOW, _with_evals, job

HEALTH = ("Ready", "Reconciling", "Stalled")


def health(status: FineTuneJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions if c.type in HEALTH}


def kstatus(status: FineTuneJobStatus, generation: int | None = 1) -> str:
    """kstatus' generic rule (observedGeneration, Reconciling, Stalled, Ready); the Go harness runs the real one."""
    if status.observed_generation is not None and status.observed_generation != generation:
        return "InProgress"
    by_type = {c.type: c.status for c in status.conditions}
    if by_type.get("Reconciling") == "True":
        return "InProgress"
    if by_type.get("Stalled") == "True":
        return "Failed"
    return {"True": "Current", None: "Current"}.get(by_type.get("Ready"), "InProgress")


def _running(ftj: FineTuneJob) -> Decision:
    ftj.status.progress = Progress(step=5, total_steps=50, last_heartbeat_time=NOW)
    return decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), NOW)


def _failed(reason: str = "BackoffLimitExceeded", exit_code: int = 1) -> Decision:
    pods = (ObservedPod("p", "Failed", exit_code=exit_code, reason="Error", message="boom", finished_at=NOW),)
    workload = ObservedJob(failed=2, failed_condition=True, failed_reason=reason)
    return decide(job(), Observed(job=workload, pods=pods), NOW)


def test_pending_is_reconciling() -> None:
    status = decide(job(), Observed(job=ObservedJob()), NOW).status
    assert health(status) == {
        "Reconciling": ("True", "Pending"),
        "Ready": ("False", "Pending"),
        "Stalled": ("False", "Pending"),
    }
    assert kstatus(status) == "InProgress"
    assert kstatus(decide(job(), Observed(job=None), NOW).status) == "InProgress", "before the Job exists"


def test_running_is_reconciling_with_the_status_message() -> None:
    status = _running(job()).status
    assert health(status) == {
        "Reconciling": ("True", "TrainerRunning"),
        "Ready": ("False", "TrainerRunning"),
        "Stalled": ("False", "Progressing"),
    }
    reconciling = next(c for c in status.conditions if c.type == "Reconciling")
    assert reconciling.message == status.message == "training; no evaluation yet"
    assert kstatus(status) == "InProgress"


def test_suspended_by_the_user_is_current_and_not_reconciling() -> None:
    status = decide(job(suspend=True), Observed(job=ObservedJob(suspended=True)), NOW).status
    assert health(status) == {
        "Ready": ("True", "Suspended"),
        "Reconciling": ("False", "Suspended"),
        "Stalled": ("False", "Suspended"),
    }
    assert kstatus(status) == "Current"


def test_queued_is_suspended_but_reconciling() -> None:
    """Kueue's hold: Suspended=True reason Queued is work in progress, not a user's pause."""
    status = decide(job(), Observed(job=ObservedJob(suspended=True)), NOW).status
    set_condition(status, "Suspended", True, "Queued", "waiting for admission", NOW, 1)
    derive_health(status, 1, NOW)
    assert health(status)["Reconciling"] == ("True", "Queued")
    assert kstatus(status) == "InProgress"


def test_no_progress_is_stalled_and_not_reconciling() -> None:
    ftj = job(stallTimeoutSeconds=60)
    ftj.status.progress = Progress(step=5, last_heartbeat_time=NOW - timedelta(seconds=61))
    status = decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW).status
    assert health(status) == {
        "Stalled": ("True", "NoProgress"),
        "Reconciling": ("False", "NoProgress"),
        "Ready": ("False", "NoProgress"),
    }
    assert kstatus(status) == "Failed"


def test_stalled_for_any_reason_is_failed() -> None:
    """Another layer (e.g. an ownership conflict) may set Stalled; health follows it, whatever the reason."""
    status = _running(job()).status
    set_condition(status, "Stalled", True, "OwnershipConflict", "Job x is owned by someone else", NOW, 1)
    derive_health(status, 1, NOW)
    assert health(status)["Reconciling"] == ("False", "OwnershipConflict")
    assert kstatus(status) == "Failed"


@pytest.mark.parametrize(
    ("observed", "reason"),
    [
        (ObservedJob(complete=True, succeeded=1), "Succeeded"),
        (ObservedJob(complete=True, succeeded=1), "Stopped"),
        (ObservedJob(suspended=True, active=0), "Stopped"),  # halted before any trainer ran
    ],
)
def test_complete_is_ready(observed: ObservedJob, reason: str) -> None:
    ftj = job()
    if reason == "Stopped":
        ftj.metadata.annotations["finetune.dev/stop-requested"] = "true"
    status = decide(ftj, Observed(job=observed), NOW).status
    assert health(status) == {
        "Ready": ("True", reason),
        "Reconciling": ("False", reason),
        "Stalled": ("False", reason),
    }
    assert kstatus(status) == "Current"


def test_early_stopped_is_ready() -> None:
    ftj = _with_evals(job(), [0.6, 0.7, 0.65, 0.66])
    status = decide(ftj, Observed(job=ObservedJob(complete=True, succeeded=1)), NOW).status
    assert health(status)["Ready"] == ("True", "EarlyStopped")
    assert kstatus(status) == "Current"


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        (_failed(), "BackoffLimitExceeded"),
        (_failed("PodFailurePolicy", exit_code=3), "DataError"),
        (_failed("DeadlineExceeded"), "DeadlineExceeded"),
        (invalid_spec(FineTuneJobStatus(), "spec.freeze: bad regex", 1, NOW), "InvalidSpec"),
    ],
)
def test_failed_is_stalled_with_the_same_reason(decision: Decision, reason: str) -> None:
    status = decision.status
    failed = next(c for c in status.conditions if c.type == "Failed")
    stalled = next(c for c in status.conditions if c.type == "Stalled")
    assert (failed.status, failed.reason) == ("True", reason)
    assert (stalled.status, stalled.reason, stalled.message) == ("True", reason, failed.message)
    assert health(status)["Reconciling"] == ("False", reason)
    assert health(status)["Ready"] == ("False", reason)
    assert kstatus(status) == "Failed"


def test_terminal_health_is_sticky_and_follows_the_generation() -> None:
    ftj = job()
    ftj.status = _failed().status
    ftj.metadata.generation = 2  # e.g. ttlSecondsAfterFinished edited after the failure
    replay = decide(ftj, Observed(job=None), NOW + timedelta(hours=1)).status
    assert replay.observed_generation == 2
    assert kstatus(replay, generation=2) == "Failed"
    assert {c.observed_generation for c in replay.conditions if c.type in HEALTH} == {2}
    assert replay == decide(ftj.model_copy(update={"status": replay}), Observed(job=None), NOW).status


def test_a_spec_change_not_yet_observed_is_in_progress() -> None:
    status = decide(job(suspend=True), Observed(job=ObservedJob(suspended=True)), NOW).status
    assert kstatus(status, generation=2) == "InProgress"


def test_health_transitions_keep_their_time_until_they_flip() -> None:
    ftj = job()
    ftj.status = _running(ftj).status
    later = NOW + timedelta(minutes=5)
    ftj.status.progress = Progress(step=9, total_steps=50, last_heartbeat_time=later)
    again = decide(ftj, Observed(job=ObservedJob(active=1, ready=1, start_time=NOW)), later).status
    assert next(c for c in again.conditions if c.type == "Reconciling").last_transition_time == NOW
    done = decide(ftj.model_copy(update={"status": again}), Observed(job=ObservedJob(complete=True)), later).status
    assert next(c for c in done.conditions if c.type == "Reconciling").last_transition_time == later


def _every_status() -> list[FineTuneJobStatus]:
    early = _with_evals(job(), [0.6, 0.7, 0.65, 0.66])
    stalled = job(stallTimeoutSeconds=60)
    stalled.status.progress = Progress(step=5, last_heartbeat_time=NOW - timedelta(seconds=61))
    stopped = job()
    stopped.metadata.annotations["finetune.dev/stop-requested"] = "true"
    resumed = job()
    resumed.status.conditions.append(
        Condition(type="Suspended", status="True", reason="Suspended", last_transition_time=NOW)
    )
    return [
        decide(job(), Observed(job=None), NOW).status,
        decide(job(), Observed(job=ObservedJob()), NOW).status,
        _running(job()).status,
        _running(resumed).status,
        decide(job(suspend=True), Observed(job=ObservedJob(suspended=True)), NOW).status,
        decide(stalled, Observed(job=ObservedJob(active=1, ready=1)), NOW).status,
        decide(early, Observed(job=ObservedJob(complete=True)), NOW).status,
        decide(stopped, Observed(job=ObservedJob(suspended=True)), NOW).status,
        decide(job(), Observed(job=ObservedJob(complete=True)), NOW).status,
        _failed().status,
        _failed("DeadlineExceeded").status,
        _failed("PodFailurePolicy", exit_code=3).status,
        _failed("", exit_code=0).status,
        invalid_spec(FineTuneJobStatus(), "bad", 1, NOW).status,
    ]


def test_every_reason_written_is_in_the_reasons_table() -> None:
    written = {c.reason for status in _every_status() for c in status.conditions}
    assert written - set(REASONS) == set()
    assert {"Pending", "TrainerRunning", "Suspended", "Resumed", "NoProgress", "EarlyStopped"} <= written


def test_a_users_pause_ends_a_missing_heartbeat_stall() -> None:
    ftj = job(stallTimeoutSeconds=60)
    ftj.status.progress = Progress(step=5, last_heartbeat_time=NOW - timedelta(seconds=61))
    ftj.status = decide(ftj, Observed(job=ObservedJob(active=1, ready=1)), NOW).status
    ftj.spec.suspend = True
    paused = decide(ftj, Observed(job=ObservedJob(suspended=True)), NOW).status
    assert health(paused) == {
        "Ready": ("True", "Suspended"),
        "Reconciling": ("False", "Suspended"),
        "Stalled": ("False", "Suspended"),
    }
    assert kstatus(paused) == "Current"


def test_only_true_health_conditions_repeat_a_message() -> None:
    status = _failed().status
    messages = {c.type: c.message for c in status.conditions if c.type in HEALTH}
    assert messages["Stalled"] and messages["Ready"] == messages["Reconciling"] == ""
